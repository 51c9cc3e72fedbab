"""Per-slide QC picture: thumbnail, tissue contour, artefacts, and the kept tile grid."""

from __future__ import annotations

import os

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from wsiomics.io import atomic_path  # noqa: E402

MAX_SIDE = 1400


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return [c[:, 0, :] for c in found if len(c) > 2]


def write_qc_png(path: str | os.PathLike, title: str, thumbnail: np.ndarray | None = None,
                 tissue: np.ndarray | None = None, artifact: np.ndarray | None = None,
                 tiles_xy: np.ndarray | None = None, tile_size: float = 0.0, message: str = "") -> None:
    """Draw the QC figure; ``tiles_xy`` and ``tile_size`` are in thumbnail pixels."""
    if thumbnail is None or thumbnail.size == 0:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.axis("off")
        ax.text(0.0, 0.5, message, wrap=True, va="center", fontsize=9, transform=ax.transAxes)
    else:
        h, w = thumbnail.shape[:2]
        scale = min(1.0, MAX_SIDE / max(h, w))
        fig, ax = plt.subplots(figsize=(max(4.0, 9 * w / max(h, w)), max(3.0, 9 * h / max(h, w)) + 0.6))
        ax.imshow(thumbnail, extent=(0, w, h, 0), interpolation="antialiased" if scale < 1 else "nearest")
        if tiles_xy is not None and len(tiles_xy):
            rects = [Rectangle((x, y), tile_size, tile_size) for x, y in tiles_xy]
            ax.add_collection(PatchCollection(rects, facecolor=(1, 0.85, 0, 0.12), edgecolor=(0.9, 0.6, 0, 0.8),
                                              linewidth=0.3))
        for mask, colour, label in ((tissue, "lime", "tissue"), (artifact, "red", "pen / dark artefact")):
            if mask is None or not mask.any():
                continue
            for i, c in enumerate(_contours(mask)):
                ax.plot(*np.r_[c, c[:1]].T, color=colour, linewidth=0.8, label=label if i == 0 else None)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        if message:
            ax.set_xlabel(message, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
