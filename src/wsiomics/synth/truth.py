"""Score tiles against a synthetic slide's known truth (tissue and pen ink, level-0 pixels).

Used by the tests and ``bench/tiling.py`` to measure what matters to users: how many kept tiles are
mostly background or pen, and how many all-tissue grid cells were missed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union


@dataclass(frozen=True)
class Truth:
    width: int
    height: int
    mpp: float
    tissue: BaseGeometry
    pen: BaseGeometry
    tumour: BaseGeometry


def load_truth(path: str | Path) -> Truth:
    """Read ``truth/<slide_id>.geojson`` written by the cohort generator."""
    data = json.loads(Path(path).read_text())

    def union(name: str) -> BaseGeometry:
        geoms = [shape(f["geometry"]) for f in data["features"] if f["properties"]["classification"]["name"] == name]
        return unary_union(geoms) if geoms else Polygon()

    meta = data["slide"]
    return Truth(meta["width"], meta["height"], meta["mpp"], union("Tissue"), union("Pen"), union("Tumor"))


def cover_fractions(geom: BaseGeometry, origins: np.ndarray, size: float) -> np.ndarray:
    """Fraction of each square (level-0 origin x, y; side ``size``) covered by ``geom``."""
    if len(origins) == 0:
        return np.zeros(0)
    if geom.is_empty:
        return np.zeros(len(origins))
    boxes = shapely.box(origins[:, 0], origins[:, 1], origins[:, 0] + size, origins[:, 1] + size)
    shapely.prepare(geom)
    return shapely.area(shapely.intersection(boxes, geom)) / (size * size)


@dataclass(frozen=True)
class TilingScore:
    n_tiles: int
    mostly_background: float  # share of tiles with < 25% tissue
    max_pen_fraction: float  # worst tile's pen-ink cover
    full_cells: int  # grid cells that are 100% tissue and free of pen
    full_cell_recall: float  # share of those that got a tile


def score_tiling(truth: Truth, coords: np.ndarray, patch_size_level0: float) -> TilingScore:
    """Quality of a tiling against the truth (tissue that is under pen ink does not count as tissue)."""
    clean_tissue = truth.tissue.difference(truth.pen) if not truth.pen.is_empty else truth.tissue
    tissue = cover_fractions(clean_tissue, coords.astype(float), patch_size_level0)
    pen = cover_fractions(truth.pen, coords.astype(float), patch_size_level0)
    n_cols, n_rows = int(truth.width // patch_size_level0), int(truth.height // patch_size_level0)
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    cells = np.stack([cols.ravel(), rows.ravel()], 1) * patch_size_level0
    full = cover_fractions(clean_tissue, cells, patch_size_level0) >= 0.999
    kept = {(int(round(x)), int(round(y))) for x, y in coords}
    hit = [(int(round(x)), int(round(y))) in kept for x, y in cells[full]]
    return TilingScore(
        n_tiles=len(coords),
        mostly_background=float(np.mean(tissue < 0.25)) if len(coords) else 0.0,
        max_pen_fraction=float(pen.max()) if len(coords) else 0.0,
        full_cells=int(full.sum()),
        full_cell_recall=float(np.mean(hit)) if full.any() else 1.0,
    )
