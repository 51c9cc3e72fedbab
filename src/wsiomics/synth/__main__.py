"""``python -m wsiomics.synth --out DIR``: write a synthetic cohort (slides, expression, samples.tsv)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args
from wsiomics.io import atomic_path
from wsiomics.synth.cohort import SIGNALS, CohortConfig, write_cohort

log = logging.getLogger("wsiomics.synth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m wsiomics.synth", description=__doc__)
    p.add_argument("--out", required=True, type=Path, help="cohort folder to create (samples.tsv goes inside)")
    p.add_argument("--workers", type=int, default=1, help="slides written in parallel")
    add_dataclass_options(p, CohortConfig, choices={"signal": SIGNALS})
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    cfg = dataclass_from_args(CohortConfig, args)
    log.info("writing synthetic cohort to %s: %s", args.out, cfg)
    # The whole folder appears at once (replacing an older one): a killed run leaves no half-written cohort.
    with atomic_path(args.out) as tmp:
        write_cohort(tmp, cfg, workers=args.workers)
    log.info("done: %s", args.out / "samples.tsv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
