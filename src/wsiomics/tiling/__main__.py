"""Command line of the tiling stage.

``python -m wsiomics.tiling tile --slide PATH --slide-id ID --out STORE --qc-png PNG [options]``
tiles one slide; ``python -m wsiomics.tiling status --out TSV STORE...`` gathers the per-slide
status table (slide, status, reason, ...) from finished tile stores.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args
from wsiomics.io import atomic_path, open_store
from wsiomics.tiling.core import OK, TilingError, TilingParams, tile_slide
from wsiomics.tiling.mask import MaskParams

STATUS_COLUMNS = ["slide_id", "patient_id", "status", "reason", "n_tiles", "mpp", "mpp_source", "vendor",
                  "slide_width", "slide_height", "tissue_area_mm2", "seconds", "store"]


def _params(args: argparse.Namespace) -> TilingParams:
    return dataclass_from_args(TilingParams, args, mask=dataclass_from_args(MaskParams, args, prefix="mask_"))


def status_table(stores: list[Path]) -> pd.DataFrame:
    rows = []
    for store in stores:
        attrs = dict(open_store(store).attrs)
        rows.append({**{k: attrs.get(k, "") for k in STATUS_COLUMNS}, "store": str(store)})
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


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
    status = sub.add_parser("status", help="gather the per-slide status table")
    status.add_argument("--out", required=True, type=Path, help="status table to write (TSV)")
    status.add_argument("stores", nargs="*", type=Path)
    args = parser.parse_args(argv)
    configure_logging()

    if args.command == "tile":
        try:
            result = tile_slide(args.slide, args.slide_id, args.out, args.qc_png, _params(args), args.mpp,
                                args.strict, args.patient_id)
        except TilingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0 if result.status == OK or not args.strict else 1
    table = status_table(args.stores)
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    logging.getLogger("wsiomics.tiling").info("%d slides: %s", len(table), counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
