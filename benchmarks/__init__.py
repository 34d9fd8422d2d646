"""Speed ratios of fsae against the reference approach of the research code (``make bench``).

Each ``bench_*.py`` runs the fsae way and the reference way on the same generated inputs in one
process, raises ``MismatchError`` when they disagree, and returns a ``BenchResult``;
``benchmarks.run`` runs them all and writes ``benchmarks/results.md``.
"""
