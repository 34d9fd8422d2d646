"""``fsae <command>``: one module per command family, each with its parsers beside its handlers.

A handler parses, calls the stage function (``fsae.stages``), prints. ``main(argv) -> int`` runs in this
process and returns the exit code (0; 1 for a failed check; 2 for bad input, with one line on stderr; 130 for
Ctrl-C); it never calls ``sys.exit``, so ``fsae reproduce`` and the tests can call it.
"""

from __future__ import annotations

import argparse
import sys

from fsae import __version__
from fsae.cli import data, masks, reproduce, scoring, seg, tools, training
from fsae.errors import FsaeError

DESCRIPTION = """\
fsae: weakly-supervised semantic segmentation from image-level labels, with FSAE (Feature- and
Spatial-level Activation Expansion, WACV) as an extra loss on the classification network.

The stages, in order (each writes into a run directory and skips work it finished before):
  data     generate the synthetic set, or prepare / check VOC and COCO
  train    train a base method (cam, ppc, sipe, mctformer), + FSAE when fsae.enabled
  cam      multi-scale + flip CAMs of the trained network -> seeds
  eval     score seeds (threshold sweep) or pseudo-masks against ground truth
  crf      dense CRF on the seeds -> pseudo-masks   (or irn / psa: random-walk pseudo-masks)
  seg      train DeepLab on the pseudo-masks, then predict and score val / test
  report   one HTML page of a run: curves, scores, examples

`fsae reproduce ROW` runs a row of the paper's tables through all of these and prints fsae's numbers next to
the paper's (`fsae reproduce --list`).

Start with `fsae demo --out runs/demo`; `fsae <stage> -h` explains each stage's options."""

# The command families, in the order `fsae --help` lists their commands: each module's add_parsers(sub)
# adds its subcommands. A new family (e.g. `fsae reproduce`) is one module with add_parsers and one entry here.
FAMILIES = [data, training, scoring, masks, seg, tools]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsae", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fsae {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    tools.add_demo(sub)
    for family in FAMILIES:
        family.add_parsers(sub)
    reproduce.add_parsers(sub, run_argv=main)  # runs each step's command through this same CLI
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (FsaeError, FileExistsError) as exc:
        print(f"fsae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfsae: interrupted: {_interrupted(args, argv)}", file=sys.stderr)
        return 130
    return int(code or 0)


def _interrupted(args, argv: list[str] | None) -> str:
    """Where a Ctrl-C stopped and how to go on: finished files and checkpoints are whole (atomic writes)."""
    command = " ".join(["fsae", *(sys.argv[1:] if argv is None else argv)])
    where = getattr(args, "stopped_in", None)
    kept = f"finished outputs in {where} are kept" if where else "finished outputs are kept"
    return f"{kept}; rerun `{command}` to resume"


__all__ = ["DESCRIPTION", "FAMILIES", "build_parser", "main"]
