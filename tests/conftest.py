"""Shared fixtures: small synthetic slides with known truth, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsiomics.synth.cohort import write_truth
from wsiomics.synth.geometry import random_layout, scale_to_pixels
from wsiomics.synth.pyramid import write_slide


def make_slide(folder: Path, name: str, seed: int, mpp: float = 0.5, fmt: str = "svs", *, pen: bool = False,
               blank: bool = False, size_um: tuple[float, float] = (2800.0, 2100.0), **write_kwargs) -> Path:
    """Write a synthetic slide and its truth GeoJSON (``<name>.geojson`` beside it); return the slide path."""
    layout = random_layout(seed, *size_um, pen=pen, blank=blank)
    geom = scale_to_pixels(layout, mpp, tissue_type=seed % 2)
    path = write_slide(folder / f"{name}.{fmt}", geom, seed, fmt=fmt, **write_kwargs)
    write_truth(folder / f"{name}.geojson", geom)
    return path


@pytest.fixture(scope="session")
def slide_factory():
    """The :func:`make_slide` function, for tests that need a slide of their own."""
    return make_slide


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def slides(slide_dir) -> dict[str, Path]:
    """A small zoo: pen-marked slides at 20x (svs and tiff), the same layout at 40x, a blank slide."""
    return {
        "pen20": make_slide(slide_dir, "pen20", seed=11, pen=True),
        "pen20b": make_slide(slide_dir, "pen20b", seed=12, pen=True, fmt="tiff"),
        "pen20c": make_slide(slide_dir, "pen20c", seed=13, pen=True),
        "same40": make_slide(slide_dir, "same40", seed=11, mpp=0.25, pen=True),
        "blank": make_slide(slide_dir, "blank", seed=14, blank=True, fmt="tiff"),
    }
