"""The two training stages as functions: pretrain a method's encoders, then fine-tune and evaluate it.

Both take the same inputs (folds table, slide table, feature stores, the fold's expression) and a method's
resolved configuration, and write atomically into ``results/models/<method>/fold<k>/``. What differs between
tasks (targets, head size, objective, evaluation, output files) is the task's (:mod:`wsiomics.train.tasks`);
what differs between a network and a scikit-learn baseline is how it is fitted (:func:`fit_network`, or an
estimator of :mod:`wsiomics.train.estimators`). The fine-tune is one path for every method:
``task.prepare`` -> fit -> ``task.write``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from wsiomics.datasets import DatasetParams, FoldData, load_fold
from wsiomics.models.batch import Batch
from wsiomics.models.ensemble import MeanEnsemble
from wsiomics.samplers import ClassBalancedBatches
from wsiomics.train import evaluate as ev
from wsiomics.train.build import MGI_ENCODER_KEYS, build_model, resolve_fold_settings
from wsiomics.train.embedding_evaluation import evaluate_embeddings, pretrained_metrics, top_level
from wsiomics.train.estimators import ESTIMATORS
from wsiomics.train.fingerprint import data_fingerprint
from wsiomics.train.loop import OptimParams, clear_state, fit, load_model_state, resolve_device, save_model
from wsiomics.train.methods import Method, deep_merge, get_method, pretrained_source
from wsiomics.train.roles import TRAIN_ROLES, UNLABELLED_ROLES, VAL_ROLES, pretrain_roles
from wsiomics.train.tasks import StageContext, Task, get_task

log = logging.getLogger(__name__)

SELECT = ("val", "last")


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


def fold_context(method: Method, cfg: dict[str, Any], data: FoldData, out_dir: str | Path, stage: str,
                 pretrained: str | Path | None = None, inputs: dict[str, Any] | None = None) -> StageContext:
    """One method's ``stage`` (``pretrain`` or ``finetune``) on ``data``'s fold, set up exactly as the training
    stages set it up: the stage's configuration (:func:`stage_config`, fold-size settings resolved by
    :func:`~wsiomics.train.build.resolve_fold_settings`), the fold's seed (``seed + 1000 * fold``)
    and dataset parameters, the device and thread count. The public way for other code (few-shot, deployment)
    to rebuild a fold's run: with :func:`initial_model` it gives the fold's network as the stage starts it.
    ``pretrained``: the checkpoint the stage starts from; ``inputs``: the task's inputs (sheet, annotations)."""
    torch.set_num_threads(int(cfg.get("threads", 2)))
    device = resolve_device(str(cfg.get("device", "auto")))
    return StageContext(method=method, cfg=resolve_fold_settings(stage_config(cfg, stage), data), data=data,
                        out=Path(out_dir), device=device, seed=int(cfg["seed"]) + 1000 * data.fold,
                        dparams=data_params(cfg, data.fold), pretrained=Path(pretrained) if pretrained else None,
                        inputs=dict(inputs or {}))


def _loaders(data: FoldData, cfg: dict[str, Any], dparams: DatasetParams, seed: int, stage: str = ""):
    """Train and val loaders; a stage's own ``batch_size`` (``train.pretrain.batch_size``) wins over
    ``train.data.batch_size`` (contrastive pretraining wants more negatives per batch than fine-tuning).
    With the stage's ``classes_per_batch`` P (and label positives), training batches are class-balanced:
    P classes x batch_size / P patients (:class:`ClassBalancedBatches`). Training batches are drawn from the
    patients of ``data.fit_roles`` (pretraining: ``train.pretrain.pool``). ``batch_size: all``: one batch of
    every training patient per step (the survival fine-tunes: a Cox partial likelihood ranks each event against
    its whole risk set, which a batch of 4 patients with 1-2 events reduces to noise)."""
    section = cfg.get(stage) or {}
    workers = int(cfg.get("num_workers", 0))
    train_set = data.dataset(data.fit_roles, dparams, train=True)
    given = section.get("batch_size") or cfg["data"]["batch_size"]
    bs = max(1, len(train_set)) if given == "all" else int(given)
    train = data.loader(train_set, bs, shuffle=True, num_workers=workers, seed=seed,
                        batch_sampler=_balanced_batches(train_set, section, cfg["model"], bs, seed))
    val_set = data.dataset(VAL_ROLES, dparams, train=False)
    val = data.loader(val_set, bs, shuffle=False) if len(val_set) else None
    return train, val


def _balanced_batches(dataset, section: dict[str, Any], model_cfg: dict[str, Any], batch_size: int,
                      seed: int) -> ClassBalancedBatches | None:
    per_batch = int(section.get("classes_per_batch") or 0)
    if per_batch <= 0 or model_cfg.get("positives", "label") != "label":
        return None
    if batch_size < 2 * per_batch:
        raise ValueError(f"classes_per_batch is {per_batch} but batch_size is {batch_size}: a class-balanced batch "
                         "needs at least 2 patients per class; raise batch_size to a multiple of classes_per_batch")
    labels = [dataset.class_index.get(p.label, -1) for p in dataset.patients]
    return ClassBalancedBatches(labels, per_batch, batch_size // per_batch, seed)


def stage_config(cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """``cfg`` with the stage's own ``model`` settings (``train.finetune.model``, say) merged over
    ``train.model``: settings that differ between pretraining and fine-tuning, such as dropout. Settings
    that shape the encoders must not differ, or the pretrained weights do not load."""
    override = (cfg.get(stage) or {}).get("model") or {}
    return deep_merge(cfg, {"model": override}) if override else cfg


def _optim(section: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A pretrain/finetune section -> (OptimParams settings, select on val?).

    ``select: val`` (default) early-stops on, and keeps the weights best on, the ``val`` patients;
    ``select: last`` trains every epoch and keeps the last weights (for losses too noisy on a small
    val set to pick by, such as InfoNCE over a handful of pairs). Keys a task reads itself
    (``label_smoothing``) and those read elsewhere (``batch_size``, ``classes_per_batch``, ``model``,
    ``pool``, ``members``) are not optimiser settings."""
    optim = dict(section)
    for key in ("batch_size", "classes_per_batch", "model", "label_smoothing", "pool", "members"):
        optim.pop(key, None)
    select = str(optim.pop("select", "val"))
    if select not in SELECT:
        raise ValueError(f"select is {select!r}; choose one of {', '.join(SELECT)}")
    return optim, select == "val"


def state_key(cfg: dict[str, Any], data: FoldData, pretrained: str | Path | None = None) -> dict[str, Any]:
    """What a saved training state must match to be resumed: the settings and the data (fingerprint)."""
    return {**cfg, "data_fingerprint": data_fingerprint(data, pretrained)}


def pretrain_objective(model: torch.nn.Module, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return model.pretrain_loss(batch, gen)


def _metadata(method: Method, cfg: dict[str, Any], data: FoldData, stage: str, **extra) -> dict[str, Any]:
    return {"method": method.name, "stage": stage, "fold": data.fold, "config": cfg, "classes": data.classes,
            "genes": data.genes, "feature_dim": data.feature_dim, "gene_groups": data.gene_groups,
            "train_patients": [p.patient_id for p in data.role(*data.fit_roles)],
            "val_patients": [p.patient_id for p in data.role(*VAL_ROLES)], **extra}


def pretrain(method_name: str, cfg: dict[str, Any], data: FoldData, out_dir: str | Path) -> dict[str, Any]:
    """Pretrain a method's model on the fold's train patients, plus its unlabelled patients under
    ``train.pretrain.pool: all`` (early stopping on val; never a val, test or heldout patient); writes
    ``pretrain/model.pt``, ``pretrain/history.tsv``, ``pretrain/loss_curve.png``, ``pretrain/metrics.json``
    (retrieval and linear probe of the pretrained embeddings) and ``pretrain/embeddings.zarr``."""
    method = get_method(method_name)
    if not method.pretrain:
        raise ValueError(f"method {method.name} has no pretraining stage")
    pool = str((cfg.get("pretrain") or {}).get("pool", "all"))
    data = replace(data, fit_roles=pretrain_roles(pool))
    n_train, n_unlabelled = len(data.role(*TRAIN_ROLES)), len(data.role(*UNLABELLED_ROLES))
    log.info("pretraining (pool %s) on %d patients: %d train, the fold's %d unlabelled patients %s", pool,
             len(data.role(*data.fit_roles)), n_train, n_unlabelled,
             "too" if UNLABELLED_ROLES[0] in data.fit_roles else "left out")
    ctx = fold_context(method, cfg, data, out_dir, "pretrain")
    cfg, out, seed = ctx.cfg, ctx.out, ctx.seed
    torch.manual_seed(seed)
    model = build_model(method, cfg, data)
    train_loader, val_loader = _loaders(data, cfg, ctx.dparams, seed, "pretrain")
    optim, select_val = _optim(cfg["pretrain"])
    val_loader = val_loader if select_val else None
    t0 = time.perf_counter()
    state_path = out / ".state" / "pretrain.pt"
    result = fit(model, pretrain_objective, train_loader, val_loader, _dataclass(OptimParams, optim), state_path,
                 state_key(cfg, data), ctx.device, seed, desc=f"{method.name} fold{data.fold} pretrain")
    seconds = time.perf_counter() - t0
    ev.write_history(out / "pretrain" / "history.tsv", result.history,
                     f"{method.name} fold {data.fold}: pretraining")
    info = {"best_epoch": result.best_epoch, "seconds": seconds, "epochs": len(result.history), "pool": pool,
            "train_patients": n_train, "unlabelled_patients": n_unlabelled}
    metrics, results = evaluate_embeddings(model, data, ctx.device, ctx.dparams, seed, retrieval=method.retrieval)
    ev.write_embeddings(out / "pretrain" / "embeddings.zarr", results,
                        {"method": method.name, "fold": data.fold, "stage": "pretrain"})
    ev.write_json(out / "pretrain" / "metrics.json", {"method": method.name, "fold": data.fold, "stage": "pretrain",
                                                       **metrics, "training": info})
    save_model(out / "pretrain" / "model.pt", model,
               _metadata(method, cfg, data, "pretrain", best_epoch=result.best_epoch, seconds=seconds))
    clear_state(state_path)
    return info


def finetune(method_name: str, cfg: dict[str, Any], data: FoldData, out_dir: str | Path,
             pretrained: str | Path | None = None, **inputs: Any) -> dict[str, Any]:
    """Fine-tune (or, for the scikit-learn baselines, fit) and evaluate on the fold's test patients.

    ``inputs``: what the method's task reads besides the fold's data (segmentation: ``samples``, the sheet
    with its annotation_path column, or ``annotations``, slide_id -> tumour GeoJSON)."""
    method = get_method(method_name)
    task = get_task(method.task)
    ctx = fold_context(method, cfg, data, out_dir, "finetune", pretrained, inputs)
    ctx.data = task.prepare(ctx)
    if method.is_sklearn:
        results, info, extra = ESTIMATORS[method.model](ctx)
        task.write(ctx, results, info, extra)
        return info
    return fit_network(task, ctx)


def initial_model(ctx: StageContext) -> tuple[torch.nn.Module, dict[str, Any], bool]:
    """The method's network as the stage of ``ctx`` (:func:`fold_context`) starts it: initialised from its
    pretraining checkpoint when it has one (its own: every tensor; another method's, such as mgi_seg from mgi:
    the encoders, shaped by the checkpoint's settings). Returns the model, the configuration it was built from,
    and whether it was initialised from a checkpoint."""
    method, cfg = ctx.method, ctx.cfg
    source = pretrained_source(method)
    state = None
    if source:
        if ctx.pretrained is None:
            raise ValueError(f"method {method.name} fine-tunes from {source}'s pretrained checkpoint; "
                             "pass --pretrained")
        state = load_model_state(ctx.pretrained)
        if source != method.name:  # encoders as pretrained, whatever this method's own settings
            pre_model = state["metadata"]["config"]["model"]
            cfg = deep_merge(cfg, {"model": {k: pre_model[k] for k in MGI_ENCODER_KEYS if k in pre_model}})
    torch.manual_seed(ctx.seed)
    model = build_model(method, cfg, ctx.data)
    if state is not None:
        if source == method.name:
            model.load_state_dict(state["model"])
            log.info("initialised from %s (pretrained %s epochs)", ctx.pretrained, state["metadata"].get("best_epoch"))
        else:
            loaded = (model.load_pretrained(state["model"]) if hasattr(model, "load_pretrained")
                      else load_encoders(model, state["model"]))
            log.info("initialised %d encoder tensors from %s", len(loaded), ctx.pretrained)
    return model, cfg, state is not None


def load_encoders(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of ``state`` whose name and shape this model shares (another method's checkpoint of
    the same network with another head, such as gimp's for gimp_survival); each encoder parameter must be
    among them. Returns the names loaded."""
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)]
    encoder = {id(p) for p in model.encoder_parameters()} if hasattr(model, "encoder_parameters") else set()
    missing = [name for name, p in model.named_parameters() if id(p) in encoder and name not in loaded]
    if missing:
        raise ValueError(f"the pretrained checkpoint does not fit this network's encoders: {missing[:5]} missing or "
                         "of another shape; pretrain with the same train.model settings")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return loaded


def fit_network(task: Task, ctx: StageContext) -> dict[str, Any]:
    """Train the method's network on the task's objective, evaluate it and write the task's outputs.

    ``finetune.members: K`` (default 1) trains K networks alike from seeds ``seed + 100 k`` and evaluates the
    average of their outputs (:class:`MeanEnsemble`); member 0 is the network of ``members: 1``, and
    ``history.tsv`` and the embedding evaluations are its."""
    method, data, out = ctx.method, ctx.data, ctx.out
    members = int(ctx.cfg["finetune"].get("members", 1))
    if members < 1:
        raise ValueError(f"train.finetune.members is {members}; use at least 1")
    nets, seconds, state_paths = [], 0.0, []
    for k in range(members):
        member = ctx if k == 0 else replace(ctx, seed=ctx.seed + 100 * k)
        model, built, initialised = initial_model(member)
        if k == 0:
            cfg, pre_metrics = built, {}
            if task.embedding_evaluations and method.pretrain:
                pre_metrics = pretrained_metrics(ctx.pretrained)
            elif task.embedding_evaluations and method.retrieval:  # the same evaluation, of the random initial network
                pre_metrics, _ = evaluate_embeddings(model, data, ctx.device, ctx.dparams, ctx.seed, retrieval=True)
                pre_metrics["stage"] = "initial (random) weights"
        optim, select_val = _optim(cfg["finetune"])
        if not initialised:
            optim["encoder_lr_scale"] = 1.0  # nothing pretrained to protect
        fit_data = task.training_data(member)
        train_loader, val_loader = _loaders(fit_data, cfg, ctx.dparams, member.seed, "finetune")
        val_loader = val_loader if select_val else None
        t0 = time.perf_counter()
        state_paths.append(out / ".state" / ("finetune.pt" if k == 0 else f"finetune_member{k}.pt"))
        result = fit(model, task.objective(ctx), train_loader, val_loader, _dataclass(OptimParams, optim),
                     state_paths[-1], state_key(cfg, data, ctx.pretrained), ctx.device, member.seed,
                     desc=f"{method.name} fold{data.fold} {task.name}" + (f" member {k}" if k else ""))
        seconds += time.perf_counter() - t0
        if k == 0:
            ev.write_history(out / "history.tsv", result.history,
                             f"{method.name} fold {data.fold}: {task.history_title}")
            info = {"best_epoch": result.best_epoch, "epochs": len(result.history),
                    "stopped_early": result.stopped_early, "train_patients": len(fit_data.role(*TRAIN_ROLES))}
        nets.append(model)
    model = nets[0] if members == 1 else MeanEnsemble(nets)
    info = {**info, "seconds": seconds, **({"members": members} if members > 1 else {})}
    results = task.predict(model, ctx)
    task.write(ctx, results, info, top_level(pre_metrics))
    save_model(out / "model.pt", model, _metadata(method, cfg, data, "finetune", **info))
    for path in state_paths:
        clear_state(path)
    return info
