"""Deployment check: a run's cross-validated balanced accuracy against its fold ensemble on a new cohort.

    python bench/deploy.py RUN NAME [--tolerance 0.05]

RUN: a finished run deployed with ``deploy: {name: NAME, ...}`` (results/deploy/NAME/<method>/ present).
Per deployed method: the run's balanced accuracy pooled over every fold's test patients (as the summary's
``pooled``), the ensemble's on the new patients with both modalities, its difference (``within``: at most the
tolerance), the single fold models' mean on those patients (like for like with the cross-validated figure:
each is one fold model's), and the ensemble's on the image-only and gene-only patients, reported separately.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from wsiomics.train import evaluate as ev


def cv_balanced_accuracy(models: Path) -> float | None:
    """Pooled over every fold's test patients (predictions.tsv of fold0..)."""
    tables = [pd.read_csv(p, sep="\t", dtype={"patient_id": str, "label": str})
              for p in sorted(models.glob("fold*/predictions.tsv"))]
    if not tables:
        return None
    table = pd.concat(tables)
    table = table[table["role"] == "test"]
    classes = [c.removeprefix("prob_") for c in table if c.startswith("prob_")]
    return ev.classification_metrics(table["label"].tolist(), table[[f"prob_{c}" for c in classes]].to_numpy(),
                                     classes)["balanced_accuracy"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("name")
    p.add_argument("--tolerance", type=float, default=0.05)
    args = p.parse_args()
    rows = []
    for out in sorted((args.run / "results" / "deploy" / args.name).iterdir()):
        metrics_path = out / "metrics.json"
        if not metrics_path.exists():
            continue
        metrics = json.loads(metrics_path.read_text())
        ens = metrics.get("ensemble") or {}
        by = ens.get("by_modalities") or {}
        cv = cv_balanced_accuracy(args.run / "results" / "models" / out.name)

        def ba(key: str, by: dict = by) -> float | None:
            return (by.get(key) or {}).get("balanced_accuracy")

        both = ba("image+gene")
        per_fold = [((f.get("by_modalities") or {}).get("image+gene") or {}).get("balanced_accuracy")
                    for f in (metrics.get("folds") or {}).values()]
        per_fold = [v for v in per_fold if v is not None]
        rows.append({"method": out.name, "cv_pooled": cv, "deploy_image+gene": both,
                     "n_image+gene": (by.get("image+gene") or {}).get("n_test"),
                     "difference": None if cv is None or both is None else both - cv,
                     "folds_mean_image+gene": sum(per_fold) / len(per_fold) if per_fold else None,
                     "within": None if cv is None or both is None else abs(both - cv) <= args.tolerance,
                     "deploy_image": ba("image"), "n_image": (by.get("image") or {}).get("n_test"),
                     "deploy_gene": ba("gene"), "n_gene": (by.get("gene") or {}).get("n_test"),
                     "deploy_all": ens.get("balanced_accuracy"), "modalities": metrics.get("modalities")})
    frame = pd.DataFrame(rows)
    print(frame.to_markdown(index=False, floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
