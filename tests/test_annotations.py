"""Tile labels from QuPath GeoJSON: exact area fractions, holes, multipolygons, classification filters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import MultiPolygon, Polygon, box, mapping

from wsiomics.annotations import (
    AnnotationError,
    AnnotationParams,
    params_from_config,
    read_annotation,
    tile_fractions,
    tile_labels,
)


def _feature(geom, name="Tumor"):
    props = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": mapping(geom), "properties": props}


def _write(path, features, collection=True):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features} if collection else features))
    return path


# a 350 x 400 rectangle from x=50 with a 100 x 100 hole at (150..250, 150..250)
WITH_HOLE = Polygon([(50, 0), (400, 0), (400, 400), (50, 400)], [[(150, 150), (250, 150), (250, 250), (150, 250)]])


def test_tile_fractions_with_a_hole_equal_the_exact_area_fraction():
    coords = np.array([[0, 0], [100, 100], [200, 200], [150, 150], [300, 300], [400, 0], [-100, -100]])
    got = tile_fractions(coords, 100.0, WITH_HOLE)
    # (0,0): x in [50,100] inside -> 0.5; (100,100): hole covers [150,200]^2 = 2500 -> 0.75;
    # (200,200): hole covers [200,250]^2 -> 0.75; (150,150): the hole itself -> 0; (300,300): inside -> 1;
    # (400,0): outside, touching the edge -> 0; (-100,-100): outside -> 0
    np.testing.assert_allclose(got, [0.5, 0.75, 0.75, 0.0, 1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(tile_labels(coords, 100.0, WITH_HOLE), [1, 1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(tile_labels(coords, 100.0, WITH_HOLE, min_fraction=0.8), [0, 0, 0, 0, 1, 0, 0])
    # a slanted edge: the triangle below the diagonal of the tile is exactly half of it
    tri = Polygon([(0, 0), (100, 0), (0, 100)])
    assert tile_fractions(np.array([[0, 0]]), 100.0, tri)[0] == pytest.approx(0.5, abs=1e-12)
    assert tile_fractions(np.zeros((0, 2)), 100.0, tri).shape == (0,)


def test_multipolygons_union_and_classification_filter(tmp_path):
    a, b = box(0, 0, 100, 50), box(0, 50, 100, 100)  # two halves of one tile, as separate polygons
    other = box(200, 0, 300, 100)
    features = [_feature(MultiPolygon([a, box(500, 500, 600, 600)])), _feature(b, "Tumour"),
                _feature(other, "Stroma"), _feature(box(300, 0, 400, 100), None),
                {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]},
                 "properties": {"classification": {"name": "Tumor"}}}]
    path = _write(tmp_path / "s.geojson", features)
    ann = read_annotation(path)
    assert ann.n_features == 2 and ann.ignored == {"Stroma": 1, "<unclassified>": 1}  # the point has no area
    coords = np.array([[0, 0], [200, 0], [300, 0], [500, 500], [550, 550]])
    np.testing.assert_allclose(tile_fractions(coords, 100.0, ann.tumour), [1.0, 0.0, 0.0, 1.0, 0.25])
    loose = read_annotation(path, AnnotationParams(classes=("Tumor", "Stroma"), include_unclassified=True))
    np.testing.assert_allclose(tile_fractions(coords[:3], 100.0, loose.tumour), [0.5, 1.0, 1.0])
    # a bare list of features (QuPath's "export as array") reads the same
    listed = read_annotation(_write(tmp_path / "l.geojson", features, collection=False))
    assert listed.tumour.equals(ann.tumour)


def test_overlapping_polygons_are_not_counted_twice_and_bad_files_name_the_fix(tmp_path):
    features = [_feature(box(0, 0, 100, 100)), _feature(box(50, 0, 150, 100))]
    ann = read_annotation(_write(tmp_path / "o.geojson", features))
    assert tile_fractions(np.array([[0, 0], [100, 0]]), 100.0, ann.tumour).tolist() == [1.0, 0.5]
    bowtie = Polygon([(0, 0), (100, 100), (100, 0), (0, 100)])  # self-intersecting ring: repaired
    fixed = read_annotation(_write(tmp_path / "b.geojson", [_feature(bowtie)]))
    assert fixed.tumour.area == pytest.approx(5000.0)
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        read_annotation(tmp_path / "bad.geojson")
    with pytest.raises(AnnotationError, match="annotation_path"):
        read_annotation(tmp_path / "missing.geojson")
    empty = read_annotation(_write(tmp_path / "e.geojson", []))
    assert empty.tumour.is_empty and tile_labels(np.array([[0, 0]]), 100.0, empty.tumour).tolist() == [0.0]


def _object(geom, object_type, name="Tumor"):
    feature = _feature(geom, name)
    feature["properties"]["objectType"] = object_type
    if object_type == "cell":  # QuPath writes a cell's nucleus beside its outline
        feature["nucleusGeometry"] = mapping(geom.centroid.buffer(3))
    return feature


def test_qupath_detections_and_cells_are_not_tumour_regions(tmp_path):
    """A QuPath export of a slide with cell detection run: one tumour annotation plus cells classified by a cell
    classifier ("Tumor" cells inside and outside it) and plain detections. Only the annotation is a region."""
    region = box(0, 0, 200, 100)
    cells = [_object(box(x, y, x + 20, y + 20), "cell") for x, y in ((10, 10), (150, 50), (250, 10), (310, 60))]
    features = [_feature(region), *cells, _object(box(240, 0, 300, 40), "detection"),
                _object(box(220, 60, 260, 100), "detection", None)]
    path = _write(tmp_path / "qupath.geojson", features)
    ann = read_annotation(path)
    assert ann.tumour.equals(region) and ann.n_features == 1
    assert ann.ignored_objects == {"cell": 4, "detection": 2}
    coords = np.array([[0, 0], [100, 0], [200, 0], [300, 0]])
    np.testing.assert_allclose(tile_fractions(coords, 100.0, ann.tumour), [1.0, 1.0, 0.0, 0.0])
    # plain GeoJSON (no objectType) still counts
    plain = {"type": "Feature", "geometry": mapping(box(200, 0, 300, 100)), "properties": {"classification": "Tumor"}}
    both = read_annotation(_write(tmp_path / "plain.geojson", [*features, plain]))
    np.testing.assert_allclose(tile_fractions(coords, 100.0, both.tumour), [1.0, 1.0, 1.0, 0.0])
    # configurable: cells counted too (the cell at x=310 covers 4% of the last tile)
    with_cells = read_annotation(path, params_from_config({"object_types": ["annotation", "cell"]}))
    assert with_cells.n_features == 5 and with_cells.ignored_objects == {"detection": 2}
    np.testing.assert_allclose(tile_fractions(coords, 100.0, with_cells.tumour), [1.0, 1.0, 0.04, 0.04])
