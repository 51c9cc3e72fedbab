"""Write a synthetic slide as a pyramidal, JPEG-tiled TIFF that OpenSlide opens.

Two layouts: Aperio-style ``.svs`` (MPP and AppMag in the ImageDescription, a stripped thumbnail as
the second directory, levels at 4x steps) and generic tiled ``.tiff`` (resolution tags, 2x steps).
Tiles are rendered on demand, so slides far larger than memory can be written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from wsiomics.synth.geometry import SlideGeometry
from wsiomics.synth.render import render_region

TILE = 256


def level_shapes(width: int, height: int, step: int, min_size: int = 512) -> list[tuple[int, int]]:
    """(width, height) of each pyramid level, each ``step`` times smaller, down to about ``min_size``."""
    shapes = [(width, height)]
    while max(shapes[-1]) / step >= min_size:
        shapes.append((max(1, math.ceil(width / step ** len(shapes))),
                       max(1, math.ceil(height / step ** len(shapes)))))
    return shapes


def _tiles(geom: SlideGeometry, shape: tuple[int, int], seed: int) -> Iterator[np.ndarray]:
    w, h = shape
    ds_x, ds_y = geom.width / w, geom.height / h
    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            yield render_region(geom, tx * ds_x, ty * ds_y, TILE, TILE, (ds_x + ds_y) / 2, seed)


def _whole(geom: SlideGeometry, shape: tuple[int, int], seed: int) -> np.ndarray:
    w, h = shape
    return render_region(geom, 0, 0, w, h, geom.width / w, seed)


def write_slide(path: str | Path, geom: SlideGeometry, seed: int, *, fmt: str = "svs",
                mpp_metadata: bool = True, resolution_unit: str = "CENTIMETER",
                quality: int = 88, objective: int | None = None) -> Path:
    """Write ``geom`` to ``path`` as ``fmt`` ('svs' or 'tiff').

    ``mpp_metadata=False`` leaves the resolution out (for testing the no-MPP path);
    ``resolution_unit`` ('CENTIMETER' or 'INCH') picks how a generic TIFF states it.
    """
    path = Path(path)
    common = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": quality},
              "metadata": None, "dtype": np.uint8}
    objective = objective or (40 if geom.mpp < 0.4 else 20)
    if fmt == "svs":
        shapes = level_shapes(geom.width, geom.height, 4)
        fields = [f"AppMag = {objective}", f"Filename = {path.stem}"]
        if mpp_metadata:
            fields.insert(1, f"MPP = {geom.mpp:.4f}")
        header = f"Aperio Image Library v12.0.15 \r\n{geom.width}x{geom.height} [0,0 {geom.width}x{geom.height}]"
        with tifffile.TiffWriter(path, bigtiff=geom.width * geom.height > 2**31) as tw:
            for i, shape in enumerate(shapes):
                desc = f"{header} ({TILE}x{TILE}) JPEG/RGB Q={quality}|" + "|".join(fields)
                if i:
                    desc = f"{header} -> {shape[0]}x{shape[1]} JPEG/RGB Q={quality}"
                tw.write(_tiles(geom, shape, seed), shape=(shape[1], shape[0], 3), tile=(TILE, TILE),
                         description=desc, **common)
                if i == 0:  # Aperio's second directory is a stripped thumbnail (an associated image)
                    thumb_w = 768
                    thumb = _whole(geom, (thumb_w, max(1, round(geom.height * thumb_w / geom.width))), seed)
                    tw.write(thumb, photometric="rgb", description=f"{header} -> thumbnail", metadata=None)
    elif fmt == "tiff":
        shapes = level_shapes(geom.width, geom.height, 2)
        per_unit = 1e4 if resolution_unit.upper() == "CENTIMETER" else 25400.0
        with tifffile.TiffWriter(path, bigtiff=geom.width * geom.height > 2**31) as tw:
            for i, shape in enumerate(shapes):
                extra = {}
                if mpp_metadata:
                    level_mpp = geom.mpp * geom.width / shape[0]
                    extra = {"resolution": (per_unit / level_mpp, per_unit / level_mpp),
                             "resolutionunit": resolution_unit.upper()}
                tw.write(_tiles(geom, shape, seed), shape=(shape[1], shape[0], 3), tile=(TILE, TILE),
                         subfiletype=1 if i else 0, **extra, **common)
    else:
        raise ValueError(f"unknown slide format {fmt!r}: use 'svs' or 'tiff'")
    return path
