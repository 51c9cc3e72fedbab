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
    """Cross-entropy over the batch's labelled patients (an unlabelled batch contributes nothing)."""

    def objective(model: torch.nn.Module, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = model(batch)
        valid = batch.labels >= 0
        if not valid.any():
            return {"loss": out.logits.sum() * 0.0}
        return {"loss": F.cross_entropy(out.logits[valid].float(), batch.labels[valid],
                                        label_smoothing=label_smoothing)}

    return objective


def _weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney, ties count half) of ``score`` (n,) for ``positive`` (n,) against the rest, with
    each sample counted ``weights`` (B, n) times: (B,), NaN without both kinds."""
    above = (score[:, None] > score[None, :]) + 0.5 * (score[:, None] == score[None, :])  # (n, n) pos i vs neg j
    pos, neg = weights * positive, weights * ~positive  # (B, n)
    denom = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.einsum("bi,ij,bj->b", pos, above, neg) / denom, np.nan)


def weighted_classification_metrics(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`wsiomics.train.evaluate.classification_metrics` of B resamples at once: ``y`` (n,) class indices,
    ``probs`` (n, C), ``weights`` (B, n) the times each patient is drawn. The same definitions (argmax
    prediction; balanced accuracy and macro F1 over the classes present; one-vs-rest macro AUC over the
    present classes with probabilities renormalised over them, the binary AUC with two), in closed form."""
    n_classes = probs.shape[1]
    onehot = np.eye(n_classes, dtype=float)
    truth, pred = onehot[y], onehot[probs.argmax(1)]  # (n, C)
    total = weights.sum(1)  # (B,)
    count = weights @ truth  # (B, C) patients per class
    hits = weights @ (truth * pred)  # (B, C) true positives
    present = count > 0  # (B, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / count, np.nan)
        f1 = np.where(present, 2 * hits / (count + weights @ pred), np.nan)
        out = {"accuracy": hits.sum(1) / total, "balanced_accuracy": np.nanmean(recall, 1),
               "f1_macro": np.nanmean(f1, 1), "auc_macro": np.full(len(weights), np.nan)}
    for pattern in np.unique(present, axis=0):  # resamples with the same classes present share the AUC's form
        rows, cls = np.all(present == pattern, axis=1), np.flatnonzero(pattern)
        if len(cls) < 2:
            continue
        w = weights[rows]
        if n_classes == 2:
            out["auc_macro"][rows] = _weighted_auc(probs[:, 1], y == 1, w)
            continue
        sub = probs[:, cls] / np.clip(probs[:, cls].sum(1, keepdims=True), 1e-12, None)
        w = w * np.isin(y, cls)  # patients of the absent classes carry no weight already
        if len(cls) == 2:
            out["auc_macro"][rows] = _weighted_auc(sub[:, 1], y == cls[1], w)
        else:
            out["auc_macro"][rows] = np.mean([_weighted_auc(sub[:, j], y == c, w) for j, c in enumerate(cls)], 0)
    return out


class Classify(Task):
    name = "classify"
    summary_metrics = ("balanced_accuracy", "accuracy", "auc_macro", "f1_macro", *SUMMARY_KEYS)
    embedding_evaluations = True
    needs_labels = True

    def prepare(self, ctx: StageContext) -> FoldData:
        data = ctx.data
        fit_labels = {p.label for p in data.role(*TRAIN_ROLES, *VAL_ROLES) if p.label in data.classes}
        if len(data.classes) < 2 or len(fit_labels) < 2:
            raise ValueError(
                f"{ctx.method.name} fold {data.fold}: classification needs at least two classes among the training "
                f"patients (the cohort has {data.classes or 'no labels'}, training patients {sorted(fit_labels)}); "
                "fill the sample sheet's label column, or run only methods that need no label (segmentation, "
                "retrieval) on this cohort")
        return data

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
            return None
        classes = [c.removeprefix("prob_") for c in records if c.startswith("prob_")]
        y = np.array([classes.index(v) for v in records["label"]])
        probs = records[[f"prob_{c}" for c in classes]].fillna(0.0).to_numpy(float)
        return weighted_classification_metrics(y, probs, weights)


register_task(Classify())
