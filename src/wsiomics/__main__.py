"""The ``wsiomics`` command (also ``python -m wsiomics``): small tools around the pipeline's outputs.

``wsiomics inspect STORE [STORE ...] [--json] [--full]`` shows what is inside zarr stores: tree, attrs,
completeness, and summaries. Exit status: 0 when every store is readable and complete, 1 otherwise, 2 on
a usage error. The stages themselves have their own commands (``python -m wsiomics.tiling`` etc.).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsiomics import __version__
from wsiomics.inspect import SUMMARY_CAP_BYTES, inspect_store, render, to_json


def _inspect(args: argparse.Namespace) -> int:
    reports = [inspect_store(p, full=args.full) for p in args.stores]
    if args.json:
        print(to_json(reports))
        for r in reports:
            for e in r["errors"]:
                print(f"wsiomics inspect: {e}", file=sys.stderr)
    else:
        print("\n\n".join(render(r) for r in reports))
    return 0 if all(r["ok"] for r in reports) else 1


def build_parser() -> argparse.ArgumentParser:
    """One sub-parser per command; each sets ``func`` to the function that runs it."""
    parser = argparse.ArgumentParser(prog="wsiomics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wsiomics {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = sub.add_parser("inspect", help="show what is inside zarr stores (tiles, features, AnnData, any zarr)",
                             description="Show the tree, attrs, completeness and summaries of zarr stores.")
    inspect.add_argument("stores", nargs="+", type=Path, metavar="STORE")
    inspect.add_argument("--json", action="store_true", help="print one JSON document (a list, one entry per store)")
    inspect.add_argument("--full", action="store_true",
                         help=f"summarise arrays of any size (default: skip those above "
                              f"{SUMMARY_CAP_BYTES / 2**30:g} GiB uncompressed)")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on a usage error and 0 for --help / --version
        return e.code if isinstance(e.code, int) else 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
