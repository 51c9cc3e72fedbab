"""``python -m wsiomics.synth --out DIR``: write a synthetic cohort (slides, expression, samples.tsv).

``python -m wsiomics.synth features --patients N --out DIR``: a cohort of patch features instead of slides
(TRIDENT h5 files, expression, samples.tsv with features_path), fast enough for thousands of patients.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args
from wsiomics.io import atomic_path
from wsiomics.synth.cohort import SIGNALS, CohortConfig, write_cohort

log = logging.getLogger("wsiomics.synth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m wsiomics.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="cohort folder to create (samples.tsv goes inside)")
    p.add_argument("--workers", type=int, default=1, help="slides written in parallel")
    add_dataclass_options(p, CohortConfig, choices={"signal": SIGNALS})
    return p.parse_args(argv)


def _features_main(argv: list[str]) -> int:
    from wsiomics.synth.features import FeatureCohortConfig, write_feature_cohort

    p = argparse.ArgumentParser(prog="python -m wsiomics.synth features",
                                description="A synthetic cohort of patch features (TRIDENT h5), expression and "
                                            "samples.tsv, with the slide generator's patients and latent structure.")
    p.add_argument("--out", required=True, type=Path, help="cohort folder to create (samples.tsv goes inside)")
    add_dataclass_options(p, FeatureCohortConfig, choices={"signal": SIGNALS})
    args = p.parse_args(argv)
    configure_logging()
    cfg = dataclass_from_args(FeatureCohortConfig, args)
    log.info("writing synthetic feature cohort to %s: %s", args.out, cfg)
    started = time.perf_counter()
    with atomic_path(args.out) as tmp:
        write_feature_cohort(tmp, cfg)
    log.info("done in %.0f s: %s", time.perf_counter() - started, args.out / "samples.tsv")
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["features"]:
        return _features_main(argv[1:])
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
