"""The one look of every figure: matplotlib settings, the palette, and the atomic save (PNG, SVG for curves)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wsiomics.io import atomic_path  # noqa: E402

DPI = 120
RC = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.4,
    "image.cmap": "viridis",
    "svg.fonttype": "none",  # text stays text in the SVG (editable in Inkscape / Illustrator)
    "svg.hashsalt": "wsiomics",  # stable element ids: the same inputs give the same SVG
}
CATEGORICAL = "tab10"  # classes, folds, methods
SEQUENTIAL = "viridis"  # counts, probabilities
HEAT = "inferno"  # attention and tumour probability over a slide
OUTLINE = "#00e5ff"  # annotation outlines over H&E
CHANCE = "#9e9e9e"  # chance and diagonal reference lines
MISSING = "#d9d9d9"  # background where a slide has no tile


def colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours from the categorical palette (cycled past its size)."""
    cmap = plt.get_cmap(CATEGORICAL)
    return [cmap(i % cmap.N) for i in range(n)]


@contextlib.contextmanager
def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (3.6, 3.2), **kwargs) -> Iterator:
    """A figure of ``nrows`` x ``ncols`` panels of ``size`` inches each, in the house style; closed on exit."""
    with plt.rc_context(RC):
        fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kwargs)
        try:
            yield fig, axes
        finally:
            plt.close(fig)


@contextlib.contextmanager
def canvas(width: float, height: float) -> Iterator:
    """An empty figure of ``width`` x ``height`` inches in the house style (panels laid out by the caller)."""
    with plt.rc_context(RC):
        fig = plt.figure(figsize=(width, height))
        try:
            yield fig
        finally:
            plt.close(fig)


def save(fig, path: Path, svg: bool = False) -> list[Path]:
    """Write ``path`` (PNG) and, for curves, the same figure as SVG beside it; each atomically."""
    out = []
    with plt.rc_context(RC):
        for p, fmt in ((Path(path), "png"), *(((Path(path).with_suffix(".svg"), "svg"),) if svg else ())):
            with atomic_path(p) as tmp:
                fig.savefig(tmp, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
            out.append(p)
    return out


def title_case(text: str) -> str:
    return text.replace("_", " ")


def legend_outside(ax, handles: Sequence | None = None, **kwargs) -> None:
    """Legend to the right of the axes (many methods or classes would cover the curves)."""
    if handles is not None:
        kwargs["handles"] = handles
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def tile_grid(ax, coords: np.ndarray, values: np.ndarray, tile: float, scale: tuple[float, float] = (1.0, 1.0)):
    """Per-tile ``values`` as an image on the slide's tile grid, in the coordinates of ``scale`` (level-0 px
    divided by it: thumbnail px). Returns the image array (NaN where no tile) and its extent."""
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    grid = np.rint(coords / tile).astype(np.int64)
    lo = grid.min(0) if len(grid) else np.zeros(2, np.int64)
    shape = grid.max(0) - lo + 1 if len(grid) else np.ones(2, np.int64)
    image = np.full((int(shape[1]), int(shape[0])), np.nan)
    if len(grid):
        image[grid[:, 1] - lo[1], grid[:, 0] - lo[0]] = values
    x0, y0 = lo * tile
    extent = (x0 / scale[0], (x0 + shape[0] * tile) / scale[0], (y0 + shape[1] * tile) / scale[1], y0 / scale[1])
    return image, extent
