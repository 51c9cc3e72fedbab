"""The patch grid: which level-0 squares of the target physical size become tiles.

Cells are squares of ``patch_size * target_mpp`` micrometres laid from the slide's origin; only cells
fully inside the slide count. Tissue and artefact fractions per cell are exact area integrals over the
low-resolution masks (bilinear lookup in the integral image), so they do not depend on how the grid
happens to align with mask pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    patch_size_level0: float  # square side in level-0 px (may be fractional)
    n_cols: int
    n_rows: int

    def origins(self) -> np.ndarray:
        """(n_rows * n_cols, 2) float level-0 (x, y) of every cell, in raster order (row by row)."""
        rows, cols = np.mgrid[0:self.n_rows, 0:self.n_cols]
        return np.stack([cols.ravel(), rows.ravel()], axis=1) * self.patch_size_level0


def make_grid(width: int, height: int, patch_size_level0: float) -> Grid:
    return Grid(patch_size_level0, int(width // patch_size_level0), int(height // patch_size_level0))


def _integral(mask: np.ndarray) -> np.ndarray:
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    out[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    return out


def _lookup(integral: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Area under the mask from (0, 0) to fractional (x, y): the integral image is bilinear in between."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x, y = np.clip(x, 0, w), np.clip(y, 0, h)
    x0, y0 = np.minimum(np.floor(x).astype(int), w - 1), np.minimum(np.floor(y).astype(int), h - 1)
    fx, fy = x - x0, y - y0
    return ((1 - fx) * (1 - fy) * integral[y0, x0] + fx * (1 - fy) * integral[y0, x0 + 1]
            + (1 - fx) * fy * integral[y0 + 1, x0] + fx * fy * integral[y0 + 1, x0 + 1])


def box_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box (N, 4: x0, y0, x1, y1 in mask px, fractional allowed) covered by ``mask``."""
    if len(boxes) == 0 or mask.size == 0:
        return np.zeros(len(boxes))
    integral = _integral(mask)
    x0, y0, x1, y1 = boxes.T
    area = _lookup(integral, x1, y1) - _lookup(integral, x0, y1) - _lookup(integral, x1, y0) + _lookup(integral, x0, y0)
    return np.clip(area / np.maximum((x1 - x0) * (y1 - y0), 1e-12), 0.0, 1.0)


def cell_fractions(grid: Grid, mask: np.ndarray, downsample_x: float, downsample_y: float) -> np.ndarray:
    """Fraction of every grid cell covered by ``mask`` (a mask at the given level-0 downsample)."""
    o = grid.origins()
    s = grid.patch_size_level0
    boxes = np.c_[o[:, 0] / downsample_x, o[:, 1] / downsample_y,
                  (o[:, 0] + s) / downsample_x, (o[:, 1] + s) / downsample_y]
    return box_fractions(mask, boxes)
