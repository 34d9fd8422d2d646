"""Argument helpers every command family shares: ``--device``, ``--force``, ``--shard``, ``--ids``, ``--set``."""

from __future__ import annotations

import argparse
from pathlib import Path

FORCE_HELP = ("replace the outputs already there and redo them (needed when they were made otherwise); the old "
              "ones stay until the new ones are complete")


def add_set(p: argparse.ArgumentParser, example: str = "fsae.enabled=true") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a field of this stage's config, e.g. --set {example} (repeatable)")


def add_device(p: argparse.ArgumentParser, default_from: str = "the recipe's train.device", default=None) -> None:
    p.add_argument("--device", default=default, help=f"cpu, cuda or cuda:N (default: {default_from})")


def add_force(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--force", action="store_true", help=FORCE_HELP + (f" ({what})" if what else ""))


def add_shard(p: argparse.ArgumentParser, help_text: str | None = None) -> None:
    p.add_argument("--shard", default=None, metavar="I/N",
                   help=help_text or "only images I, I+N, I+2N, ... of the list (split a run over jobs or machines); "
                                     "under torchrun each process also takes its share")


def add_ids(p: argparse.ArgumentParser, default: str = "every seed file") -> None:
    p.add_argument("--ids", default=None, help=f"image list (default: {default})")


def run_paths(target: str) -> tuple[Path, Path | None]:
    """A run directory or a config file -> (config path, run dir or None)."""
    path = Path(target)
    if path.is_dir():
        return path / "config.yaml", path
    return path, None


def shard_part(shard: tuple[int, int]) -> str:
    """``", shard I/N"`` for a summary line, empty for the whole list."""
    return f", shard {shard[0]}/{shard[1]}" if shard[1] > 1 else ""


def warned(result: dict) -> str:
    """``", N warning(s) above"`` for a summary line (the warnings were printed on stderr already)."""
    n = len(result.get("warnings") or [])
    return f", {n} warning{'s' if n != 1 else ''} above" if n else ""
