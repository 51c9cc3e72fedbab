"""Evaluations every embedding method gets, whatever its task: image<->gene retrieval and a linear probe.

They judge a network's embeddings without fine-tuning: after pretraining (``pretrain/metrics.json``) and,
for methods without pretraining, of the randomly initialised network, so the two can be compared.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsiomics.datasets import DatasetParams, FoldData
from wsiomics.train import evaluate as ev
from wsiomics.train.linear import fit_logistic
from wsiomics.train.roles import ALL_ROLES, TRAIN_ROLES, VAL_ROLES

log = logging.getLogger(__name__)

# What the evaluation of a pretrained model adds to the fine-tuned metrics.json (from pretrain/metrics.json).
PRETRAIN_KEYS = ("n_retrieval", "recall_i2g@1", "recall_i2g@5", "recall_g2i@1", "recall_g2i@5",
                 "linear_probe_balanced_accuracy", "linear_probe_accuracy", "n_linear_probe", "recall_chance@1",
                 "recall_chance@5")
# Of those, the ones the cohort summary reports.
SUMMARY_KEYS = ("recall_i2g@1", "recall_i2g@5", "recall_g2i@1", "recall_g2i@5", "linear_probe_balanced_accuracy",
                "recall_chance@1", "recall_chance@5")


def evaluate_embeddings(model: torch.nn.Module, data: FoldData, device: torch.device, dparams: DatasetParams,
                        seed: int, retrieval: bool) -> tuple[dict[str, Any], list[ev.PatientResult]]:
    """A pretrained (or initial) model's embeddings of every patient of the fold, judged without fine-tuning.

    ``retrieval``: image->gene and gene->image recall@1/@5 on the ``test`` patients that have both
    modalities (and on ``heldout`` on its own); always: a linear probe, logistic regression on the
    embeddings (``fused``, else image and gene side by side) of the labelled train+val patients,
    scored on the labelled test patients.
    """
    results = ev.run_model(model, data, ALL_ROLES, device, dparams)
    metrics: dict[str, Any] = {}
    if retrieval:
        for role in ("test", "heldout"):
            paired = [r for r in results if r.patient.role == role and r.patient.slides and r.patient.genes is not None]
            if role == "heldout" and not paired:
                continue
            img = np.stack([r.embeddings["image"] for r in paired]) if paired else np.zeros((0, 1))
            gene = np.stack([r.embeddings["gene"] for r in paired]) if paired else np.zeros((0, 1))
            found = ev.retrieval_metrics(img, gene, patient_ids=[r.patient.patient_id for r in paired]
                                         if role == "test" else None)
            if role == "test":
                metrics.update(found)
            else:
                metrics["retrieval_heldout"] = found
    metrics.update(linear_probe(results, data.classes, seed))
    return metrics, results


def _probe_vector(r: ev.PatientResult) -> np.ndarray | None:
    if "fused" in r.embeddings:
        return r.embeddings["fused"]
    parts = [r.embeddings[k] for k in ("image", "gene") if k in r.embeddings]
    return np.concatenate(parts) if parts else None


def linear_probe(results: list[ev.PatientResult], classes: list[str], seed: int) -> dict[str, Any]:
    """Logistic regression (linear.fit_logistic) on frozen embeddings: fit on train+val, score on test."""
    fit = [r for r in results if r.patient.role in (*TRAIN_ROLES, *VAL_ROLES) and r.patient.label in classes]
    test = [r for r in results if r.patient.role == "test" and r.patient.label in classes]
    out: dict[str, Any] = {"n_linear_probe": len(test), "linear_probe_balanced_accuracy": None,
                           "linear_probe_accuracy": None}
    if not fit or not test or _probe_vector(fit[0]) is None or len({r.patient.label for r in fit}) < 2:
        return out
    x = np.stack([_probe_vector(r) for r in fit])
    y = np.array([classes.index(r.patient.label) for r in fit])
    model = fit_logistic(x, y, seed)
    probs = np.zeros((len(test), len(classes)))
    probs[:, model.classes_] = model.predict_proba(np.stack([_probe_vector(r) for r in test]))
    found = ev.classification_metrics([r.patient.label for r in test], probs, classes)
    out["linear_probe_balanced_accuracy"] = found["balanced_accuracy"]
    out["linear_probe_accuracy"] = found["accuracy"]
    # each test patient's probe prediction: the cohort summary pools them over folds (and bootstraps them)
    out["linear_probe_per_patient"] = {"patient_id": [r.patient.patient_id for r in test],
                                       "label": [r.patient.label for r in test],
                                       "predicted": [classes[int(i)] for i in probs.argmax(1)]}
    return out


def pretrained_metrics(pretrained: str | Path) -> dict[str, Any]:
    """pretrain/metrics.json beside a pretrained checkpoint ({} when absent, e.g. a checkpoint from elsewhere)."""
    path = Path(pretrained).with_name("metrics.json")
    if not path.exists():
        log.warning("%s: no metrics.json beside the pretrained checkpoint; retrieval metrics not reported", pretrained)
        return {}
    with open(path) as f:
        return json.load(f)


def top_level(pre_metrics: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned metrics.json's copy of the initial network's evaluation: the main keys at the top level,
    everything under ``pretrain``."""
    if not pre_metrics:
        return {}
    extra = {k: pre_metrics[k] for k in PRETRAIN_KEYS if k in pre_metrics}
    extra["pretrain"] = {k: v for k, v in pre_metrics.items() if k not in ("method", "fold")}
    return extra


def _stored(metrics: dict[str, Any], key: str) -> Any:
    """A key of the fine-tuned metrics.json: top level (an estimator's own evaluation, e.g. cca), else under
    ``pretrain`` (the pretrained or initial network's evaluation)."""
    return metrics.get(key) if metrics.get(key) is not None else (metrics.get("pretrain") or {}).get(key)


def embedding_records(metrics: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Per test patient: retrieval hits (``recall_i2g@k`` ... per query, plus the fold's chance level) and the
    linear probe's prediction (stratum: the label), from a fold's metrics.json. Empty for runs written before
    these were kept (their pooled values are then missing; the fold means are not)."""
    out: dict[str, pd.DataFrame] = {}
    hits = _stored(metrics, "retrieval_per_patient")
    if hits and hits.get("patient_id"):
        table = pd.DataFrame(hits)
        n = len(table)
        for k in sorted({int(c.split("@")[1]) for c in table if c.startswith("recall_")}):
            table[f"recall_chance@{k}"] = min(k, n) / n  # each fold's own candidates: its queries
        out["retrieval"] = table
    probe = _stored(metrics, "linear_probe_per_patient")
    if probe and probe.get("patient_id"):
        table = pd.DataFrame(probe)
        out["linear_probe"] = table.assign(stratum=table["label"])
    return out


def embedding_statistic(kind: str, records: pd.DataFrame) -> dict[str, float | None]:
    """Pooled recall@k = mean of the per-query hits over every fold's queries (each query ranked within its own
    fold: the folds' embeddings live in different spaces, so queries are never re-ranked across folds); pooled
    linear probe = balanced accuracy and accuracy of all folds' probe predictions together."""
    from sklearn import metrics as skm

    if kind == "retrieval":
        cols = [c for c in records if c.startswith("recall_")]
        return {c: float(records[c].mean()) if len(records) else None for c in cols}
    if kind == "linear_probe":
        if not len(records):
            return {"linear_probe_balanced_accuracy": None, "linear_probe_accuracy": None}
        y, pred = records["label"].astype(str), records["predicted"].astype(str)
        return {"linear_probe_balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
                "linear_probe_accuracy": float(skm.accuracy_score(y, pred))}
    return {}


def embedding_bootstrap(kind: str, records: pd.DataFrame, weights: np.ndarray) -> dict[str, np.ndarray] | None:
    """:func:`embedding_statistic` on B resamples at once (``weights`` (B, rows): times each row is drawn)."""
    if kind == "retrieval":
        total = weights.sum(1)
        return {c: weights @ records[c].to_numpy(float) / total for c in records if c.startswith("recall_")}
    if kind == "linear_probe":
        classes = sorted(set(records["label"].astype(str)) | set(records["predicted"].astype(str)))
        y = np.array([classes.index(v) for v in records["label"].astype(str)])
        predicted = np.eye(len(classes))[[classes.index(v) for v in records["predicted"].astype(str)]]
        found = ev.weighted_classification_metrics(y, predicted, weights)
        return {"linear_probe_balanced_accuracy": found["balanced_accuracy"],
                "linear_probe_accuracy": found["accuracy"]}
    return None
