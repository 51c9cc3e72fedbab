"""Survival on a finished demo run (not a test): the demo's slides and expression with the synthetic follow-up
of ``wsiomics.synth.cohort.follow_up`` (what ``synth.survival: true`` writes), trained and evaluated by the
workflow with the survival methods; prints the c-index table.

    .venv/bin/python bench/survival.py --demo-dir . --seed 0 --out bench/out/survival
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from signals import run_mode  # noqa: E402

from wsiomics.synth.cohort import follow_up  # noqa: E402

METHODS = ["coxph", "gene_only_survival", "image_only_survival", "late_fusion_survival", "gimp_survival",
           "mgi_survival"]


def sheet_with_follow_up(demo: Path, seed: int) -> Path:
    cohort = demo / "results" / "demo_cohort"
    truth = pd.read_csv(cohort / "patients_truth.tsv", sep="\t", dtype={"patient_id": str}).set_index("patient_id")
    outcome = follow_up(truth, seed)
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["time"] = sheet["patient_id"].map(lambda p: f"{outcome.at[p, 'time']:.0f}")
    sheet["event"] = sheet["patient_id"].map(lambda p: str(int(outcome.at[p, "event"])))
    out = cohort / "samples_survival.tsv"
    sheet.to_csv(out, sep="\t", index=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default=".", help="a work directory where the demo ran (tiles and features done)")
    p.add_argument("--seed", type=int, default=0, help="the demo cohort's synth.seed")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--out", default="bench/out/survival")
    p.add_argument("--config", nargs="*", default=[], help="extra --config items")
    args = p.parse_args()
    demo, out = Path(args.demo_dir).resolve(), Path(args.out).resolve()
    table = run_mode(demo, "survival", out, args.methods, args.config, sheet=sheet_with_follow_up(demo, args.seed))
    cols = ["method", "n_folds"] + [c for c in table.columns if c.startswith(("c_index", "td_auc", "integrated"))]
    print(table[cols + ["workflow_s"]].to_string(index=False))
    print("oracle (the generator's log-hazard) c-index per fold:", oracle(demo, out / "survival"))


def oracle(demo: Path, work: Path) -> list[float]:
    """Harrell's c-index of the true log-hazard on each fold's test patients: the ceiling of any model."""
    from sksurv.metrics import concordance_index_censored

    from wsiomics.synth.cohort import SURVIVAL_WEIGHTS

    truth = pd.read_csv(demo / "results" / "demo_cohort" / "patients_truth.tsv", sep="\t",
                        dtype={"patient_id": str}).set_index("patient_id")
    hazard = sum(w * truth[k] for k, w in SURVIVAL_WEIGHTS.items())
    sheet = pd.read_csv(demo / "results" / "demo_cohort" / "samples_survival.tsv", sep="\t", dtype={"patient_id": str})
    follow = sheet.drop_duplicates("patient_id").set_index("patient_id")
    folds = pd.read_csv(work / "results" / "splits" / "folds.tsv", sep="\t", dtype={"patient_id": str})
    out = []
    for _, part in folds[folds.role == "test"].groupby("fold"):
        ids = part["patient_id"]
        out.append(round(float(concordance_index_censored(follow.loc[ids, "event"].astype(bool).to_numpy(),
                                                          follow.loc[ids, "time"].to_numpy(float),
                                                          hazard.loc[ids].to_numpy())[0]), 3))
    return out


if __name__ == "__main__":
    main()
