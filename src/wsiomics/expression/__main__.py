"""Command line of the expression stage.

``python -m wsiomics.expression cohort --samples SHEET --out cohort.zarr [options]``
    read the expression inputs into one patients x genes AnnData of raw values;
``python -m wsiomics.expression normalize --cohort cohort.zarr --folds folds.tsv --fold K --out foldK.zarr``
    normalise, select genes and z-score, fitted on fold K's training patients.

The folds come from ``python -m wsiomics.splits`` (rule ``splits``). Options mirror the ``expression:``
config keys (``--gene-types`` and ``--sample-types`` take comma-separated lists).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args
from wsiomics.expression.cohort import CohortParams, build_cohort, write_anndata
from wsiomics.expression.normalize import NormalizeParams, normalize_fold
from wsiomics.expression.readers import ExpressionInputError
from wsiomics.samples import SampleSheetError, load_sample_sheet
from wsiomics.splits import SplitError, read_splits

log = logging.getLogger("wsiomics.expression")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wsiomics.expression", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cohort = sub.add_parser("cohort", help="build the cohort table (cohort.zarr)")
    cohort.add_argument("--samples", required=True, type=Path, help="the sample sheet")
    cohort.add_argument("--out", required=True, type=Path, help="cohort store to write (cohort.zarr)")
    cohort.add_argument("--threads", type=int, default=1, help="processes reading expression files")
    add_dataclass_options(cohort, CohortParams)
    norm = sub.add_parser("normalize", help="normalise one fold (fold<k>.zarr)")
    norm.add_argument("--cohort", required=True, type=Path, help="the cohort store (cohort.zarr)")
    norm.add_argument("--folds", required=True, type=Path, help="the folds table (folds.tsv)")
    norm.add_argument("--fold", required=True, type=int, help="which fold to normalise")
    norm.add_argument("--out", required=True, type=Path, help="normalised store to write (fold<k>.zarr)")
    add_dataclass_options(norm, NormalizeParams)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    import anndata as ad

    if args.command == "cohort":
        sheet = load_sample_sheet(args.samples)
        adata = build_cohort(sheet, dataclass_from_args(CohortParams, args), threads=args.threads)
        write_anndata(adata, args.out)
    else:
        cohort = ad.read_zarr(args.cohort)
        out = normalize_fold(cohort, read_splits(args.folds), args.fold, dataclass_from_args(NormalizeParams, args))
        write_anndata(out, args.out)
    log.info("wrote %s", args.out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        run(args)
    except (ExpressionInputError, SplitError, SampleSheetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
