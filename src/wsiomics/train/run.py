"""The two training stages as functions: pretrain a method's encoders, then fine-tune and evaluate it.

Both take the same inputs (folds table, slide table, feature stores, the fold's expression) and a
method's resolved configuration, and write atomically into ``results/models/<method>/fold<k>/``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from wsiomics.datasets import DatasetParams, FoldData, load_fold
from wsiomics.io import atomic_path
from wsiomics.models.batch import Batch
from wsiomics.train import evaluate as ev
from wsiomics.train.build import build_model
from wsiomics.train.linear import PatientVectors, fit_logistic
from wsiomics.train.loop import OptimParams, fit, load_model_state, resolve_device, save_model
from wsiomics.train.methods import Method, deep_merge, get_method, pretrained_source

log = logging.getLogger(__name__)

TRAIN_ROLES = ("train",)
VAL_ROLES = ("val",)
EVAL_ROLES = ("test", "heldout")
ALL_ROLES = (*TRAIN_ROLES, *VAL_ROLES, *EVAL_ROLES)
# What the evaluation of a pretrained model adds to the fine-tuned metrics.json (from pretrain/metrics.json).
PRETRAIN_KEYS = ("n_retrieval", "recall_i2g@1", "recall_i2g@5", "recall_g2i@1", "recall_g2i@5",
                 "linear_probe_balanced_accuracy", "linear_probe_accuracy", "n_linear_probe")


def _dataclass(cls, values: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings {sorted(unknown)}; allowed: {sorted(names)}")
    return cls(**values)


def data_params(cfg: dict[str, Any], fold: int) -> DatasetParams:
    d = cfg["data"]
    return DatasetParams(max_tokens=int(d["max_tokens"]), crop=str(d["crop"]), cache_mb=float(d["cache_mb"]),
                         seed=int(cfg["seed"]) + 1000 * fold)


def load_inputs(folds_path: str, samples: str | None, features: str | None, expression: str | None,
                fold: int, method: Method) -> FoldData:
    from wsiomics.samples import load_sample_sheet
    from wsiomics.samples import slides as slide_rows
    from wsiomics.splits import read_splits

    folds = read_splits(folds_path)
    slides = pd.DataFrame(columns=["patient_id", "slide_id"])
    if samples and features and "image" in method.modalities:
        slides = slide_rows(load_sample_sheet(samples)).reset_index()[["patient_id", "slide_id"]]
    feature_dir = features if "image" in method.modalities else None
    expr = expression if "gene" in method.modalities else None
    data = load_fold(folds, fold, slides, feature_dir, expr)
    n_img = sum(1 for p in data.patients if p.slides)
    n_gene = sum(1 for p in data.patients if p.genes is not None)
    log.info("fold %d: %d patients (%s), %d with slide features, %d with expression; classes %s", fold,
             len(data.patients), pd.Series([p.role for p in data.patients]).value_counts().to_dict(), n_img,
             n_gene, data.classes)
    return data


def _setup(cfg: dict[str, Any]) -> torch.device:
    torch.set_num_threads(int(cfg.get("threads", 2)))
    return resolve_device(str(cfg.get("device", "auto")))


def _loaders(data: FoldData, cfg: dict[str, Any], dparams: DatasetParams, seed: int, stage: str = ""):
    """Train and val loaders; a stage's own ``batch_size`` (``train.pretrain.batch_size``) wins over
    ``train.data.batch_size`` (contrastive pretraining wants more negatives per batch than fine-tuning)."""
    bs = int((cfg.get(stage) or {}).get("batch_size") or cfg["data"]["batch_size"])
    workers = int(cfg.get("num_workers", 0))
    train = data.loader(data.dataset(TRAIN_ROLES, dparams, train=True), bs, shuffle=True, num_workers=workers,
                        seed=seed)
    val_set = data.dataset(VAL_ROLES, dparams, train=False)
    val = data.loader(val_set, bs, shuffle=False) if len(val_set) else None
    return train, val


SELECT = ("val", "last")


def stage_config(cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """``cfg`` with the stage's own ``model`` settings (``train.finetune.model``, say) merged over
    ``train.model``: settings that differ between pretraining and fine-tuning, such as dropout. Settings
    that change parameter shapes would make the pretrained checkpoint fail to load."""
    override = (cfg.get(stage) or {}).get("model") or {}
    return deep_merge(cfg, {"model": override}) if override else cfg


def _optim(section: dict[str, Any]) -> tuple[dict[str, Any], float, bool]:
    """A pretrain/finetune section -> (OptimParams settings, label smoothing, select on val?).

    ``select: val`` (default) early-stops on, and keeps the weights best on, the ``val`` patients;
    ``select: last`` trains every epoch and keeps the last weights (for losses too noisy on a small
    val set to pick by, such as InfoNCE over a handful of pairs)."""
    optim = dict(section)
    optim.pop("batch_size", None)  # read by _loaders
    optim.pop("model", None)  # read by stage_config
    smoothing = float(optim.pop("label_smoothing", 0.0))
    select = str(optim.pop("select", "val"))
    if select not in SELECT:
        raise ValueError(f"select is {select!r}; choose one of {', '.join(SELECT)}")
    return optim, smoothing, select == "val"


def classify_objective(label_smoothing: float):
    def objective(model: torch.nn.Module, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = model(batch)
        valid = batch.labels >= 0
        if not valid.any():
            return {"loss": out.logits.sum() * 0.0}
        return {"loss": F.cross_entropy(out.logits[valid].float(), batch.labels[valid],
                                        label_smoothing=label_smoothing)}

    return objective


def pretrain_objective(model: torch.nn.Module, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return model.pretrain_loss(batch, gen)


def _metadata(method: Method, cfg: dict[str, Any], data: FoldData, stage: str, **extra) -> dict[str, Any]:
    return {"method": method.name, "stage": stage, "fold": data.fold, "config": cfg, "classes": data.classes,
            "genes": data.genes, "feature_dim": data.feature_dim, "gene_groups": data.gene_groups,
            "train_patients": [p.patient_id for p in data.role(*TRAIN_ROLES)],
            "val_patients": [p.patient_id for p in data.role(*VAL_ROLES)], **extra}


def write_history(path: Path, history: list[dict[str, float]], title: str) -> None:
    """history.tsv and a loss-curve PNG beside it."""
    table = pd.DataFrame(history)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    x = table["epoch"] if "epoch" in table else np.arange(len(table))
    for col in table.columns:
        if col.endswith("loss") and (col.startswith("train_") or col.startswith("val_")):
            ax.plot(x, table[col], label=col, linestyle="-" if col.startswith("train_") else "--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path.with_name(path.stem.replace("history", "loss_curve") + ".png")) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def pretrain(method_name: str, cfg: dict[str, Any], data: FoldData, out_dir: str | Path) -> dict[str, Any]:
    """Pretrain a method's model on the fold's train patients (early stopping on val); writes
    ``pretrain/model.pt``, ``pretrain/history.tsv``, ``pretrain/loss_curve.png``."""
    method = get_method(method_name)
    if not method.pretrain:
        raise ValueError(f"method {method.name} has no pretraining stage")
    device = _setup(cfg)
    out = Path(out_dir)
    seed = int(cfg["seed"]) + 1000 * data.fold
    dparams = data_params(cfg, data.fold)
    cfg = stage_config(cfg, "pretrain")
    torch.manual_seed(seed)
    model = build_model(method, cfg, data)
    train_loader, val_loader = _loaders(data, cfg, dparams, seed, "pretrain")
    optim, _, select_val = _optim(cfg["pretrain"])
    val_loader = val_loader if select_val else None
    t0 = time.perf_counter()
    result = fit(model, pretrain_objective, train_loader, val_loader, _dataclass(OptimParams, optim),
                 out / ".state" / "pretrain.pt", cfg, device, seed, desc=f"{method.name} fold{data.fold} pretrain")
    seconds = time.perf_counter() - t0
    write_history(out / "pretrain" / "history.tsv", result.history, f"{method.name} fold {data.fold}: pretraining")
    info = {"best_epoch": result.best_epoch, "seconds": seconds, "epochs": len(result.history)}
    metrics, results = evaluate_pretrained(model, data, device, dparams, seed, retrieval=method.retrieval)
    ev.write_embeddings(out / "pretrain" / "embeddings.zarr", results,
                        {"method": method.name, "fold": data.fold, "stage": "pretrain"})
    ev.write_json(out / "pretrain" / "metrics.json", {"method": method.name, "fold": data.fold, "stage": "pretrain",
                                                       **metrics, "training": info})
    save_model(out / "pretrain" / "model.pt", model,
               _metadata(method, cfg, data, "pretrain", best_epoch=result.best_epoch, seconds=seconds))
    return info


def evaluate_pretrained(model: torch.nn.Module, data: FoldData, device: torch.device, dparams: DatasetParams,
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
            found = ev.retrieval_metrics(img, gene)
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
    return out


def finetune(method_name: str, cfg: dict[str, Any], data: FoldData, out_dir: str | Path,
             pretrained: str | Path | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """Fine-tune (or, for the scikit-learn baselines, fit) and evaluate on the fold's test patients.

    annotations: slide_id -> tumour GeoJSON, for segmentation methods (:func:`annotation_paths`)."""
    method = get_method(method_name)
    if method.task == "classify" and method.model != "sklearn_cca":  # cca's retrieval needs no label
        require_classes(method, data)
    device = _setup(cfg)
    out = Path(out_dir)
    seed = int(cfg["seed"]) + 1000 * data.fold
    dparams = data_params(cfg, data.fold)
    if method.model == "sklearn_cca":
        return _fit_cca(method, cfg, data, out, dparams, seed)
    if method.is_sklearn:
        return _fit_sklearn(method, cfg, data, out, dparams, seed)
    cfg = stage_config(cfg, "finetune")
    if method.task == "segment":
        return finetune_segmentation(method, cfg, data, out, pretrained, annotations or {})
    torch.manual_seed(seed)
    model = build_model(method, cfg, data)
    pre_metrics: dict[str, Any] = {}
    if method.pretrain:
        if pretrained is None:
            raise ValueError(f"method {method.name} fine-tunes from its pretrained checkpoint; pass --pretrained")
        state = load_model_state(pretrained)
        model.load_state_dict(state["model"])
        log.info("initialised from %s (pretrained %s epochs)", pretrained, state["metadata"].get("best_epoch"))
        pre_metrics = _pretrain_metrics(pretrained)
    elif method.retrieval:  # the same retrieval evaluation, of the randomly initialised network
        pre_metrics, _ = evaluate_pretrained(model, data, device, dparams, seed, retrieval=True)
        pre_metrics["stage"] = "initial (random) weights"
    ft, smoothing, select_val = _optim(cfg["finetune"])
    if not method.pretrain:
        ft["encoder_lr_scale"] = 1.0  # nothing pretrained to protect
    train_loader, val_loader = _loaders(data, cfg, dparams, seed, "finetune")
    val_loader = val_loader if select_val else None
    t0 = time.perf_counter()
    result = fit(model, classify_objective(smoothing), train_loader, val_loader, _dataclass(OptimParams, ft),
                 out / ".state" / "finetune.pt", {**cfg, "pretrained": str(pretrained)}, device, seed,
                 desc=f"{method.name} fold{data.fold} finetune")
    seconds = time.perf_counter() - t0
    write_history(out / "history.tsv", result.history, f"{method.name} fold {data.fold}: fine-tuning")
    results = ev.run_model(model, data, EVAL_ROLES, device, dparams)
    info = {"best_epoch": result.best_epoch, "epochs": len(result.history), "seconds": seconds,
            "stopped_early": result.stopped_early}
    extra = {}
    if pre_metrics:  # retrieval and linear probe of the model before fine-tuning, at the top level too
        extra = {k: pre_metrics[k] for k in PRETRAIN_KEYS if k in pre_metrics}
        extra["pretrain"] = {k: v for k, v in pre_metrics.items() if k not in ("method", "fold")}
    _write_outputs(method, data, out, results, info, extra)
    save_model(out / "model.pt", model, _metadata(method, cfg, data, "finetune", **info))
    return info


def require_classes(method: Method, data: FoldData) -> None:
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


def _pretrain_metrics(pretrained: str | Path) -> dict[str, Any]:
    """pretrain/metrics.json beside a pretrained checkpoint ({} when absent, e.g. a checkpoint from elsewhere)."""
    path = Path(pretrained).with_name("metrics.json")
    if not path.exists():
        log.warning("%s: no metrics.json beside the pretrained checkpoint; retrieval metrics not reported", pretrained)
        return {}
    with open(path) as f:
        return json.load(f)


def _write_outputs(method: Method, data: FoldData, out: Path, results: list[ev.PatientResult],
                   info: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    table = ev.predictions_table(results, data.fold, data.classes)
    metrics = ev.metrics_by_role(table, data.classes)
    metrics.update(extra or {})
    metrics.update({"method": method.name, "fold": data.fold, "classes": data.classes, "training": info})
    ev.write_predictions(out / "predictions.tsv", table)
    attrs = {"method": method.name, "fold": data.fold}
    ev.write_embeddings(out / "embeddings.zarr", results, attrs)
    (out / "attention").mkdir(parents=True, exist_ok=True)
    ev.write_tile_maps(out / "attention", results, "attention", "attention", attrs)
    ev.write_json(out / "metrics.json", metrics)
    log.info("%s fold %d test: %s", method.name, data.fold,
             {k: metrics.get(k) for k in ("balanced_accuracy", "accuracy", "auc_macro", "f1_macro", "n_test")})


def _fit_sklearn(method: Method, cfg: dict[str, Any], data: FoldData, out: Path, dparams: DatasetParams,
                 seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    fit_patients = [p for p in data.role(*TRAIN_ROLES, *VAL_ROLES) if p.label in data.classes]
    vectors = PatientVectors(method.modalities)
    blocks = vectors.blocks(data, fit_patients, dparams)
    x = vectors.fit(blocks).transform(blocks)
    y = np.array([data.classes.index(p.label) for p in fit_patients])
    model = fit_logistic(x, y, seed)
    eval_patients = data.role(*EVAL_ROLES)
    x_eval = vectors.transform(vectors.blocks(data, eval_patients, dparams))
    probs = np.zeros((len(eval_patients), len(data.classes)))
    if len(eval_patients):
        probs[:, model.classes_] = model.predict_proba(x_eval)
    results = [ev.PatientResult(p, probs=probs[i]) for i, p in enumerate(eval_patients)]
    estimator = model[-1]
    c = float(np.atleast_1d(estimator.C_)[0]) if hasattr(estimator, "C_") else float(estimator.C)
    history = [{"epoch": 1, "C": c, "n_features": x.shape[1], "n_fit_patients": len(fit_patients)}]
    write_history(out / "history.tsv", history, f"{method.name} fold {data.fold}")
    info = {"seconds": time.perf_counter() - t0, "C": c, "fit_patients": len(fit_patients)}
    _write_outputs(method, data, out, results, info)
    return info


# ---------------------------------------------------------------- CCA: the linear baseline for retrieval


def _fit_cca(method: Method, cfg: dict[str, Any], data: FoldData, out: Path, dparams: DatasetParams,
             seed: int) -> dict[str, Any]:
    """Standardise + PCA per modality, then CCA, all fitted on the ``train`` patients with both modalities.

    Retrieval compares the test patients' canonical image and gene scores (cosine, as for MGI); the
    classification is a logistic regression on both score blocks (missing modality imputed with the
    training mean and flagged, as the linear baseline) fitted on train+val, so cca has predictions too.
    """
    from sklearn.cross_decomposition import CCA
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wsiomics.train.linear import gene_matrix, pooled_features

    t0 = time.perf_counter()
    opts = {"pca_components": 16, "components": 4, **(cfg.get("cca") or {})}
    everyone = data.patients
    img = pooled_features(data, everyone, dparams)
    gene = gene_matrix(data, everyone)
    both = ~np.isnan(img).any(1) & ~np.isnan(gene).any(1)
    fit = np.array([p.role in TRAIN_ROLES for p in everyone]) & both
    n_fit = int(fit.sum())
    if n_fit < 3 or not data.genes or not data.feature_dim:
        raise ValueError(f"cca fold {data.fold}: needs at least 3 training patients with slides and expression "
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
    results = [ev.PatientResult(p, embeddings={"image": u[i], "gene": v[i]}) for i, p in enumerate(everyone)]
    test = [i for i, p in enumerate(everyone) if p.role == "test" and both[i]]
    metrics: dict[str, Any] = ev.retrieval_metrics(u[test], v[test])
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
    eval_results = [ev.PatientResult(everyone[i], probs=None if probs is None else probs[j],
                                     embeddings=results[i].embeddings) for j, i in enumerate(eval_idx)]
    corr = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(u[fit].T, v[fit].T, strict=True)]
    history = [{"epoch": 1, "pca_components": k_pca, "components": k, "n_fit_patients": n_fit,
                "train_canonical_corr_1": corr[0]}]
    write_history(out / "history.tsv", history, f"{method.name} fold {data.fold}")
    info = {"seconds": time.perf_counter() - t0, "pca_components": k_pca, "components": k, "fit_patients": n_fit,
            "train_canonical_correlations": corr}
    _write_outputs(method, data, out, eval_results, info, metrics)
    return info


# ---------------------------------------------------------------- tumour segmentation


def annotation_paths(samples: str | Path) -> dict[str, str]:
    """slide_id -> annotation_path (absolute) for the sheet's slides that have one."""
    from wsiomics.samples import load_sample_sheet
    from wsiomics.samples import slides as slide_rows

    table = slide_rows(load_sample_sheet(samples))
    return {str(sid): str(path) for sid, path in table["annotation_path"].items() if path}


def attach_tumour_labels(data: FoldData, annotations: dict[str, str], params=None) -> dict[str, Any]:
    """Set each annotated slide's per-tile targets (raster order) from its GeoJSON; returns a small report.

    Tiles are the feature store's ``coords`` with side ``patch_size_level0``; a slide without an
    annotation keeps ``targets`` None (skipped by segmentation training and evaluation).
    """
    import zarr

    from wsiomics.annotations import AnnotationParams, read_annotation, tile_labels

    params = params or AnnotationParams()
    report: dict[str, Any] = {"annotated": [], "unannotated": [], "tumour_tiles": 0, "tiles": 0, "geometry": {}}
    for patient in data.patients:
        for slide in patient.slides:
            path = annotations.get(slide.slide_id)
            if not path:
                report["unannotated"].append(slide.slide_id)
                continue
            root = zarr.open_group(slide.store, mode="r")
            coords = root["coords"][:]
            step = float(root.attrs["patch_size_level0"])
            tumour = read_annotation(path, params).tumour
            labels = tile_labels(coords, step, tumour, params.min_fraction)
            report["geometry"][slide.slide_id] = tumour
            slide.targets = labels[slide.order]  # stored rows -> raster order
            report["annotated"].append(slide.slide_id)
            report["tumour_tiles"] += int(labels.sum())
            report["tiles"] += len(labels)
    log.info("fold %d: %d slides with tumour labels (%d of %d tiles tumour), %d without annotation", data.fold,
             len(report["annotated"]), report["tumour_tiles"], report["tiles"], len(report["unannotated"]))
    return report


def segmentation_objective(model: torch.nn.Module, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return model.segmentation_loss(batch)


def _annotated(patient) -> bool:
    return any(s.targets is not None for s in patient.slides)


def finetune_segmentation(method: Method, cfg: dict[str, Any], data: FoldData, out: Path,
                          pretrained: str | Path | None, annotations: dict[str, str]) -> dict[str, Any]:
    """Train the tumour segmenter on annotated train slides (early stop on annotated val slides); write a
    tumour map per test slide (``tumour/<slide_id>.zarr`` + ``.png``) and Dice in ``metrics.json``."""
    from wsiomics.annotations import params_from_config, polygon_rings
    from wsiomics.train.build import MGI_ENCODER_KEYS

    device = _setup(cfg)
    seed = int(cfg["seed"]) + 1000 * data.fold
    dparams = data_params(cfg, data.fold)
    seg = dict(cfg.get("segmentation") or {})
    threshold = float(seg.get("threshold", 0.5))
    geometry = attach_tumour_labels(data, annotations, params_from_config(seg))["geometry"]
    # Train/val on patients with at least one annotated slide; unannotated slides of theirs have NaN targets.
    fit_data = replace(data, patients=[p for p in data.patients
                                       if p.role in EVAL_ROLES or (p.role in (*TRAIN_ROLES, *VAL_ROLES) and
                                                                    _annotated(p))])
    n_train = len([p for p in fit_data.role(*TRAIN_ROLES)])
    if n_train == 0:
        raise ValueError(f"{method.name} fold {data.fold}: no training patient has an annotated slide; segmentation "
                         "needs tumour GeoJSON files in the sheet's annotation_path column")
    build_cfg, state = cfg, None
    source = pretrained_source(method)
    if source:
        if pretrained is None:
            raise ValueError(f"method {method.name} fine-tunes from {source}'s pretrained checkpoint; "
                             "pass --pretrained")
        state = load_model_state(pretrained)
        pre_model = state["metadata"]["config"]["model"]  # encoders as pretrained, whatever this method's config
        build_cfg = deep_merge(cfg, {"model": {k: pre_model[k] for k in MGI_ENCODER_KEYS if k in pre_model}})
    torch.manual_seed(seed)
    model = build_model(method, build_cfg, data)
    if state is not None:
        loaded = model.load_pretrained(state["model"])
        log.info("initialised %d encoder tensors from %s", len(loaded), pretrained)
    ft, _, select_val = _optim(cfg["finetune"])
    if state is None:
        ft["encoder_lr_scale"] = 1.0
    train_loader, val_loader = _loaders(fit_data, build_cfg, dparams, seed, "finetune")
    val_loader = val_loader if select_val else None
    t0 = time.perf_counter()
    result = fit(model, segmentation_objective, train_loader, val_loader, _dataclass(OptimParams, ft),
                 out / ".state" / "finetune.pt", {**build_cfg, "pretrained": str(pretrained)}, device, seed,
                 desc=f"{method.name} fold{data.fold} segmentation")
    seconds = time.perf_counter() - t0
    write_history(out / "history.tsv", result.history, f"{method.name} fold {data.fold}: segmentation")

    results = [r for r in ev.run_model(model, data, EVAL_ROLES, device, dparams) if r.patient.slides]
    for r in results:
        r.tile_scores = [1.0 / (1.0 + np.exp(-v.astype(np.float64))) for v in r.tile_scores]
    tumour_dir = out / "tumour"
    tumour_dir.mkdir(parents=True, exist_ok=True)
    attrs = {"method": method.name, "fold": data.fold, "threshold": threshold}
    ev.write_tile_maps(tumour_dir, results, "tiles", "tumour_prob", attrs)
    by_role: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"test": {}, "heldout": {}}
    skipped: dict[str, list[str]] = {"test": [], "heldout": []}
    for r in results:
        for slide, probs in zip(r.patient.slides, r.tile_scores, strict=True):
            if slide.targets is None:
                skipped[r.patient.role].append(slide.slide_id)
            else:
                by_role[r.patient.role][slide.slide_id] = (probs, slide.targets)
            stored = np.empty(slide.n_tokens)
            stored[slide.order] = probs
            coords = zarr_coords(slide.store)
            rings = polygon_rings(geometry[slide.slide_id]) if slide.slide_id in geometry else []
            dice = ""
            if slide.targets is not None:
                dice = f", Dice {ev.dice_score(probs >= threshold, slide.targets >= 0.5):.3f}"
            ev.write_tumour_heatmap(tumour_dir / f"{slide.slide_id}.png", coords, stored,
                                    _tile_size(slide.store), rings,
                                    f"{method.name} fold {data.fold}: {slide.slide_id}{dice}")
    metrics: dict[str, Any] = ev.segmentation_metrics(by_role["test"], threshold)
    metrics["skipped_slides"] = sorted(skipped["test"])
    if by_role["heldout"] or skipped["heldout"]:
        metrics["heldout"] = {**ev.segmentation_metrics(by_role["heldout"], threshold),
                              "skipped_slides": sorted(skipped["heldout"])}
    info = {"best_epoch": result.best_epoch, "epochs": len(result.history), "seconds": seconds,
            "stopped_early": result.stopped_early, "train_patients": n_train}
    metrics.update({"method": method.name, "fold": data.fold, "threshold": threshold, "training": info})
    ev.write_json(out / "metrics.json", metrics)
    save_model(out / "model.pt", model, _metadata(method, build_cfg, data, "finetune", **info))
    log.info("%s fold %d test: dice_mean %s, dice_pooled %s over %d slides; skipped %s", method.name, data.fold,
             metrics["dice_mean"], metrics["dice_pooled"], metrics["n_slides"], metrics["skipped_slides"])
    return info


def zarr_coords(store: str) -> np.ndarray:
    import zarr

    return zarr.open_array(f"{store}/coords", mode="r")[:]


def _tile_size(store: str) -> float:
    import zarr

    return float(zarr.open_group(store, mode="r").attrs["patch_size_level0"])
