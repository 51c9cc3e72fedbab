"""``python -m wsiomics.synth --out DIR``: write a synthetic cohort (slides, expression, samples.tsv)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path

from wsiomics.io import atomic_path
from wsiomics.synth.cohort import SIGNALS, CohortConfig, write_cohort

log = logging.getLogger("wsiomics.synth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = CohortConfig()
    p = argparse.ArgumentParser(prog="python -m wsiomics.synth", description=__doc__)
    p.add_argument("--out", required=True, type=Path, help="cohort folder to create (samples.tsv goes inside)")
    p.add_argument("--n-patients", type=int, default=defaults.n_patients)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--signal", choices=SIGNALS, default=defaults.signal,
                   help="which modality carries the class label")
    p.add_argument("--slide-width-um", type=float, default=defaults.slide_width_um)
    p.add_argument("--slide-height-um", type=float, default=defaults.slide_height_um)
    p.add_argument("--n-genes", type=int, default=defaults.n_genes)
    p.add_argument("--fraction-40x", type=float, default=defaults.fraction_40x)
    p.add_argument("--fraction-pen", type=float, default=defaults.fraction_pen)
    p.add_argument("--latent-factors", type=int, default=defaults.latent_factors,
                   help="shared per-patient factors driving stain and a gene set (0-2), for image-gene retrieval")
    p.add_argument("--no-faults", dest="faults", action="store_false",
                   help="leave out the deliberately broken slides")
    p.add_argument("--workers", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    names = {f.name for f in fields(CohortConfig)}
    cfg = CohortConfig(**{k: v for k, v in vars(args).items() if k in names})
    log.info("writing synthetic cohort to %s: %s", args.out, cfg)
    # The whole folder appears at once (replacing an older one): a killed run leaves no half-written cohort.
    with atomic_path(args.out) as tmp:
        write_cohort(tmp, cfg, workers=args.workers)
    log.info("done: %s", args.out / "samples.tsv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
