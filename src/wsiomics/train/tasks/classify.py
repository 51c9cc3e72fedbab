"""Classification: the patient's label from the sheet; cross-entropy; predictions, metrics, embeddings, attention."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from wsiomics.datasets import FoldData
from wsiomics.models.batch import Batch
from wsiomics.train import evaluate as ev
from wsiomics.train.embedding_evaluation import SUMMARY_KEYS
from wsiomics.train.roles import EVAL_ROLES, TRAIN_ROLES, VAL_ROLES
from wsiomics.train.tasks.base import StageContext, Task, register_task

log = logging.getLogger(__name__)


def classify_objective(label_smoothing: float):
    """Cross-entropy over the batch's labelled patients (an unlabelled batch contributes nothing: the loop
    skips the optimiser step for a loss without grad)."""

    def objective(model: torch.nn.Module, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = model(batch)
        valid = batch.labels >= 0
        if not valid.any():  # no labelled patient: a loss without grad, so the loop skips the batch
            return {"loss": out.logits.new_zeros((), dtype=torch.float32)}
        return {"loss": F.cross_entropy(out.logits[valid].float(), batch.labels[valid],
                                        label_smoothing=label_smoothing)}

    return objective


def require_classes(method, data: FoldData) -> None:
    """Classification needs two classes in the cohort and among the fold's labelled train+val patients (what
    linear fits on). Labels are optional in the sheet (the workflow then skips these methods): called
    directly, refuse with the fix."""
    trained = sorted({p.label for p in data.role(*TRAIN_ROLES, *VAL_ROLES) if p.label in data.classes})
    if len(data.classes) < 2:
        found = f"the cohort has {', '.join(data.classes) or 'no labels'}"
        fix = ("give the patients their class in the sample sheet's label column (config samples; at least two "
               "distinct labels), or leave the classification methods out of train.run")
    elif len(trained) < 2:
        found = f"the fold's labelled train and val patients have only {', '.join(trained) or 'no class'}"
        fix = ("label those patients, or draw other folds (splits.stratify: true, fewer splits.n_folds; a class "
               "of a single patient leaves none to train on in the fold that tests it)")
    else:
        return
    raise ValueError(f"{method.name} fold {data.fold}: classification needs at least two classes, but {found}. "
                     f"Fix: {fix}.")


class Classify(Task):
    name = "classify"
    summary_metrics = ("balanced_accuracy", "accuracy", "auc_macro", "f1_macro", *SUMMARY_KEYS)
    embedding_evaluations = True
    needs_labels = True

    def prepare(self, ctx: StageContext) -> FoldData:
        if ctx.method.model != "sklearn_cca":  # cca's retrieval needs no label (it then writes no predictions)
            require_classes(ctx.method, ctx.data)
        return ctx.data

    def objective(self, ctx: StageContext):
        return classify_objective(float((ctx.cfg.get("finetune") or {}).get("label_smoothing", 0.0)))

    def predict(self, model: torch.nn.Module, ctx: StageContext) -> list[ev.PatientResult]:
        return ev.run_model(model, ctx.data, EVAL_ROLES, ctx.device, ctx.dparams)

    def write(self, ctx: StageContext, results: list[ev.PatientResult], info: dict[str, Any],
              extra: dict[str, Any]) -> dict[str, Any]:
        data, method, out = ctx.data, ctx.method, ctx.out
        table = ev.predictions_table(results, data.fold, data.classes)
        metrics = ev.metrics_by_role(table, data.classes)
        metrics.update(extra)
        metrics.update({"method": method.name, "fold": data.fold, "classes": data.classes, "training": info})
        ev.write_predictions(out / "predictions.tsv", table)
        attrs = {"method": method.name, "fold": data.fold}
        ev.write_embeddings(out / "embeddings.zarr", results, attrs)
        (out / "attention").mkdir(parents=True, exist_ok=True)
        ev.write_tile_maps(out / "attention", results, "attention", "attention", attrs)
        ev.write_json(out / "metrics.json", metrics)
        log.info("%s fold %d test: %s", method.name, data.fold,
                 {k: metrics.get(k) for k in ("balanced_accuracy", "accuracy", "auc_macro", "f1_macro", "n_test")})
        return metrics

    def patient_records(self, fold_dir: Path, metrics: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """``classification``: the labelled test patients of predictions.tsv (label, ``prob_<class>``; stratum:
        the label), plus the embedding evaluations."""
        out = super().patient_records(fold_dir, metrics)
        path = fold_dir / "predictions.tsv"
        if path.exists():
            table = pd.read_csv(path, sep="\t", dtype={"patient_id": str, "label": str})
            classes = [c.removeprefix("prob_") for c in table if c.startswith("prob_")]
            test = table[(table["role"] == "test") & table["label"].isin(classes)]
            out["classification"] = test.drop(columns=["fold"]).assign(stratum=test["label"])
        return out

    def pooled_statistic(self, kind: str, records: pd.DataFrame) -> dict[str, float | None]:
        if kind != "classification":
            return super().pooled_statistic(kind, records)
        classes = [c.removeprefix("prob_") for c in records if c.startswith("prob_")]
        found = ev.classification_metrics(records["label"].tolist(),
                                          records[[f"prob_{c}" for c in classes]].fillna(0.0).to_numpy(), classes)
        return {k: found[k] for k in ("balanced_accuracy", "accuracy", "auc_macro", "f1_macro")}

    def bootstrap_statistic(self, kind: str, records: pd.DataFrame,
                            weights: np.ndarray) -> dict[str, np.ndarray] | None:
        if kind != "classification":
            return super().bootstrap_statistic(kind, records, weights)
        classes = [c.removeprefix("prob_") for c in records if c.startswith("prob_")]
        y = np.array([classes.index(v) for v in records["label"]])
        probs = records[[f"prob_{c}" for c in classes]].fillna(0.0).to_numpy(float)
        return ev.weighted_classification_metrics(y, probs, weights)


register_task(Classify())
