"""Shared pieces of the benchmarks: results, the equality check, timing, machine info, markdown."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fsae.data.synthetic import SyntheticSpec, generate

REPO = Path(__file__).resolve().parent.parent


def generated_set(root: str | Path, num_train: int, num_val: int = 8, seed: int = 0) -> Path:
    """The demo's generated data set (128 x 128, 4 classes, VOC layout) with ``num_train`` images."""
    return generate(Path(root) / "synthetic", SyntheticSpec(num_train=num_train, num_val=num_val, seed=seed),
                    progress=False)


class MismatchError(RuntimeError):
    """The fsae way and the reference way gave different numbers: the ratio would mean nothing."""


@dataclass
class Row:
    """One line of a benchmark table. ``reference`` / ``fsae`` are already formatted with units."""

    what: str
    reference: str
    fsae: str
    ratio: float | None
    goal: str
    check: str


@dataclass
class BenchResult:
    title: str
    setup: str  # sizes and settings, one sentence
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)  # raw values, for tests and for other benchmarks


def check_equal(what: str, ok: bool, detail: str) -> str:
    """Raise ``MismatchError`` unless ``ok``; returns the text for the table's check column."""
    if not ok:
        raise MismatchError(f"{what}: the fsae way and the reference way disagree: {detail}")
    return f"passed ({detail})"


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are all zero)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def time_call(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall-clock seconds of one call, and its return value."""
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Run every function ``repeats`` times, round-robin; median seconds and last output per name.

    Round-robin puts every way in the same stretches of time, so a burst of load from another
    process on the machine slows all of them alike instead of one; the median drops the outliers.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds, outputs[name] = time_call(fn)
            times[name].append(seconds)
    return {name: median(t) for name, t in times.items()}, outputs


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def timed_call(call: str, args: list, kwargs: dict, job_file: Path, startup: bool = False) -> dict:
    """``call(*args, **kwargs)`` (``refine_dir`` or ``evaluate_seeds``) in a fresh ``benchmarks.timed`` process:
    ``{"seconds"`` (the call alone), ``"result"``, ``"startup_s"`` (with ``startup``: a pool of the call's
    ``workers`` doing nothing, else None), ``"torch"`` (imported in that process), ``"workers_torch"`` (in
    that pool's workers)``}``."""
    job_file.write_text(json.dumps({"call": call, "args": args, "kwargs": kwargs, "startup": startup}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-m", "benchmarks.timed", str(job_file)], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.timed {call} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores available": str(cores),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cpu",
        "load average at start (other processes)": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def fmt_ratio(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def render_section(r: BenchResult) -> str:
    """One benchmark as a markdown section: title, set-up, table, notes."""
    lines = [f"## {r.title}", "", r.setup, "",
             "| what | reference | fsae | ratio | goal | equal check |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {row.what} | {row.reference} | {row.fsae} | {fmt_ratio(row.ratio)} | {row.goal} | {row.check} |"
              for row in r.rows]
    if r.notes:
        lines += [""] + [f"- {n}" for n in r.notes]
    return "\n".join(lines)


def render_markdown(results: list[BenchResult], machine: dict[str, str], command: str, seconds: float) -> str:
    lines = ["# fsae benchmarks against the reference approach", "",
             (f"Produced by `{command}` in {seconds:.0f} s, all numbers from that one run. Each benchmark "
              "runs the reference way (as the research code does it, re-implemented plainly in `benchmarks/`) "
              "and the fsae way on the same generated inputs in one process, and fails if they give different "
              "numbers. Timings are wall clock on CPU; ratio = reference time / fsae time (> 1: fsae is "
              "faster), except in benchmark 1's floor rows (the cost: sweep time / floor time), 3 (the cost: FSAE "
              "step time / base step time) and 5 (loader images/s / training-step images/s); in benchmark 6 the "
              "ratio is reference / fsae of the row's two numbers."),
             "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    for r in results:
        lines += ["", render_section(r)]
    return "\n".join(lines) + "\n"
