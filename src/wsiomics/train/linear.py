"""The simple baselines every reviewer asks for, in scikit-learn, on the same patients and outputs.

Patient vector = mean of all patch features of all slides (+ genes); a missing modality is imputed with
the training mean and flagged by an indicator column. Everything fitted (imputation, scaling, the model,
its regularisation by inner cross-validation) sees training and validation patients only.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wsiomics.datasets import DatasetParams, FoldData, PatientRecord


def pooled_features(data: FoldData, patients: list[PatientRecord], params: DatasetParams) -> np.ndarray:
    """(P, D) mean patch feature per patient (NaN rows for patients without slides)."""
    dataset = data.dataset([], params, train=False)
    dataset.patients = patients
    out = np.full((len(patients), data.feature_dim), np.nan, dtype=np.float64)
    for i in range(len(patients)):
        item = dataset[i]
        if len(item.features):
            out[i] = np.asarray(item.features, dtype=np.float64).mean(0)
    return out


def gene_matrix(data: FoldData, patients: list[PatientRecord]) -> np.ndarray:
    out = np.full((len(patients), len(data.genes)), np.nan)
    for i, p in enumerate(patients):
        if p.genes is not None:
            out[i] = p.genes
    return out


class PatientVectors:
    """Image and gene blocks with training-mean imputation and presence indicators."""

    def __init__(self, modalities: tuple[str, ...]) -> None:
        self.modalities = modalities
        self.means: dict[str, np.ndarray] = {}

    def blocks(self, data: FoldData, patients: list[PatientRecord], params: DatasetParams) -> dict[str, np.ndarray]:
        out = {}
        if "image" in self.modalities and data.feature_dim:
            out["image"] = pooled_features(data, patients, params)
        if "gene" in self.modalities and data.genes:
            out["gene"] = gene_matrix(data, patients)
        return out

    def fit(self, blocks: dict[str, np.ndarray]) -> PatientVectors:
        for name, x in blocks.items():
            present = ~np.isnan(x).any(1)
            self.means[name] = x[present].mean(0) if present.any() else np.zeros(x.shape[1])
        return self

    def transform(self, blocks: dict[str, np.ndarray]) -> np.ndarray:
        cols = []
        for name, x in blocks.items():
            missing = np.isnan(x).any(1)
            filled = np.where(missing[:, None], self.means[name][None, :], x)
            cols += [filled, missing[:, None].astype(float)]
        return np.concatenate(cols, axis=1) if cols else np.zeros((0, 0))


def fit_logistic(x: np.ndarray, y: np.ndarray, seed: int, c_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)):
    """Standardise + L2 logistic regression, C chosen by stratified inner CV when every class allows it."""
    _, counts = np.unique(y, return_counts=True)
    n_splits = int(min(3, counts.min()))
    if n_splits >= 2:
        model = LogisticRegressionCV(Cs=list(c_grid), cv=StratifiedKFold(n_splits, shuffle=True, random_state=seed),
                                     max_iter=2000, scoring="balanced_accuracy", l1_ratios=(0.0,),
                                     use_legacy_attributes=False)
    else:
        model = LogisticRegression(C=c_grid[-1], max_iter=2000)
    return make_pipeline(StandardScaler(), model).fit(x, y)
