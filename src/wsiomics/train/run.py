"""The two training stages as functions: pretrain a method's encoders, then fine-tune and evaluate it.

Both take the same inputs (folds table, slide table, feature stores, the fold's expression) and a
method's resolved configuration, and write atomically into ``results/models/<method>/fold<k>/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
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
from wsiomics.train.methods import Method, get_method

log = logging.getLogger(__name__)

TRAIN_ROLES = ("train",)
VAL_ROLES = ("val",)
EVAL_ROLES = ("test", "heldout")


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


def _loaders(data: FoldData, cfg: dict[str, Any], dparams: DatasetParams, seed: int):
    bs = int(cfg["data"]["batch_size"])
    workers = int(cfg.get("num_workers", 0))
    train = data.loader(data.dataset(TRAIN_ROLES, dparams, train=True), bs, shuffle=True, num_workers=workers,
                        seed=seed)
    val_set = data.dataset(VAL_ROLES, dparams, train=False)
    val = data.loader(val_set, bs, shuffle=False) if len(val_set) else None
    return train, val


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
    torch.manual_seed(seed)
    model = build_model(method, cfg, data)
    train_loader, val_loader = _loaders(data, cfg, dparams, seed)
    t0 = time.perf_counter()
    optim = {k: v for k, v in cfg["pretrain"].items() if k != "label_smoothing"}
    result = fit(model, pretrain_objective, train_loader, val_loader, _dataclass(OptimParams, optim),
                 out / ".state" / "pretrain.pt", cfg, device, seed, desc=f"{method.name} fold{data.fold} pretrain")
    seconds = time.perf_counter() - t0
    write_history(out / "pretrain" / "history.tsv", result.history, f"{method.name} fold {data.fold}: pretraining")
    save_model(out / "pretrain" / "model.pt", model,
               _metadata(method, cfg, data, "pretrain", best_epoch=result.best_epoch, seconds=seconds))
    return {"best_epoch": result.best_epoch, "seconds": seconds, "epochs": len(result.history)}


def finetune(method_name: str, cfg: dict[str, Any], data: FoldData, out_dir: str | Path,
             pretrained: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune (or, for the scikit-learn baselines, fit) and evaluate on the fold's test patients."""
    method = get_method(method_name)
    device = _setup(cfg)
    out = Path(out_dir)
    seed = int(cfg["seed"]) + 1000 * data.fold
    dparams = data_params(cfg, data.fold)
    if method.is_sklearn:
        return _fit_sklearn(method, cfg, data, out, dparams, seed)
    torch.manual_seed(seed)
    model = build_model(method, cfg, data)
    if method.pretrain:
        if pretrained is None:
            raise ValueError(f"method {method.name} fine-tunes from its pretrained checkpoint; pass --pretrained")
        state = load_model_state(pretrained)
        model.load_state_dict(state["model"])
        log.info("initialised from %s (pretrained %s epochs)", pretrained, state["metadata"].get("best_epoch"))
    ft = dict(cfg["finetune"])
    smoothing = float(ft.pop("label_smoothing", 0.0))
    if not method.pretrain:
        ft["encoder_lr_scale"] = 1.0  # nothing pretrained to protect
    train_loader, val_loader = _loaders(data, cfg, dparams, seed)
    t0 = time.perf_counter()
    result = fit(model, classify_objective(smoothing), train_loader, val_loader, _dataclass(OptimParams, ft),
                 out / ".state" / "finetune.pt", {**cfg, "pretrained": str(pretrained)}, device, seed,
                 desc=f"{method.name} fold{data.fold} finetune")
    seconds = time.perf_counter() - t0
    write_history(out / "history.tsv", result.history, f"{method.name} fold {data.fold}: fine-tuning")
    results = ev.run_model(model, data, EVAL_ROLES, device, dparams)
    info = {"best_epoch": result.best_epoch, "epochs": len(result.history), "seconds": seconds,
            "stopped_early": result.stopped_early}
    _write_outputs(method, data, out, results, info)
    save_model(out / "model.pt", model, _metadata(method, cfg, data, "finetune", **info))
    return info


def _write_outputs(method: Method, data: FoldData, out: Path, results: list[ev.PatientResult],
                   info: dict[str, Any]) -> None:
    table = ev.predictions_table(results, data.fold, data.classes)
    metrics = ev.metrics_by_role(table, data.classes)
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
