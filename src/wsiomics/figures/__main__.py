"""Draw every registered figure of a run (README "Figures"):

    python -m wsiomics.figures --results results --out results/figures [--only roc,loss]

Each kind writes under ``<out>/<kind>/``; that folder is created even when the kind has nothing to draw
(its inputs missing: logged), so the workflow's outputs always exist.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from wsiomics.figures import kinds
from wsiomics.figures.params import FigureParams
from wsiomics.figures.sources import Results

log = logging.getLogger("wsiomics.figures")


def draw_all(results: Results, out: Path, params: FigureParams, only: tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """Every kind (or those in ``only``) into ``out/<kind>/``; returns the files each wrote."""
    registry = kinds()
    unknown = sorted(set(only) - set(registry))
    if unknown:
        raise ValueError(f"unknown figure kinds {unknown}; known: {sorted(registry)}")
    written = {}
    for name, kind in registry.items():
        if only and name not in only:
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        written[name] = kind.draw(results, folder, params)
        log.info("%s: %d files in %.1f s", name, len(written[name]), time.perf_counter() - start)
    return written


def main(argv: list[str] | None = None) -> int:
    from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args

    parser = argparse.ArgumentParser(prog="python -m wsiomics.figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"), help="the run's results folder")
    parser.add_argument("--out", type=Path, default=Path("results/figures"), help="folder of the figures")
    parser.add_argument("--samples", help="the sample sheet (annotation outlines on the tumour maps)")
    parser.add_argument("--segmentation", default="{}",
                        help="JSON of config train.segmentation: how the annotations are read")
    parser.add_argument("--only", default="", help="comma-separated figure kinds (default: all)")
    add_dataclass_options(parser, FigureParams)
    args = parser.parse_args(argv)
    configure_logging()
    for noisy in ("matplotlib", "numba", "PIL", "fontTools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        options = json.loads(args.segmentation)
        results = Results(args.results, samples=args.samples, annotation_options=options)
        written = draw_all(results, args.out, dataclass_from_args(FigureParams, args),
                           tuple(k for k in args.only.split(",") if k))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info("wrote %d figure files under %s", sum(len(v) for v in written.values()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
