"""Tumour segmentation: per-tile targets from the sheet's GeoJSON annotations; BCE + soft Dice; a tumour map
per evaluated slide (``tumour/<slide_id>.zarr`` + ``.png``) and Dice per slide and pooled in ``metrics.json``."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsiomics.datasets import FoldData
from wsiomics.models.batch import Batch
from wsiomics.train import evaluate as ev
from wsiomics.train.roles import EVAL_ROLES, TRAIN_ROLES, VAL_ROLES
from wsiomics.train.tasks.base import StageContext, Task, register_task, sheet_input

log = logging.getLogger(__name__)


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


def zarr_coords(store: str) -> np.ndarray:
    import zarr

    return zarr.open_array(f"{store}/coords", mode="r")[:]


def _tile_size(store: str) -> float:
    import zarr

    return float(zarr.open_group(store, mode="r").attrs["patch_size_level0"])


def write_tumour_maps(tumour_dir: Path, results: list[ev.PatientResult], threshold: float,
                      geometry: dict[str, Any], attrs: dict[str, Any], title: str) -> dict[str, Any]:
    """Per slide of ``results`` (tile probabilities in ``tile_scores``): ``<slide_id>.zarr`` (coords and
    ``tumour_prob`` per tile) and ``<slide_id>.png`` (the map, the annotation's outline from ``geometry``, Dice
    in the title) in ``tumour_dir``; returns the Dice metrics of the annotated ``test`` slides (and of the
    ``heldout`` ones). The fine-tune's evaluation (one fold) and deployment (the fold ensemble) both write these."""
    from wsiomics.annotations import polygon_rings

    tumour_dir.mkdir(parents=True, exist_ok=True)
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
            rings = polygon_rings(geometry[slide.slide_id]) if slide.slide_id in geometry else []
            dice = ""
            if slide.targets is not None:
                dice = f", Dice {ev.dice_score(probs >= threshold, slide.targets >= 0.5):.3f}"
            ev.write_tumour_heatmap(tumour_dir / f"{slide.slide_id}.png", zarr_coords(slide.store), stored,
                                    _tile_size(slide.store), rings, f"{title}: {slide.slide_id}{dice}")
    metrics: dict[str, Any] = ev.segmentation_metrics(by_role["test"], threshold)
    metrics["skipped_slides"] = sorted(skipped["test"])
    metrics["slide_patients"] = {s.slide_id: r.patient.patient_id for r in results if r.patient.role == "test"
                                 for s in r.patient.slides if s.slide_id in by_role["test"]}
    if by_role["heldout"] or skipped["heldout"]:
        metrics["heldout"] = {**ev.segmentation_metrics(by_role["heldout"], threshold),
                              "skipped_slides": sorted(skipped["heldout"])}
    return metrics


class Segment(Task):
    name = "segment"
    summary_metrics = ("dice_mean", "dice_pooled")
    history_title = "segmentation"

    def prepare(self, ctx: StageContext) -> FoldData:
        from wsiomics.annotations import params_from_config

        annotations = sheet_input(ctx, "annotations", annotation_paths, "annotation_path column")
        seg = dict(ctx.cfg.get("segmentation") or {})
        ctx.found["threshold"] = float(seg.get("threshold", 0.5))
        ctx.found["geometry"] = attach_tumour_labels(ctx.data, annotations, params_from_config(seg))["geometry"]
        return ctx.data

    def head_outputs(self, data: FoldData, cfg: dict[str, Any]) -> int:
        return 1

    def training_data(self, ctx: StageContext) -> FoldData:
        """Train/val on patients with at least one annotated slide; unannotated slides of theirs have no targets."""
        data = ctx.data
        fit_data = replace(data, patients=[p for p in data.patients if p.role in EVAL_ROLES or (
            p.role in (*TRAIN_ROLES, *VAL_ROLES) and _annotated(p))])
        if not fit_data.role(*TRAIN_ROLES):
            raise ValueError(f"{ctx.method.name} fold {data.fold}: no training patient has an annotated slide; "
                             "segmentation needs tumour GeoJSON files in the sheet's annotation_path column")
        return fit_data

    def objective(self, ctx: StageContext):
        return segmentation_objective

    def predict(self, model: torch.nn.Module, ctx: StageContext) -> list[ev.PatientResult]:
        results = [r for r in ev.run_model(model, ctx.data, EVAL_ROLES, ctx.device, ctx.dparams) if r.patient.slides]
        for r in results:
            r.tile_scores = [1.0 / (1.0 + np.exp(-v.astype(np.float64))) for v in r.tile_scores]
        return results

    def write(self, ctx: StageContext, results: list[ev.PatientResult], info: dict[str, Any],
              extra: dict[str, Any]) -> dict[str, Any]:
        method, data, threshold = ctx.method, ctx.data, ctx.found["threshold"]
        metrics = write_tumour_maps(ctx.out / "tumour", results, threshold, ctx.found["geometry"],
                                    {"method": method.name, "fold": data.fold, "threshold": threshold},
                                    f"{method.name} fold {data.fold}")
        metrics.update(extra)
        metrics.update({"method": method.name, "fold": data.fold, "threshold": threshold, "training": info})
        ev.write_json(ctx.out / "metrics.json", metrics)
        log.info("%s fold %d test: dice_mean %s, dice_pooled %s over %d slides; skipped %s", method.name, data.fold,
                 metrics["dice_mean"], metrics["dice_pooled"], metrics["n_slides"], metrics["skipped_slides"])
        return metrics

    def patient_records(self, fold_dir: Path, metrics: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """``segmentation``: one row per annotated test slide (its patient, Dice and tile counts |P & T|, |P|,
        |T| from metrics.json; the patient from the slide's tumour map when metrics.json predates
        ``slide_patients``, the counts missing then)."""
        import zarr

        dice = metrics.get("dice_per_slide") or {}
        counts = metrics.get("tiles_per_slide") or {}
        patients = metrics.get("slide_patients") or {}
        rows = []
        for sid, value in dice.items():
            patient = patients.get(sid)
            if patient is None:
                patient = zarr.open_group(fold_dir / "tumour" / f"{sid}.zarr", mode="r").attrs["patient_id"]
            inter, pred, truth = counts.get(sid, (np.nan, np.nan, np.nan))
            rows.append({"patient_id": str(patient), "slide_id": sid, "dice": value, "intersection": inter,
                         "predicted": pred, "truth": truth})
        columns = ["patient_id", "slide_id", "dice", "intersection", "predicted", "truth"]
        return {"segmentation": pd.DataFrame(rows, columns=columns)} if rows else {}

    def pooled_statistic(self, kind: str, records: pd.DataFrame) -> dict[str, float | None]:
        """Dice mean over every slide of every fold, and Dice pooled over all their tiles, 2 sum|P & T| /
        (sum|P| + sum|T|) (1.0 when both are empty, as :func:`~wsiomics.train.evaluate.dice_score`)."""
        if kind != "segmentation":
            return super().pooled_statistic(kind, records)
        if not len(records):
            return {"dice_mean": None, "dice_pooled": None}
        pooled = None
        if records[["intersection", "predicted", "truth"]].notna().all().all():
            denom = records["predicted"].sum() + records["truth"].sum()
            pooled = 1.0 if denom == 0 else float(2 * records["intersection"].sum() / denom)
        return {"dice_mean": float(records["dice"].mean()), "dice_pooled": pooled}


register_task(Segment())
