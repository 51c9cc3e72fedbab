"""The scikit-learn baselines as methods like the others: fitted on the fold's training patients, they hand
the task per-patient results, which the task writes exactly as it writes a network's.

An estimator is ``fit(ctx) -> (results, info, extra)``: results of the evaluated patients, what the fit did
(``info``, reported under ``training``) and metrics of its own (``extra``, e.g. CCA's retrieval).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from wsiomics.train import evaluate as ev
from wsiomics.train.linear import PatientVectors, fit_logistic, gene_matrix, pooled_features
from wsiomics.train.roles import EVAL_ROLES, TRAIN_ROLES, VAL_ROLES, pretrain_roles
from wsiomics.train.tasks.base import StageContext

log = logging.getLogger(__name__)

Estimator = Callable[[StageContext], tuple[list[ev.PatientResult], dict[str, Any], dict[str, Any]]]
ESTIMATORS: dict[str, Estimator] = {}


def estimator(name: str) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return wrap


@estimator("sklearn_logistic")
def fit_linear(ctx: StageContext):
    """Logistic regression on mean-pooled patch features + genes (imputed and flagged when missing)."""
    method, data, dparams = ctx.method, ctx.data, ctx.dparams
    t0 = time.perf_counter()
    fit_patients = [p for p in data.role(*TRAIN_ROLES, *VAL_ROLES) if p.label in data.classes]
    vectors = PatientVectors(method.modalities)
    blocks = vectors.blocks(data, fit_patients, dparams)
    x = vectors.fit(blocks).transform(blocks)
    y = np.array([data.classes.index(p.label) for p in fit_patients])
    model = fit_logistic(x, y, ctx.seed)
    eval_patients = data.role(*EVAL_ROLES)
    x_eval = vectors.transform(vectors.blocks(data, eval_patients, dparams))
    probs = np.zeros((len(eval_patients), len(data.classes)))
    if len(eval_patients):
        probs[:, model.classes_] = model.predict_proba(x_eval)
    results = [ev.PatientResult(p, probs=probs[i]) for i, p in enumerate(eval_patients)]
    last = model[-1]
    c = float(np.atleast_1d(last.C_)[0]) if hasattr(last, "C_") else float(last.C)
    history = [{"epoch": 1, "C": c, "n_features": x.shape[1], "n_fit_patients": len(fit_patients)}]
    ev.write_history(ctx.out / "history.tsv", history, f"{method.name} fold {data.fold}")
    return results, {"seconds": time.perf_counter() - t0, "C": c, "fit_patients": len(fit_patients)}, {}


@estimator("sklearn_cca")
def fit_cca(ctx: StageContext):
    """Standardise + PCA per modality, then CCA, all fitted on the patients with both modalities that
    pretraining would use (``train.pretrain.pool``: ``train``, plus ``unlabelled`` under ``all``), so that the
    retrieval baseline aligns the same pairs MGI's pretraining does; never a val, test or heldout patient.

    Retrieval compares the test patients' canonical image and gene scores (cosine, as for MGI); the
    classification is a logistic regression on both score blocks (missing modality imputed with the
    training mean and flagged, as the linear baseline) fitted on train+val, so cca has predictions too.
    """
    from sklearn.cross_decomposition import CCA
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    method, data, dparams, seed = ctx.method, ctx.data, ctx.dparams, ctx.seed
    t0 = time.perf_counter()
    opts = {"pca_components": 16, "components": 4, **(ctx.cfg.get("cca") or {})}
    everyone = data.patients
    img = pooled_features(data, everyone, dparams)
    gene = gene_matrix(data, everyone)
    both = ~np.isnan(img).any(1) & ~np.isnan(gene).any(1)
    pool = pretrain_roles(str((ctx.cfg.get("pretrain") or {}).get("pool", "all")))
    fit = np.array([p.role in pool for p in everyone]) & both
    n_fit = int(fit.sum())
    if n_fit < 3 or not data.genes or not data.feature_dim:
        raise ValueError(f"cca fold {data.fold}: needs at least 3 training (or unlabelled) patients with slides and "
                         "expression "
                         f"(has {n_fit})")
    k_pca = int(max(1, min(opts["pca_components"], n_fit - 1, img.shape[1], gene.shape[1])))
    k = int(max(1, min(opts["components"], k_pca)))
    pre_img = make_pipeline(StandardScaler(), PCA(k_pca, random_state=seed)).fit(img[fit])
    pre_gene = make_pipeline(StandardScaler(), PCA(k_pca, random_state=seed)).fit(gene[fit])
    cca = CCA(n_components=k, max_iter=2000).fit(pre_img.transform(img[fit]), pre_gene.transform(gene[fit]))
    u = np.full((len(everyone), k), np.nan)
    v = np.full((len(everyone), k), np.nan)
    has_img, has_gene = ~np.isnan(img).any(1), ~np.isnan(gene).any(1)
    if has_img.any():
        u[has_img] = cca.transform(pre_img.transform(img[has_img]))
    if has_gene.any():  # the gene scores do not depend on X: a placeholder X gives them alone
        _, v[has_gene] = cca.transform(np.zeros((int(has_gene.sum()), k_pca)), pre_gene.transform(gene[has_gene]))
    test = [i for i, p in enumerate(everyone) if p.role == "test" and both[i]]
    metrics: dict[str, Any] = ev.retrieval_metrics(u[test], v[test],
                                                   patient_ids=[everyone[i].patient_id for i in test])
    heldout = [i for i, p in enumerate(everyone) if p.role == "heldout" and both[i]]
    if heldout:
        metrics["retrieval_heldout"] = ev.retrieval_metrics(u[heldout], v[heldout])
    # classification on the canonical scores
    labelled = [i for i, p in enumerate(everyone) if p.role in (*TRAIN_ROLES, *VAL_ROLES) and p.label in data.classes]
    eval_idx = [i for i, p in enumerate(everyone) if p.role in EVAL_ROLES]
    probs: np.ndarray | None = None  # a cohort with fewer than two classes: retrieval only, no predictions
    if len(data.classes) >= 2:
        vectors = PatientVectors(("image", "gene"))
        blocks = {"image": u, "gene": v}
        vectors.fit({n: b[labelled] for n, b in blocks.items()})
        x = vectors.transform(blocks)
        y = np.array([data.classes.index(everyone[i].label) for i in labelled])
        probs = np.zeros((len(eval_idx), len(data.classes)))
        if len(set(y)) >= 2:
            clf = fit_logistic(x[labelled], y, seed)
            if eval_idx:
                probs[:, clf.classes_] = clf.predict_proba(x[eval_idx])
        else:
            probs[:] = 1.0 / len(data.classes)
    else:
        log.warning("cca fold %d: the cohort has fewer than two classes (%s): retrieval only, no predictions",
                    data.fold, data.classes)
    results = [ev.PatientResult(everyone[i], probs=None if probs is None else probs[j],
                                embeddings={"image": u[i], "gene": v[i]}) for j, i in enumerate(eval_idx)]
    corr = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(u[fit].T, v[fit].T, strict=True)]
    history = [{"epoch": 1, "pca_components": k_pca, "components": k, "n_fit_patients": n_fit,
                "train_canonical_corr_1": corr[0]}]
    ev.write_history(ctx.out / "history.tsv", history, f"{method.name} fold {data.fold}")
    info = {"seconds": time.perf_counter() - t0, "pca_components": k_pca, "components": k, "fit_patients": n_fit,
            "train_canonical_correlations": corr}
    return results, info, metrics


@estimator("sklearn_coxph")
def fit_coxph(ctx: StageContext):
    """Ridge-penalised Cox model (scikit-survival) on PCA scores of mean-pooled patch features + genes (missing
    modality imputed and flagged), fitted on the train+val patients with follow-up; the penalty by inner 3-fold
    cross-validation of Harrell's c-index. Every patient gets a risk (the task reports the evaluated ones)."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    method, data, dparams, seed = ctx.method, ctx.data, ctx.dparams, ctx.seed
    t0 = time.perf_counter()
    opts = {"pca_components": 16, "alphas": [0.1, 1.0, 10.0, 100.0], **(ctx.cfg.get("coxph") or {})}
    everyone = data.patients
    fit_patients = [p for p in data.role(*TRAIN_ROLES, *VAL_ROLES) if p.outcome is not None]
    vectors = PatientVectors(method.modalities)
    blocks = vectors.blocks(data, fit_patients, dparams)
    x = vectors.fit(blocks).transform(blocks)
    y = Surv.from_arrays(event=np.array([p.outcome[1] == 1 for p in fit_patients]),
                         time=np.array([float(p.outcome[0]) for p in fit_patients]))
    inner_fit = len(fit_patients) - -(-len(fit_patients) // 3)  # patients fitting each inner fold
    k = int(max(1, min(opts["pca_components"], inner_fit - 1, x.shape[1])))
    pipeline = make_pipeline(StandardScaler(), PCA(k, random_state=seed), CoxPHSurvivalAnalysis())
    search = GridSearchCV(pipeline, {"coxphsurvivalanalysis__alpha": list(opts["alphas"])},
                          cv=KFold(3, shuffle=True, random_state=seed)).fit(x, y)
    model = search.best_estimator_
    risks = model.predict(vectors.transform(vectors.blocks(data, everyone, dparams)))
    results = [ev.PatientResult(p, risk=float(risks[i])) for i, p in enumerate(everyone)]
    alpha = float(search.best_params_["coxphsurvivalanalysis__alpha"])
    history = [{"epoch": 1, "alpha": alpha, "pca_components": k, "n_fit_patients": len(fit_patients),
                "inner_cv_c_index": float(search.best_score_)}]
    ev.write_history(ctx.out / "history.tsv", history, f"{method.name} fold {data.fold}")
    info = {"seconds": time.perf_counter() - t0, "alpha": alpha, "pca_components": k,
            "fit_patients": len(fit_patients)}
    return results, info, {}
