"""What the figures read: the outputs of the stages under ``results/``, found by listing, never assumed.

Methods are the folders of ``results/models`` that hold ``fold<k>`` folders; each reader returns nothing
(and the figure is skipped with a log line) when its files are missing.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("wsiomics.figures")

FOLD = re.compile(r"fold(\d+)")


@dataclass(frozen=True)
class SlideMap:
    """Per-tile values of one slide written by a method (``attention/`` or ``tumour/`` stores)."""

    method: str
    fold: int
    slide_id: str
    patient_id: str
    coords: np.ndarray  # (N, 2) level-0 top-left x, y
    values: np.ndarray  # (N,)


class Results:
    """Read access to one run's ``results/`` folder."""

    def __init__(self, root: str | Path = "results", samples: str | None = None,
                 annotation_options: dict[str, Any] | None = None):
        self.root = Path(root)
        self.samples = samples  # the sample sheet: annotation outlines (annotation_path) for the tumour maps
        self.annotation_options = annotation_options  # how the annotations are read (config train.segmentation)

    # ----- cohort -----

    def _table(self, *parts: str) -> pd.DataFrame | None:
        path = self.root.joinpath(*parts)
        if not path.is_file():
            log.info("%s not found; figures that need it are skipped", path)
            return None
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)

    @cached_property
    def patients(self) -> pd.DataFrame | None:
        """patient_id, label (results/sheet/patients.tsv)."""
        return self._table("sheet", "patients.tsv")

    @cached_property
    def slides(self) -> pd.DataFrame | None:
        """slide_id, patient_id (results/sheet/slides.tsv)."""
        return self._table("sheet", "slides.tsv")

    @cached_property
    def slide_status(self) -> pd.DataFrame | None:
        return self._table("qc", "slide_status.tsv")

    @cached_property
    def expression_patients(self) -> set[str] | None:
        """Patients with an expression profile: the expression cohort's rows (results/expression/cohort.zarr)."""
        path = self.root / "expression" / "cohort.zarr"
        if not path.is_dir():
            log.info("%s not found; modality presence is taken from the slides alone", path)
            return None
        import zarr

        obs = zarr.open_group(str(path / "obs"), mode="r")
        key = obs.attrs.get("_index", "_index")
        return {str(v) for v in obs[key][:]}

    def modalities(self, patient_ids: list[str]) -> list[str]:
        """Per patient: "image + expression", "image only", "expression only" or "neither" (slides with
        status ok, the expression cohort)."""
        with_slides = None
        if self.slide_status is not None and "status" in self.slide_status:
            ok = self.slide_status[self.slide_status["status"] == "ok"]
            with_slides = set(ok["patient_id"]) if "patient_id" in ok else None
        if with_slides is None and self.slides is not None:
            with_slides = set(self.slides["patient_id"])
        genes = self.expression_patients
        out = []
        for p in patient_ids:
            image = with_slides is None or p in with_slides
            expr = genes is not None and p in genes
            out.append({(True, True): "image + expression", (True, False): "image only",
                        (False, True): "expression only", (False, False): "neither"}[(image, expr)])
        return out

    # ----- models -----

    @cached_property
    def methods(self) -> list[str]:
        base = self.root / "models"
        if not base.is_dir():
            log.info("%s not found: no model figures", base)
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and self.fold_dirs(p.name))

    def fold_dirs(self, method: str) -> dict[int, Path]:
        base = self.root / "models" / method
        found = {int(m.group(1)): p for p in base.iterdir() if p.is_dir() and (m := FOLD.fullmatch(p.name))}
        return dict(sorted(found.items()))

    def metrics(self, method: str, fold: int) -> dict[str, Any]:
        path = self.fold_dirs(method)[fold] / "metrics.json"
        if not path.is_file():
            return {}
        with open(path) as f:
            return json.load(f)

    def predictions(self, method: str, role: str = "test") -> tuple[pd.DataFrame, list[str]] | None:
        """The test patients' predictions of every fold, pooled, and the classes (the ``prob_*`` columns)."""
        frames = []
        for d in self.fold_dirs(method).values():
            path = d / "predictions.tsv"
            if path.is_file():
                frames.append(pd.read_csv(path, sep="\t", dtype={"patient_id": str, "label": str, "predicted": str}))
        if not frames:
            log.info("%s: no predictions.tsv; no ROC curve or confusion matrix", method)
            return None
        table = pd.concat(frames, ignore_index=True)
        table = table[table["role"] == role] if "role" in table else table
        classes = [c[len("prob_"):] for c in table.columns if c.startswith("prob_")]
        table = table[table["label"].isin(classes)]
        if table.empty or not classes:
            log.info("%s: no labelled %s patient among the predictions; skipped", method, role)
            return None
        return table.reset_index(drop=True), classes

    def methods_with_predictions(self) -> Iterator[tuple[str, pd.DataFrame, list[str]]]:
        """(method, pooled test predictions, classes) for each method that wrote labelled predictions."""
        for method in self.methods:
            found = self.predictions(method)
            if found is not None:
                yield method, *found

    def histories(self, method: str) -> dict[str, dict[int, pd.DataFrame]]:
        """stage ("pretrain", "finetune") -> fold -> history.tsv."""
        out: dict[str, dict[int, pd.DataFrame]] = {}
        for fold, d in self.fold_dirs(method).items():
            for stage, path in (("pretrain", d / "pretrain" / "history.tsv"), ("finetune", d / "history.tsv")):
                if path.is_file() and path.stat().st_size:
                    out.setdefault(stage, {})[fold] = pd.read_csv(path, sep="\t")
        if not out:
            log.info("%s: no history.tsv; no loss curves", method)
        return out

    def embeddings(self, method: str, stage: str, role: str = "test") -> pd.DataFrame | None:
        """One row per patient of ``role`` of every fold: patient_id, fold and one column per embedding
        (``image``, ``gene``, ``fused``: each cell a vector). ``stage``: "finetune" (embeddings.zarr) or
        "pretrain" (pretrain/embeddings.zarr)."""
        import zarr

        rows = []
        for fold, d in self.fold_dirs(method).items():
            path = d / ("pretrain/embeddings.zarr" if stage == "pretrain" else "embeddings.zarr")
            if not path.is_dir():
                continue
            g = zarr.open_group(str(path), mode="r")
            ids = [str(v) for v in g["patient_id"][:]]
            roles = [str(v) for v in g["role"][:]] if "role" in g else [role] * len(ids)
            arrays = {k: g[k][:] for k in ("image", "gene", "fused") if k in g}
            for i, (p, r) in enumerate(zip(ids, roles, strict=True)):
                if r == role:
                    rows.append({"patient_id": p, "fold": fold, **{k: v[i] for k, v in arrays.items()}})
        return pd.DataFrame(rows) if rows else None

    def slide_maps(self, method: str, kind: str) -> list[SlideMap]:
        """Every slide store of ``kind`` ("attention" or "tumour") the method wrote, all folds."""
        import zarr

        array = {"attention": "attention", "tumour": "tumour_prob"}[kind]
        out = []
        for fold, d in self.fold_dirs(method).items():
            folder = d / kind
            if not folder.is_dir():
                continue
            for store in sorted(folder.glob("*.zarr")):
                g = zarr.open_group(str(store), mode="r")
                if array not in g:
                    continue
                out.append(SlideMap(method, fold, str(g.attrs.get("slide_id", store.stem)),
                                    str(g.attrs.get("patient_id", "")), g["coords"][:], g[array][:]))
        return out

    # ----- slides -----

    def tile_attrs(self, slide_id: str) -> dict[str, Any] | None:
        """The tiles store's attrs (slide path, patch size at level 0, read level and size); for a slide whose
        features were imported, the feature store's (results/features/<encoder>/<slide_id>.zarr)."""
        import zarr

        stores = [self.root / "tiles" / f"{slide_id}.zarr",
                  *sorted((self.root / "features").glob(f"*/{slide_id}.zarr"))]
        for store in stores:
            if store.is_dir():
                attrs = dict(zarr.open_group(str(store), mode="r").attrs)
                if "patch_size_level0" in attrs:
                    return attrs
        return None

    def thumbnail(self, slide_id: str, max_px: int) -> tuple[np.ndarray, float, float] | None:
        """The slide at about ``max_px`` on its longest side and its x, y downsample; None (logged) when the
        slide cannot be opened (imported features without the slide, a moved file)."""
        return _thumbnail(self.tile_attrs(slide_id) or {}, slide_id, max_px)

    def tiles(self, slide_id: str, coords: np.ndarray) -> list[np.ndarray] | None:
        """The patches at level-0 ``coords`` as the feature extractor read them (RGB), None without the slide."""
        attrs = self.tile_attrs(slide_id)
        slide = _open(attrs, slide_id)
        if slide is None:
            return None
        from wsiomics.slide import read_rgb

        try:
            size = int(attrs.get("read_size") or round(attrs["patch_size_level0"]))
            return [read_rgb(slide, (int(x), int(y)), int(attrs.get("read_level", 0)), (size, size))
                    for x, y in np.asarray(coords).reshape(-1, 2)]
        finally:
            slide.close()


def _open(attrs: dict[str, Any] | None, slide_id: str):
    path = (attrs or {}).get("slide_path")
    if not path or not Path(path).is_file():
        log.info("%s: slide file %s not available; drawn without the H&E", slide_id, path or "(not recorded)")
        return None
    from wsiomics.slide import SlideError, open_slide

    try:
        return open_slide(path)
    except (SlideError, OSError) as e:
        log.info("%s: slide %s cannot be opened (%s); drawn without the H&E", slide_id, path, e)
        return None


@lru_cache(maxsize=64)
def _thumbnail_cached(path: str, max_px: int) -> tuple[np.ndarray, float, float] | None:
    from wsiomics.slide import open_slide, read_downsampled

    slide = open_slide(path)
    try:
        return read_downsampled(slide, max(1.0, max(slide.dimensions) / max_px))
    finally:
        slide.close()


def _thumbnail(attrs: dict[str, Any], slide_id: str, max_px: int):
    slide = _open(attrs, slide_id)
    if slide is None:
        return None
    slide.close()
    return _thumbnail_cached(str(attrs["slide_path"]), max_px)
