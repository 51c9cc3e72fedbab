"""Command line of the tiling stage.

``python -m wsiomics.tiling tile --slide PATH --slide-id ID --out STORE --qc-png PNG [options]``
tiles one slide. The cohort's per-slide status table is ``python -m wsiomics.status`` (after features,
or tiling only without ``--features-dir``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args
from wsiomics.tiling.core import OK, TilingError, TilingParams, tile_slide
from wsiomics.tiling.mask import MaskParams


def _params(args: argparse.Namespace) -> TilingParams:
    return dataclass_from_args(TilingParams, args, mask=dataclass_from_args(MaskParams, args, prefix="mask_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsiomics.tiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tile = sub.add_parser("tile", help="tile one slide")
    tile.add_argument("--slide", required=True, type=Path, help="the slide file")
    tile.add_argument("--slide-id", required=True, help="the slide's id (names its outputs)")
    tile.add_argument("--patient-id", default="", help="the patient it belongs to (recorded)")
    tile.add_argument("--out", required=True, type=Path, help="tiles store to write (<slide_id>.zarr)")
    tile.add_argument("--qc-png", required=True, type=Path, help="QC picture to write")
    tile.add_argument("--mpp", type=float, default=None, help="override the slide's microns per pixel")
    tile.add_argument("--strict", action="store_true", help="fail on a slide that cannot be tiled")
    add_dataclass_options(tile, TilingParams, skip=("mask",))
    add_dataclass_options(tile, MaskParams, prefix="mask_")
    args = parser.parse_args(argv)
    configure_logging()

    try:
        result = tile_slide(args.slide, args.slide_id, args.out, args.qc_png, _params(args), args.mpp,
                            args.strict, args.patient_id)
    except TilingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if result.status == OK or not args.strict else 1


if __name__ == "__main__":
    raise SystemExit(main())
