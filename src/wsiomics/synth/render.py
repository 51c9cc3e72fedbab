"""Render any region of a synthetic slide at any downsample, with H&E-like colours.

Tissue is eosin-pink stroma with hematoxylin-purple nuclei (denser and larger in tumour, and in tissue
type 1, which is how the image carries class signal); glass is near-white; pen ink darkens what lies
under it like real ink; dust specks are grey. Regions are rendered independently (seeded by position),
so pyramid levels and tiles can be produced in any order and in parallel.
"""

from __future__ import annotations

import functools
import zlib

import cv2
import numpy as np
from shapely.geometry import box

from wsiomics.synth.geometry import PEN_TRANSMITTANCE, SlideGeometry, polygons

GLASS = np.array([238.0, 236.0, 240.0])
EOSIN = np.array([236.0, 158.0, 196.0])
HEMATOXYLIN = np.array([88.0, 52.0, 138.0])
DUST = np.array([105.0, 103.0, 100.0])

# Nuclei per square micrometre and their radius in micrometres, per tissue kind.
NUCLEI = {"type0": (0.0035, 2.8), "type1": (0.0075, 3.3), "tumour": (0.0085, 4.2)}

_SHIFT = 4  # cv2 sub-pixel bits


def rasterize(geom, x0: float, y0: float, w: int, h: int, downsample: float) -> np.ndarray:
    """Boolean mask (h, w) of ``geom`` (level-0 px) over the region starting at level-0 (x0, y0)."""
    mask = np.zeros((h, w), np.uint8)
    if geom.is_empty:
        return mask.astype(bool)
    region = box(x0, y0, x0 + w * downsample, y0 + h * downsample)
    if not geom.intersects(region):
        return mask.astype(bool)

    def ring(coords) -> np.ndarray:
        pts = (np.asarray(coords)[:, :2] - (x0, y0)) / downsample - 0.5
        return np.round(pts * (1 << _SHIFT)).astype(np.int32)

    for poly in polygons(geom):
        if not poly.intersects(region):
            continue
        cv2.fillPoly(mask, [ring(poly.exterior.coords)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
        holes = [ring(i.coords) for i in poly.interiors]
        if holes:
            cv2.fillPoly(mask, holes, 0, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask.astype(bool)


_NOISE_SIDE = 1024


@functools.cache
def _noise_bank() -> np.ndarray:
    """Standard-normal noise, drawn once; tiles take windows at random offsets (drawing per tile is slow)."""
    return np.random.default_rng(12345).standard_normal((_NOISE_SIDE * 2, _NOISE_SIDE * 2, 4)).astype(np.float32)


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 4) standard-normal noise; the bank is tiled for regions larger than it."""
    bank = _noise_bank()
    if h > _NOISE_SIDE or w > _NOISE_SIDE:
        reps = (-(-h // bank.shape[0]) + 1, -(-w // bank.shape[1]) + 1, 1)
        bank = np.tile(bank, reps)
    y, x = rng.integers(0, bank.shape[0] - h + 1), rng.integers(0, bank.shape[1] - w + 1)
    return bank[y:y + h, x:x + w]


def _rng(seed: int, *key: float) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


def render_region(geom: SlideGeometry, x0: float, y0: float, w: int, h: int, downsample: float,
                  seed: int) -> np.ndarray:
    """RGB uint8 (h, w, 3) image of the level-0 region at (x0, y0) seen at ``downsample``."""
    rng = _rng(seed, round(x0), round(y0), round(downsample, 4))
    tissue = rasterize(geom.tissue, x0, y0, w, h, downsample)
    noise = _noise(rng, h, w)
    out = np.empty((h, w, 3), np.float32)
    out[:] = GLASS
    if tissue.any():
        tumour = rasterize(geom.tumour, x0, y0, w, h, downsample) & tissue
        kind = "type1" if geom.tissue_type else "type0"
        um_per_px = geom.mpp * downsample
        h_strength, e_strength = geom.stain
        eosin = GLASS + (EOSIN - GLASS) * e_strength
        hema = GLASS + (HEMATOXYLIN - GLASS) * h_strength
        nuclear = np.zeros((h, w), np.float32)
        for name, where in ((kind, tissue & ~tumour), ("tumour", tumour)):
            if not where.any():
                continue
            density, radius_um = NUCLEI[name]
            radius_px = radius_um / um_per_px
            if radius_px >= 1.2:  # nuclei are resolvable: draw them
                layer = np.zeros((h, w), np.uint8)
                n = rng.poisson(density * w * h * um_per_px**2)
                xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
                radii = np.maximum(1, radius_px * rng.uniform(0.7, 1.3, n))
                for x, y, r in zip(xs, ys, radii, strict=True):
                    cv2.circle(layer, (int(x), int(y)), int(round(r)), 1, -1)
                nuclear = np.where(where, np.maximum(nuclear, layer * rng.uniform(0.75, 1.0)), nuclear)
            else:  # below nuclear size: the expected mixture of stain colours
                coverage = min(0.95, density * np.pi * radius_um**2)
                nuclear[where] = coverage
        mix = nuclear[..., None]
        texture = 1.0 + 0.05 * noise[..., 3:4]
        stained = (eosin * (1 - mix) + hema * mix) * texture
        out = np.where(tissue[..., None], stained, out)
    out += 1.5 * noise[..., :3]
    dust = rasterize(geom.dust, x0, y0, w, h, downsample)
    if dust.any():
        out[dust] = DUST
    for colour, stroke in geom.pens:
        ink = rasterize(stroke, x0, y0, w, h, downsample)
        if ink.any():
            out[ink] *= np.asarray(PEN_TRANSMITTANCE[colour], np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)
