"""Deployment: a finished run's fold models applied to a new cohort (``python -m wsiomics.train predict``).

The new cohort's slides are tiled and featurised by the training run's encoder (the workflow's tiling and
feature rules, under ``results/deploy/<name>/``); its RNA is normalised with each fold's fitted transform
(genes, means and stds of that fold's training patients, ``uns['normalization']`` of ``fold<k>.zarr``),
never refitted on the new cohort. Every deploy patient is an evaluated (``test``) patient of every fold:

- a network method loads ``fold<k>/model.pt`` (weights + the configuration and shapes it was built from);
- a scikit-learn baseline (``linear``, ``cca``) saved no estimator: it is refitted, with the fold's seed, on
  exactly the fold's training patients (deterministic, so the same model the run evaluated) and applied.

A patient is predicted from what it has of the method's modalities (``modalities``: ``image+gene``, ``image``
or ``gene``); one with none of them (``image_only`` for a patient without slides) is listed with empty
probabilities and ``predicted`` (logged). The ensemble is the mean probability over the folds that predicted
the patient. Outputs (``out_dir`` = ``results/deploy/<name>/<method>``): ``predictions.tsv`` (ensemble),
``fold_predictions.tsv`` (one row per patient and fold, the same columns plus ``fold``), ``metrics.json``
(when the sheet has labels: ensemble and per-fold metrics, over all patients and per modality set) and
``attention/fold<k>/<slide_id>.zarr`` (network methods with attention).

A segmentation method (``mgi_seg``, ``image_seg``) maps tumour on every deploy slide instead
(:func:`predict_tumour`): the ensemble tumour probability per tile (mean over the folds), written as the run's
fine-tune writes one fold's maps (``tumour/<slide_id>.zarr`` + ``.png``), ``tumour_slides.tsv`` (one row per
slide) and ``metrics.json`` (Dice of the ensemble and of each fold where the deploy sheet has annotations).
A survival network gives risks (:func:`predict_risks`): each fold's risk as a percentile of its fitted patients'
risks, the ensemble risk their mean (``risks.tsv``, ``fold_risks.tsv``, ``metrics.json`` with the c-index).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from wsiomics.datasets import DatasetError, FoldData, PatientRecord, read_slide_record
from wsiomics.train import evaluate as ev
from wsiomics.train.methods import Method, get_method
from wsiomics.train.roles import EVAL_ROLES

log = logging.getLogger(__name__)

MODALITY_SETS = ("image+gene", "image", "gene")


class DeployError(ValueError):
    """The new cohort cannot be scored by the run's models; the message names both sides and the fix."""


# ---------------------------------------------------------------- features: same encoder as the training run


def feature_identity(store: str | Path) -> dict[str, Any] | None:
    """What must match between a training and a deploy feature store: encoder, weights sha256 (``None`` for
    random weights, and for imported features: their sha256 is the source file's, so it is not compared),
    target um/px, feature width. None for a store without usable features."""
    try:
        root = zarr.open_group(str(store), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise DeployError(f"{store}: no feature store") from None
    attrs = dict(root.attrs)
    if attrs.get("status", "ok") != "ok" or "features" not in root:
        return None
    weights = attrs.get("weights") or {}
    return {"encoder": attrs.get("encoder"), "source": weights.get("source"),
            "weights_sha256": None if weights.get("source") == "imported" else weights.get("sha256"),
            "target_mpp": attrs.get("target_mpp"), "feature_dim": int(root["features"].shape[1])}


def training_identity(feature_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """The identity of the training run's features (its first usable store) and that store."""
    for store in sorted(Path(feature_dir).glob("*.zarr")):
        identity = feature_identity(store)
        if identity is not None:
            return identity, store
    raise DeployError(f"{feature_dir}: no usable training feature store; the run's image models need them")


def check_same_features(train: dict[str, Any], train_store: Path, deploy: dict[str, Any], deploy_store: Path) -> None:
    """Refuse deploy features made otherwise than the training run's (naming both values and stores)."""
    keys = ["encoder", "target_mpp", "feature_dim"]
    imported = (train["source"] == "imported", deploy["source"] == "imported")
    if not any(imported):
        keys.append("weights_sha256")  # random weights have none: None == None
    elif not all(imported):
        log.warning("weights of %s (%s) and %s (%s) cannot be compared: imported features carry no encoder "
                    "weights digest", train_store, train["source"], deploy_store, deploy["source"])
    for key in keys:
        a, b = train[key], deploy[key]
        same = (a is not None and b is not None and np.isclose(float(a), float(b))) if key == "target_mpp" else a == b
        if not same:
            raise DeployError(
                f"{key} differs: the deploy cohort's features {deploy_store} have {key} {b!r}, the training run's "
                f"{train_store} have {a!r}. The models only apply to features of the training run's encoder, "
                "weights and resolution: extract the new cohort's slides with the same features: and tiling: "
                "config (or import features made that way).")


# ---------------------------------------------------------------- the deploy cohort as evaluated patients


def deploy_patients(sheet: pd.DataFrame, features: str | Path | None) -> list[PatientRecord]:
    """Every patient of the (validated) deploy sheet as a ``test`` patient, with its usable slides."""
    from wsiomics.samples import patients as patient_rows
    from wsiomics.samples import slides as slide_rows

    pts = patient_rows(sheet)
    slides = slide_rows(sheet).reset_index()
    slides_of = slides.groupby("patient_id")["slide_id"].apply(sorted).to_dict() if len(slides) else {}
    out = []
    for pid in sorted(pts.index):
        record = PatientRecord(patient_id=str(pid), label=str(pts.loc[pid, "label"] or ""), role="test")
        if features is not None:
            for slide_id in slides_of.get(pid, []):
                slide = read_slide_record(slide_id, Path(features) / f"{slide_id}.zarr")
                if slide is not None:
                    record.slides.append(slide)
        out.append(record)
    return out


def check_deploy_features(patients: list[PatientRecord], train_features: str | Path) -> int:
    """Every deploy slide's store against the training run's; returns the feature width."""
    train, train_store = training_identity(train_features)
    for p in patients:
        for slide in p.slides:
            identity = feature_identity(slide.store)
            if identity is not None:
                check_same_features(train, train_store, identity, Path(slide.store))
    return int(train["feature_dim"])


def fold_genes(cohort, fold_store: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The deploy patients' expression z-scored by the fold's fitted transform (``uns['normalization']``:
    genes, means and stds of the fold's training patients), and the fold's gene metadata."""
    import anndata as ad

    from wsiomics.expression.normalize import apply_fitted
    from wsiomics.expression.readers import ExpressionInputError

    fold = ad.read_zarr(str(fold_store))
    fitted = fold.uns["normalization"]
    meta: dict[str, Any] = {"genes": list(fold.var_names)}
    if "gene_groups" in fold.var:
        meta["gene_groups"] = [str(g) for g in fold.var["gene_groups"]]
    if cohort is None or cohort.n_obs == 0:
        return pd.DataFrame(columns=meta["genes"], dtype=np.float32), meta
    try:
        z, _ = apply_fitted(cohort, None, fitted)
    except ExpressionInputError as e:
        raise DeployError(f"the deploy cohort's expression cannot take {fold_store}'s normalisation: {e} "
                          "(read the new cohort's RNA with the training run's expression: settings)") from None
    return pd.DataFrame(z.astype(np.float32), index=cohort.obs_names.astype(str), columns=meta["genes"]), meta


def modalities_used(patient: PatientRecord, method: Method) -> str:
    """``image+gene``, ``image``, ``gene``: what of the method's modalities the patient has ("" = none)."""
    have = [m for m, ok in (("image", bool(patient.slides)), ("gene", patient.genes is not None))
            if ok and m in method.modalities]
    return "+".join(have)


def with_genes(patients: list[PatientRecord], genes: pd.DataFrame) -> list[PatientRecord]:
    """Copies of ``patients`` carrying this fold's normalised expression (None where they have none)."""
    out = []
    for p in patients:
        values = genes.loc[p.patient_id].to_numpy(np.float32) if p.patient_id in genes.index else None
        out.append(PatientRecord(p.patient_id, p.label, p.role, list(p.slides), values))
    return out


# ---------------------------------------------------------------- one fold's predictions


def load_network(method: Method, fold_dir: Path, patients: list[PatientRecord], run_cfg: dict[str, Any],
                 fold: int) -> tuple[Any, FoldData, dict[str, Any], Any]:
    """The fold's saved network (``model.pt``: weights + the configuration and shapes it was built from) and
    the deploy patients as its data; the configuration and the device (the deploy run's threads and device)."""
    import torch

    from wsiomics.models.ensemble import MeanEnsemble
    from wsiomics.train.build import build_model
    from wsiomics.train.loop import load_model_state, resolve_device

    path = fold_dir / "model.pt"
    if not path.exists():
        raise DeployError(f"{path}: no fine-tuned model; run the training run's finetune rule first")
    state = load_model_state(path)
    meta = state["metadata"]
    cfg = dict(meta["config"])
    torch.set_num_threads(int(run_cfg.get("threads", cfg.get("threads", 2))))
    data = FoldData(fold=fold, patients=patients, classes=list(meta["classes"]), genes=list(meta["genes"]),
                    gene_groups=meta.get("gene_groups"), feature_dim=int(meta["feature_dim"]))
    members = int(meta.get("members", 1))  # finetune.members > 1 saved a MeanEnsemble of that many networks
    model = build_model(method, cfg, data) if members == 1 else MeanEnsemble(
        [build_model(method, cfg, data) for _ in range(members)])
    model.load_state_dict(state["model"])
    return model, data, cfg, resolve_device(str(run_cfg.get("device", cfg.get("device", "auto"))))


def network_fold(method: Method, fold_dir: Path, patients: list[PatientRecord], run_cfg: dict[str, Any],
                 fold: int) -> tuple[list[ev.PatientResult], list[str]]:
    """The fold's saved network (``model.pt``) on the deploy patients; its classes."""
    from wsiomics.train.stages import data_params

    model, data, cfg, device = load_network(method, fold_dir, patients, run_cfg, fold)
    return ev.run_model(model, data, EVAL_ROLES, device, data_params(cfg, fold)), data.classes


def tumour_fold(method: Method, fold_dir: Path, patients: list[PatientRecord], run_cfg: dict[str, Any],
                fold: int, samples: str | Path) -> tuple[list[ev.PatientResult], dict[str, Any]]:
    """The fold's segmenter on the deploy slides, through the segmentation task as the run evaluated it: tile
    tumour probabilities (``tile_scores``), the deploy sheet's annotations (if any) as the slides' targets.
    Returns the results and what the task found (``threshold``, the annotations' ``geometry``)."""
    from wsiomics.train.stages import fold_context
    from wsiomics.train.tasks import get_task

    model, data, cfg, device = load_network(method, fold_dir, patients, run_cfg, fold)
    task = get_task(method.task)
    with tempfile.TemporaryDirectory() as scratch:  # the context's output folder: nothing is written there
        ctx = fold_context(method, {**cfg, "threads": run_cfg.get("threads", cfg.get("threads", 2))}, data, scratch,
                           "finetune", inputs={"samples": str(samples)})
        ctx.device = device
        ctx.data = task.prepare(ctx)
        return task.predict(model, ctx), ctx.found


def sklearn_fold(method: Method, cfg: dict[str, Any], train: FoldData, patients: list[PatientRecord]
                 ) -> tuple[list[ev.PatientResult], list[str]]:
    """Refit the baseline on the fold's training patients exactly as the run did (same seed and patients: every
    patient but the evaluated ones, so cca's projections see the unlabelled ones as in the run), with the
    deploy patients as the evaluated ones."""
    from wsiomics.train.estimators import ESTIMATORS
    from wsiomics.train.stages import fold_context

    kept = [p for p in train.patients if p.role not in EVAL_ROLES]
    data = FoldData(fold=train.fold, patients=kept + patients, classes=train.classes, genes=train.genes,
                    gene_groups=train.gene_groups, feature_dim=train.feature_dim)
    with tempfile.TemporaryDirectory() as scratch:  # the estimator's history.tsv: the run has its own
        ctx = fold_context(method, cfg, data, scratch, "finetune")
        results, _, _ = ESTIMATORS[method.model](ctx)
    return results, train.classes


# ---------------------------------------------------------------- ensemble, tables, metrics


def fold_table(results: list[ev.PatientResult], patients: list[PatientRecord], method: Method, fold: int,
               classes: list[str]) -> pd.DataFrame:
    """One row per deploy patient: label, predicted, prob_<class>, modalities (empty probabilities for a
    patient the method cannot predict)."""
    by_record = {id(r.patient): r for r in results}  # the results hold the very records given to the model
    rows = []
    for p in patients:
        used = modalities_used(p, method)
        r = by_record.get(id(p))
        probs = None if (r is None or r.probs is None or not used) else np.asarray(r.probs, dtype=np.float64)
        row = {"patient_id": p.patient_id, "fold": fold, "label": p.label,
               "predicted": "" if probs is None else classes[int(np.argmax(probs))]}
        row.update({f"prob_{c}": (np.nan if probs is None else float(probs[i])) for i, c in enumerate(classes)})
        row["modalities"] = used if probs is not None else ""
        rows.append(row)
    return pd.DataFrame(rows, columns=["patient_id", "fold", "label", "predicted",
                                       *[f"prob_{c}" for c in classes], "modalities"])


def ensemble(folds: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Mean probability over the folds that predicted each patient; predicted = its argmax."""
    probs = [f"prob_{c}" for c in classes]
    rows = []
    for pid, part in folds.groupby("patient_id", sort=True):
        scored = part.dropna(subset=probs)
        mean = scored[probs].mean().to_numpy() if len(scored) else np.full(len(classes), np.nan)
        rows.append({"patient_id": pid, "label": part["label"].iloc[0],
                     "predicted": classes[int(np.argmax(mean))] if len(scored) else "",
                     **dict(zip(probs, mean, strict=True)),
                     "modalities": scored["modalities"].iloc[0] if len(scored) else ""})
    return pd.DataFrame(rows, columns=["patient_id", "label", "predicted", *probs, "modalities"])


def table_metrics(table: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Classification metrics over the predicted, labelled patients: all, then per modality set."""
    probs = [f"prob_{c}" for c in classes]
    scored = table.dropna(subset=probs)

    def of(part: pd.DataFrame) -> dict[str, Any]:
        with warnings.catch_warnings():  # a modality set of a few patients may hold one class: f1 says so
            warnings.simplefilter("ignore", UserWarning)
            return ev.classification_metrics(part["label"].tolist(), part[probs].to_numpy(), classes)

    out = of(scored)
    out["by_modalities"] = {m: of(scored[scored["modalities"] == m]) for m in MODALITY_SETS
                            if (scored["modalities"] == m).any()}
    return out


def deploy_cohort(method: Method, samples: str | Path, features: str | Path | None, expression: str | Path | None,
                  fold_expression: str | Path | None, train_features: str | Path | None):
    """The deploy sheet's patients (with their slides where the method reads images; the slides' features
    checked against the run's) and its raw expression cohort (None where the method reads no genes)."""
    import anndata as ad

    from wsiomics.samples import load_sample_sheet

    use_image = "image" in method.modalities and features is not None
    use_gene = "gene" in method.modalities and expression is not None and fold_expression is not None
    try:
        base = deploy_patients(load_sample_sheet(samples), features if use_image else None)
    except DatasetError as e:
        raise DeployError(f"the deploy cohort {samples}: {e}") from None
    if use_image and any(p.slides for p in base):
        if train_features is None:
            raise DeployError("the deploy slides' features need the training run's (--train-features) to check "
                              "they come from the same encoder")
        check_deploy_features(base, train_features)
    return base, (ad.read_zarr(str(expression)) if use_gene else None)


def predict_tumour(method: Method, cfg: dict[str, Any], models_dir: str | Path, n_folds: int, samples: str | Path,
                   out_dir: str | Path, features: str | Path | None = None, expression: str | Path | None = None,
                   fold_expression: str | Path | None = None,
                   train_features: str | Path | None = None) -> dict[str, Any]:
    """A segmentation method's fold models on the deploy slides: per slide the ensemble tumour probability per
    tile (the mean over the folds' probabilities), written as the run's fine-tune writes one fold's
    (``tumour/<slide_id>.zarr`` + ``.png``, :func:`~wsiomics.train.tasks.segment.write_tumour_maps`); one row per
    slide in ``tumour_slides.tsv`` (its tiles, share of tiles at or above the threshold, mean probability,
    Dice); ``metrics.json`` with Dice of the ensemble and of each fold over the slides the deploy sheet
    annotates (``annotation_path``)."""
    from wsiomics.train.tasks.segment import write_tumour_maps

    out = Path(out_dir)
    base, cohort = deploy_cohort(method, samples, features, expression, fold_expression, train_features)
    with_slides = [p for p in base if p.slides]
    if not with_slides:
        raise DeployError(f"{method.name} segments slides, and the deploy cohort {samples} has no usable slide "
                          "features (--features)")
    scores: dict[str, list[list[np.ndarray]]] = {p.patient_id: [] for p in with_slides}
    used: dict[str, str] = {}
    folds: dict[str, Any] = {}
    found: dict[str, Any] = {}
    for fold in range(n_folds):
        genes = fold_genes(cohort, Path(fold_expression) / f"fold{fold}.zarr")[0] if cohort is not None \
            else pd.DataFrame()
        patients = with_genes(with_slides, genes)
        results, found = tumour_fold(method, Path(models_dir) / f"fold{fold}", patients, cfg, fold, samples)
        for r in results:
            scores[r.patient.patient_id].append(r.tile_scores)
            used[r.patient.patient_id] = modalities_used(r.patient, method)
        folds[str(fold)] = {k: v for k, v in ev.segmentation_metrics(
            {s.slide_id: (probs, s.targets) for r in results for s, probs in zip(r.patient.slides, r.tile_scores,
                                                                                   strict=True)
             if s.targets is not None}, found["threshold"]).items() if k in ("dice_mean", "dice_pooled", "n_slides")}
    threshold = found["threshold"]
    ensemble_results = [ev.PatientResult(p, tile_scores=[np.mean(per_slide, axis=0) for per_slide in
                                                         zip(*scores[p.patient_id], strict=True)])
                        for p in with_slides]
    attrs = {"method": method.name, "folds": n_folds, "ensemble": "mean", "threshold": threshold, "deploy": True}
    dice = write_tumour_maps(out / "tumour", ensemble_results, threshold, found["geometry"], attrs,
                             f"{method.name}, mean of {n_folds} folds")
    rows = []
    for r in ensemble_results:
        for s, probs in zip(r.patient.slides, r.tile_scores, strict=True):
            rows.append({"patient_id": r.patient.patient_id, "slide_id": s.slide_id, "n_tiles": len(probs),
                         "tumour_fraction": float(np.mean(probs >= threshold)), "mean_prob": float(np.mean(probs)),
                         "dice": dice["dice_per_slide"].get(s.slide_id, np.nan),
                         "modalities": used[r.patient.patient_id]})
    ev.write_predictions(out / "tumour_slides.tsv", pd.DataFrame(rows, columns=[
        "patient_id", "slide_id", "n_tiles", "tumour_fraction", "mean_prob", "dice", "modalities"]))
    metrics: dict[str, Any] = {"method": method.name, "n_folds": n_folds, "threshold": threshold,
                               "n_patients": len(with_slides), "n_slides": len(rows),
                               "modalities": pd.Series(list(used.values())).value_counts().to_dict(),
                               "ensemble": dice, "folds": folds}
    ev.write_json(out / "metrics.json", metrics)
    log.info("%s: tumour maps of %d deploy slides; ensemble Dice mean %s over %d annotated slides", method.name,
             len(rows), dice["dice_mean"], dice["n_slides"])
    return metrics


RISK_COLUMNS = ["patient_id", "risk", "time", "event", "modalities"]


def risk_percentile(risks: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each risk's place among ``reference`` (a fold's fitted patients' risks) in [0, 1]: the share below it,
    ties counting half. 0.5 is the fold's training median, the split of the run's Kaplan-Meier figure."""
    ref = np.sort(np.asarray(reference, np.float64))
    if not len(ref):
        raise DeployError("a survival fold has no fitted patients' risks to place the deploy risks among")
    below = np.searchsorted(ref, risks, side="left")
    at_or_below = np.searchsorted(ref, risks, side="right")
    return (below + at_or_below) / (2.0 * len(ref))


def risks_fold(method: Method, fold_dir: Path, patients: list[PatientRecord], run_cfg: dict[str, Any],
               fold: int) -> list[ev.PatientResult]:
    """The fold's survival network on the deploy patients: each one's risk (higher = earlier event) as the
    run computed it (:meth:`~wsiomics.train.tasks.survival.Survival.predict`, the fold's loss)."""
    from wsiomics.train.stages import fold_context
    from wsiomics.train.tasks import get_task
    from wsiomics.train.tasks.survival import settings

    model, data, cfg, device = load_network(method, fold_dir, patients, run_cfg, fold)
    task = get_task(method.task)
    with tempfile.TemporaryDirectory() as scratch:  # the context's output folder: nothing is written there
        ctx = fold_context(method, {**cfg, "threads": run_cfg.get("threads", cfg.get("threads", 2))}, data, scratch,
                           "finetune")
        ctx.device = device
        ctx.found["loss"] = settings(cfg)[0]  # the risk needs only the loss; follow-up is the metrics' business
        return task.predict(model, ctx)


def deploy_outcomes(samples: str | Path) -> pd.DataFrame:
    """The deploy sheet's follow-up (``time``, ``event`` per patient), empty when it has none; a bad value is the
    sheet's error (naming its row), never read as "no follow-up"."""
    from wsiomics.train.tasks.survival import read_outcomes

    return read_outcomes(samples, required=False)


def c_index(table: pd.DataFrame, column: str) -> dict[str, Any]:
    """Harrell's c-index of ``column`` over the rows with follow-up and a risk (None when undefined)."""
    from sksurv.metrics import concordance_index_censored

    known = table.dropna(subset=["time", column])
    known = known[known["event"].notna()]
    event = known["event"].to_numpy(int).astype(bool)
    out: dict[str, Any] = {"n_test": len(known), "n_events": int(event.sum()), "c_index": None}
    if len(known) >= 2 and event.any():
        try:
            out["c_index"] = float(concordance_index_censored(event, known["time"].to_numpy(float),
                                                              known[column].to_numpy(float))[0])
        except ValueError as e:  # a few patients (one modality set) may hold no comparable pair
            log.info("c-index undefined over %d patients (%s)", len(known), e)
    return out


def predict_risks(method: Method, cfg: dict[str, Any], models_dir: str | Path, n_folds: int, samples: str | Path,
                  out_dir: str | Path, features: str | Path | None = None, expression: str | Path | None = None,
                  fold_expression: str | Path | None = None,
                  train_features: str | Path | None = None) -> dict[str, Any]:
    """A survival network's fold models on the deploy patients. The folds' risks are not on one scale (a Cox
    head's log-risk is defined up to a constant per fold, a discrete-time head's risk depends on the fold's time
    bins), so each is placed among its fold's fitted patients' risks (the run's ``risks.tsv``, roles train and
    val: :func:`risk_percentile`) and the ensemble risk is the mean of those percentiles over the folds that
    predicted the patient. Writes ``risks.tsv`` (``patient_id, risk, time, event, modalities``; time and event
    when the deploy sheet has them), ``fold_risks.tsv`` (``patient_id, fold, risk`` (the fold's own),
    ``risk_percentile, modalities``) and ``metrics.json`` (Harrell's c-index of the ensemble and of each fold,
    overall and per modality set, when the sheet has follow-up)."""
    if method.is_sklearn:
        raise DeployError(f"{method.name} is not deployed: a refitted Cox baseline would need the run's follow-up "
                          "and the deploy cohort's in one fold; deploy a survival network (e.g. gimp_survival)")
    out = Path(out_dir)
    base, cohort = deploy_cohort(method, samples, features, expression, fold_expression, train_features)
    rows = []
    for fold in range(n_folds):
        fold_dir = Path(models_dir) / f"fold{fold}"
        reference_path = fold_dir / "risks.tsv"
        if not reference_path.exists():
            raise DeployError(f"{reference_path}: no risks of the fold's patients; run the training run's "
                              "finetune_survival rule first")
        reference = pd.read_csv(reference_path, sep="\t")
        reference = reference.loc[reference["role"].isin(("train", "val")), "risk"].to_numpy(float)
        genes = fold_genes(cohort, Path(fold_expression) / f"fold{fold}.zarr")[0] if cohort is not None \
            else pd.DataFrame()
        patients = with_genes(base, genes)
        by_record = {id(r.patient): r for r in risks_fold(method, fold_dir, patients, cfg, fold)}
        for p in patients:
            used, r = modalities_used(p, method), by_record.get(id(p))
            risk = float(r.risk) if (used and r is not None) else np.nan
            rows.append({"patient_id": p.patient_id, "fold": fold, "risk": risk,
                         "risk_percentile": float(risk_percentile(np.array([risk]), reference)[0])
                         if used else np.nan, "modalities": used})
    folds = pd.DataFrame(rows, columns=["patient_id", "fold", "risk", "risk_percentile", "modalities"])
    outcomes = deploy_outcomes(samples)
    table = folds.groupby("patient_id", sort=True).agg(risk=("risk_percentile", "mean"),
                                                       modalities=("modalities", "first")).reset_index()
    table = table.join(outcomes, on="patient_id").astype({"event": "Int64"})[RISK_COLUMNS]
    ev.write_predictions(out / "fold_risks.tsv", folds)
    ev.write_predictions(out / "risks.tsv", table)
    metrics: dict[str, Any] = {"method": method.name, "n_folds": n_folds, "n_patients": len(table),
                               "n_predicted": int(table["risk"].notna().sum()),
                               "modalities": table["modalities"].replace("", "none").value_counts().to_dict()}
    if len(outcomes):
        metrics["ensemble"] = {**c_index(table, "risk"), "by_modalities": {
            m: c_index(table[table["modalities"] == m], "risk") for m in MODALITY_SETS
            if (table["modalities"] == m).any()}}
        with_follow_up = folds.join(outcomes, on="patient_id")
        metrics["folds"] = {str(k): c_index(part, "risk") for k, part in with_follow_up.groupby("fold")}
    ev.write_json(out / "metrics.json", metrics)
    log.info("%s: risks of %d deploy patients, %s; ensemble c-index %s", method.name, len(table),
             metrics["modalities"], (metrics.get("ensemble") or {}).get("c_index"))
    return metrics


def predict(method_name: str, cfg: dict[str, Any], models_dir: str | Path, n_folds: int, samples: str | Path,
            out_dir: str | Path, features: str | Path | None = None, expression: str | Path | None = None,
            fold_expression: str | Path | None = None, train_features: str | Path | None = None,
            train_folds: str | Path | None = None, train_samples: str | Path | None = None) -> dict[str, Any]:
    """Apply ``models_dir/fold<k>`` (k < n_folds) to the sheet ``samples``; write ``out_dir``'s files
    (classification here; segmentation: :func:`predict_tumour`; survival: :func:`predict_risks`).

    ``features``: the deploy slides' feature stores; ``expression``: the deploy cohort's raw table
    (``cohort.zarr``); ``fold_expression``: the run's ``results/expression`` (``fold<k>.zarr``, whose fitted
    transform normalises the deploy RNA); ``train_features``: the run's feature stores (the encoder check;
    the baselines' refit); ``train_folds`` / ``train_samples``: the run's folds and sheet (the baselines' refit).
    """
    method = get_method(method_name)
    if method.task == "segment":
        return predict_tumour(method, cfg, models_dir, n_folds, samples, out_dir, features, expression,
                              fold_expression, train_features)
    if method.task == "survival":
        return predict_risks(method, cfg, models_dir, n_folds, samples, out_dir, features, expression,
                             fold_expression, train_features)
    if method.task != "classify":
        raise DeployError(f"{method.name} is a {method.task} method; deployment predicts classification, "
                          "segmentation and survival methods")
    out = Path(out_dir)
    base, cohort = deploy_cohort(method, samples, features, expression, fold_expression, train_features)
    use_gene = cohort is not None
    tables, classes_seen = [], None
    for fold in range(n_folds):
        genes = pd.DataFrame()
        if use_gene:
            genes, _ = fold_genes(cohort, Path(fold_expression) / f"fold{fold}.zarr")
        patients = with_genes(base, genes)
        if method.is_sklearn:
            train = _training_fold(method, fold, train_folds, train_samples, train_features, fold_expression)
            results, classes = sklearn_fold(method, cfg, train, patients)
        else:
            results, classes = network_fold(method, Path(models_dir) / f"fold{fold}", patients, cfg, fold)
            attention = out / "attention" / f"fold{fold}"
            attention.mkdir(parents=True, exist_ok=True)
            ev.write_tile_maps(attention, [r for r in results if modalities_used(r.patient, method)], "attention",
                               "attention", {"method": method.name, "fold": fold, "deploy": True})
        if classes_seen is not None and classes != classes_seen:
            raise DeployError(f"{models_dir}: fold {fold}'s classes {classes} differ from fold 0's {classes_seen}")
        classes_seen = classes
        tables.append(fold_table(results, patients, method, fold, classes))
    folds = pd.concat(tables, ignore_index=True)
    table = ensemble(folds, classes_seen)
    for pid in table.loc[table["modalities"] == "", "patient_id"]:
        log.warning("%s: patient %s not predicted: it has none of the method's modalities (%s)", method.name, pid,
                    ", ".join(method.modalities))
    (out / "attention").mkdir(parents=True, exist_ok=True)
    ev.write_predictions(out / "fold_predictions.tsv", folds)
    ev.write_predictions(out / "predictions.tsv", table)
    metrics: dict[str, Any] = {"method": method.name, "n_folds": n_folds, "classes": classes_seen,
                               "n_patients": len(table), "n_predicted": int((table["modalities"] != "").sum()),
                               "modalities": table["modalities"].replace("", "none").value_counts().to_dict()}
    labelled = table["label"].isin(classes_seen)
    unknown = sorted(set(table["label"]) - set(classes_seen) - {""})
    if unknown:
        log.warning("deploy labels %s are not among the run's classes %s: left out of the metrics", unknown,
                    classes_seen)
    if labelled.any():
        metrics["ensemble"] = table_metrics(table, classes_seen)
        metrics["folds"] = {str(k): table_metrics(part, classes_seen) for k, part in folds.groupby("fold")}
    ev.write_json(out / "metrics.json", metrics)
    log.info("%s: %d deploy patients, %s; ensemble balanced accuracy %s", method.name, len(table),
             metrics["modalities"], (metrics.get("ensemble") or {}).get("balanced_accuracy"))
    return metrics


def _training_fold(method: Method, fold: int, folds: str | Path | None, samples: str | Path | None,
                   features: str | Path | None, fold_expression: str | Path | None) -> FoldData:
    """The run's fold as its baseline was fitted on (the same loader as the training stage)."""
    from wsiomics.train.stages import load_inputs

    if folds is None:
        raise DeployError(f"{method.name} is a scikit-learn baseline: it is refitted on the run's training "
                          "patients; pass --train-folds (and --train-samples, --train-features, --fold-expression)")
    expr = str(Path(fold_expression) / f"fold{fold}.zarr") if fold_expression else None
    try:
        return load_inputs(str(folds), str(samples) if samples else None, str(features) if features else None,
                           expr, fold, method)
    except DatasetError as e:
        raise DeployError(f"{method.name} fold {fold}: cannot rebuild the training fold: {e}") from None
