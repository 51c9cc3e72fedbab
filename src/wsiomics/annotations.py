"""Tumour annotations (QuPath GeoJSON, level-0 pixels) as per-tile labels on a slide's tile grid.

A tile is the square ``[x, x + s) x [y, y + s)`` of its level-0 top-left corner ``(x, y)`` and side
``s = patch_size_level0``. Its label is the exact share of that square inside the union of the
slide's tumour polygons (holes and multipolygons respected), computed with shapely 2's vectorised
``box`` / ``intersection`` / ``area``; a tile is tumour when that share is at least ``min_fraction``
(0.5: at least half the tile). Which features count as tumour is decided first by their QuPath
``objectType`` (a configurable list, ``annotation`` by default: an export of a slide with cell detection
run also holds every cell and detection, often classified "Tumor" by a cell classifier, inside and
outside the tumour; features without an ``objectType``, plain GeoJSON, always pass), then by their
``classification.name`` (a configurable list); features without a classification are accepted or not
by ``include_unclassified``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ("Tumor", "Tumour", "tumor", "tumour")
DEFAULT_OBJECT_TYPES = ("annotation",)  # QuPath also writes detection, cell, tile, ...
AREAL = ("Polygon", "MultiPolygon")


class AnnotationError(ValueError):
    """An annotation file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class AnnotationParams:
    classes: tuple[str, ...] = DEFAULT_CLASSES  # QuPath classification names that mean tumour
    include_unclassified: bool = False  # features without a classification count as tumour
    min_fraction: float = 0.5  # a tile is tumour when at least this share of it is inside tumour
    object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES  # QuPath objectType values read (case-insensitive)

    def __post_init__(self) -> None:
        if not 0.0 < self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {self.min_fraction}")
        if not self.object_types:
            raise ValueError("object_types is empty: name the QuPath object types to read, e.g. [annotation]")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "object_types", tuple(str(t).lower() for t in self.object_types))


@dataclass
class SlideAnnotation:
    path: str
    tumour: BaseGeometry  # union of the tumour polygons (may be empty)
    n_features: int = 0  # features kept as tumour
    ignored: dict[str, int] = field(default_factory=dict)  # classification name -> features left out
    ignored_objects: dict[str, int] = field(default_factory=dict)  # objectType -> features left out by type


def _features(data: Any, path: str) -> list[dict]:
    """Features of a FeatureCollection, a bare list of features, one Feature or one bare geometry."""
    if isinstance(data, list):
        return [f if f.get("type") == "Feature" else {"type": "Feature", "geometry": f, "properties": {}}
                for f in data]
    if isinstance(data, dict):
        kind = data.get("type")
        if kind == "FeatureCollection":
            return list(data.get("features") or [])
        if kind == "Feature":
            return [data]
        if kind in AREAL or kind == "GeometryCollection":
            return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise AnnotationError(f"{path}: not GeoJSON features (expected a FeatureCollection or a list of features, "
                          "as QuPath's 'Export objects as GeoJSON' writes)")


def _class_name(properties: dict | None) -> str | None:
    c = (properties or {}).get("classification")
    if isinstance(c, dict):
        return c.get("name")
    if isinstance(c, str):  # some exporters write the name alone
        return c
    return None


def _areal_parts(geom: BaseGeometry) -> list[BaseGeometry]:
    if geom.geom_type in AREAL:
        return [geom]
    if geom.geom_type == "GeometryCollection":
        return [g for part in geom.geoms for g in _areal_parts(part)]
    return []  # points and lines have no area


def read_annotation(path: str | Path, params: AnnotationParams = AnnotationParams()) -> SlideAnnotation:
    """Union of the tumour polygons of one GeoJSON file; invalid rings are repaired (``make_valid``)."""
    path = str(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found; fix annotation_path in the sample sheet") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e}); re-export the annotations as GeoJSON") from None
    keep, ignored, ignored_objects = [], {}, {}
    wanted = set(params.classes)
    for feature in _features(data, path):
        object_type = (feature.get("properties") or {}).get("objectType")
        if object_type is not None and str(object_type).lower() not in params.object_types:
            ignored_objects[str(object_type)] = ignored_objects.get(str(object_type), 0) + 1
            continue
        name = _class_name(feature.get("properties"))
        if not (name in wanted if name is not None else params.include_unclassified):
            key = name if name is not None else "<unclassified>"
            ignored[key] = ignored.get(key, 0) + 1
            continue
        if not feature.get("geometry"):
            continue
        try:
            geom = shape(feature["geometry"])
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            kind = name or "unclassified"
            raise AnnotationError(f"{path}: a {kind} feature has a malformed geometry ({e})") from None
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        parts = _areal_parts(geom)
        if parts:
            keep.extend(parts)
    tumour = shapely.union_all(keep) if keep else shapely.Polygon()
    if ignored_objects:  # nothing kept but objects of other types: object_types is probably wrong
        log.log(logging.INFO if keep else logging.WARNING,
                "%s: %d tumour features read; left out by objectType (segmentation.object_types: %s): %s", path,
                len(keep), list(params.object_types),
                ", ".join(f"{n} {t}" for t, n in sorted(ignored_objects.items())))
    return SlideAnnotation(path=path, tumour=tumour, n_features=len(keep), ignored=ignored,
                           ignored_objects=ignored_objects)


def tile_fractions(coords: np.ndarray, tile_size: float, region: BaseGeometry) -> np.ndarray:
    """Exact share of each tile square inside ``region``: coords (N, 2) level-0 top-left x, y -> (N,) float64."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(coords) == 0 or region.is_empty:
        return np.zeros(len(coords))
    x, y = coords[:, 0], coords[:, 1]
    tiles = shapely.box(x, y, x + tile_size, y + tile_size)  # (N,) polygons
    shapely.prepare(region)
    hit = shapely.intersects(region, tiles)  # cheap test first; exact areas only where needed
    out = np.zeros(len(coords))
    if hit.any():
        inside = shapely.contains_properly(region, tiles[hit])
        area = np.where(inside, tile_size * tile_size,
                        shapely.area(shapely.intersection(tiles[hit], region)))
        out[hit] = area / (tile_size * tile_size)
    return np.clip(out, 0.0, 1.0)


def tile_labels(coords: np.ndarray, tile_size: float, region: BaseGeometry, min_fraction: float = 0.5) -> np.ndarray:
    """1.0 where at least ``min_fraction`` of the tile lies inside ``region``, else 0.0: (N,) float32."""
    return (tile_fractions(coords, tile_size, region) >= min_fraction - 1e-12).astype(np.float32)


def polygon_rings(geom: BaseGeometry) -> list[np.ndarray]:
    """Exterior and interior rings of every polygon of ``geom`` as (K, 2) arrays (for outlines on heatmaps)."""
    rings = []
    for part in _areal_parts(geom):
        polys = part.geoms if part.geom_type == "MultiPolygon" else [part]
        for poly in polys:
            rings.append(np.asarray(poly.exterior.coords))
            rings.extend(np.asarray(r.coords) for r in poly.interiors)
    return rings


def params_from_config(cfg: dict[str, Any] | None) -> AnnotationParams:
    cfg = dict(cfg or {})
    classes: Sequence[str] = cfg.get("classes", DEFAULT_CLASSES)
    return AnnotationParams(classes=tuple(classes), include_unclassified=bool(cfg.get("include_unclassified", False)),
                            min_fraction=float(cfg.get("min_fraction", 0.5)),
                            object_types=tuple(cfg.get("object_types", DEFAULT_OBJECT_TYPES)))
