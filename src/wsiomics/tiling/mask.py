"""Tissue detection on a low-resolution RGB image whose micrometres per pixel are known.

Tissue is what is saturated (H&E stains are; glass is not), after a median blur, thresholded by Otsu
clamped to a sane range so a blank slide stays blank. Pen ink and dark artefacts are found by colour
(green-to-blue hues, which H&E lacks: hematoxylin is violet, with red above green; and near-black) and cut
out with a margin. Every size parameter is in micrometres, so a small tissue fragment is treated the
same at any scan resolution and mask resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class MaskParams:
    saturation_min: int = 15  # Otsu's threshold is clamped to [min, max] (0-255 scale)
    saturation_max: int = 50
    brightness_max: int = 245  # brighter than this is glass whatever its saturation
    blur_um: float = 12.0
    close_um: float = 16.0
    min_tissue_area_um2: float = 5000.0  # smaller pieces are debris (about 70 x 70 um)
    max_hole_area_um2: float = 20000.0  # smaller holes inside tissue are filled
    pen_hue_min_deg: float = 60.0  # green ... blue: hues H&E never takes
    pen_hue_max_deg: float = 248.0  # blue ink has R ~ G (240 deg); hematoxylin has R > G
    pen_saturation_min: int = 50
    dark_max: int = 60  # value (brightness) below this: black ink, folds of debris, slide edges
    artifact_margin_um: float = 16.0


@dataclass
class TissueMask:
    tissue: np.ndarray  # bool (h, w)
    artifact: np.ndarray  # bool (h, w): pen ink and dark marks (before the margin)
    saturation_threshold: float


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def _disk(radius_px: float) -> np.ndarray:
    d = _odd(2 * radius_px)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    inverse = ~mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(inverse.astype(np.uint8), connectivity=4)
    h, w = mask.shape
    x, y, bw, bh = (stats[:, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (stats[:, cv2.CC_STAT_AREA] < max_px) & ~touches_border
    fill[0] = False  # label 0 is the tissue itself
    return mask | (fill[labels] & inverse)


def detect_tissue(rgb: np.ndarray, um_per_px: float, params: MaskParams = MaskParams()) -> TissueMask:
    """Tissue and artefact masks for ``rgb`` (h, w, 3 uint8) seen at ``um_per_px``."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # H in [0, 180), S and V in [0, 255]
    hue, sat, val = hsv[..., 0].astype(np.float32) * 2.0, hsv[..., 1], hsv[..., 2]
    blurred = cv2.medianBlur(sat, _odd(params.blur_um / um_per_px))
    otsu, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = float(np.clip(otsu, params.saturation_min, params.saturation_max))
    foreground = (blurred > threshold) & (val <= params.brightness_max)

    pen = (hue >= params.pen_hue_min_deg) & (hue < params.pen_hue_max_deg) & (sat >= params.pen_saturation_min)
    artifact = pen | (val < params.dark_max)
    margin = cv2.dilate(artifact.astype(np.uint8), _disk(params.artifact_margin_um / um_per_px)).astype(bool)

    tissue = foreground & ~margin
    tissue = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_CLOSE, _disk(params.close_um / um_per_px / 2))
    tissue = cv2.morphologyEx(tissue, cv2.MORPH_OPEN, _disk(params.close_um / um_per_px / 4)).astype(bool)
    px_area = um_per_px**2
    tissue = _fill_small_holes(tissue, params.max_hole_area_um2 / px_area) & ~margin
    tissue = _drop_small(tissue, params.min_tissue_area_um2 / px_area)
    return TissueMask(tissue=tissue, artifact=artifact, saturation_threshold=threshold)
