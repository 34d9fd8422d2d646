"""``fsae reproduce ROW``: a row of the paper's tables from images to DeepLab's number (``fsae.reproduce``)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from fsae.cli.common import add_device


def add_parsers(sub, run_argv) -> None:
    """``run_argv``: the CLI's own ``main``, which runs each step's command in this process."""
    p = sub.add_parser("reproduce", help="run a row of the paper's tables end to end and print fsae's numbers "
                                         "next to the paper's (row.md, row.json)")
    p.add_argument("row", nargs="?", default=None, help="a row of configs/paper/rows.yaml, e.g. voc_ppc_fsae "
                                                        "(--list shows them)")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--out", default=None, help="output folder (default runs/paper/ROW): run/, one folder per "
                                               "DeepLab run, row.md, row.json")
    add_device(p, "each recipe's train.device / device")
    p.add_argument("--nproc", type=int, default=1, help="training processes on this machine (fsae train --nproc)")
    p.add_argument("--dry-run", action="store_true", help="print the commands the row runs, one per line, and exit")
    p.add_argument("--tiny", action="store_true", help="shrink every stage to CPU size (configs/paper/tiny.yaml: "
                                                       "sizes only), a smoke run of the chain")
    p.add_argument("--force", nargs="*", default=None, metavar="STAGE",
                   help="redo these stages of the row (stage ids; none given: every stage that takes --force) "
                        "where their outputs were made otherwise")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                   help="override a field: of the stage named, else of every recipe stage that has it "
                        "(infer.* also reaches cam and seg infer), e.g. --set data.root=/data/VOC2012 (repeatable)")
    p.add_argument("--rows", default=None, help="rows file (default configs/paper/rows.yaml)")
    p.set_defaults(func=functools.partial(cmd_reproduce, run_argv=run_argv))


def cmd_reproduce(args: argparse.Namespace, run_argv) -> int:
    from fsae.errors import FsaeError
    from fsae.paper import ROWS_FILE, load_rows
    from fsae.reproduce import ALL, Options, default_out, load_row, plan_row, run_row

    rows_file = args.rows or ROWS_FILE
    if args.list:
        for name, row in load_rows(rows_file).items():
            count = len(row.paper)
            print(f"{name:24s} {row.dataset:5s} {row.title} ({count} paper number{'s' if count > 1 else ''})")
        return 0
    if args.row is None:
        raise FsaeError("fsae reproduce: name a row (fsae reproduce --list shows them)")
    if args.nproc < 1:
        raise FsaeError(f"fsae reproduce: --nproc {args.nproc} is not allowed; expected an integer >= 1")
    row = load_row(args.row, rows_file)
    force = frozenset() if args.force is None else (ALL if not args.force else frozenset(args.force))
    options = Options(out=Path(args.out) if args.out else default_out(row), device=args.device, nproc=args.nproc,
                      overrides=tuple(args.overrides), tiny=args.tiny, force=force)
    if args.dry_run:
        print("\n".join(step.command() for step in plan_row(row, options)))
        return 0
    result = run_row(row, options, run_argv)
    print(result["markdown"], end="")
    print(f"written: {result['md']}, {result['json']}")
    return 0
