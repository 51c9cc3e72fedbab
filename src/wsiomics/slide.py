"""Opening slides with OpenSlide, resolving their resolution, and reading them at low resolution.

Shared by every stage that touches pixels. Failures raise :class:`SlideError` with a ``status`` code
that the pipeline records per slide (``unreadable``, ``no_mpp``) and a message naming the file and fix.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import cv2
import numpy as np
import openslide

#: A scan's plausible micrometres per pixel; outside this a value is a unit mix-up (72 dpi tags etc.).
MPP_RANGE = (0.05, 20.0)
_TIFF_UNITS_UM = {"centimeter": 1e4, "inch": 25400.0}


class SlideError(RuntimeError):
    """A slide that cannot be used; ``status`` is the short code written to the status table.

    It survives process boundaries: pickling keeps the status, and it can be rebuilt from its message
    alone (status ``unreadable``), which is how torch re-raises an error from a DataLoader worker
    (``type(e)(message)``); otherwise a bad slide read in a worker would surface as a bare RuntimeError.
    """

    def __init__(self, status: str, message: str | None = None):
        if message is None:  # rebuilt from the message alone
            status, message = "unreadable", _original_message(status)
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        return type(self), (self.status, str(self))


def _original_message(text: str) -> str:
    """The message inside torch's worker report ('Caught SlideError in DataLoader worker process 0.
    Original Traceback ... SlideError: <message>'), so a recorded reason is not a traceback."""
    marker = "SlideError: "
    at = text.rfind(marker)
    return text[at + len(marker):].strip() if text.startswith("Caught ") and at >= 0 else text


@dataclass(frozen=True)
class Mpp:
    """Level-0 micrometres per pixel and where the value came from."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2


def open_slide(path: str | os.PathLike) -> openslide.OpenSlide:
    """Open ``path`` with OpenSlide, turning its errors into a :class:`SlideError` naming the file."""
    try:
        return openslide.OpenSlide(os.fspath(path))
    except openslide.OpenSlideUnsupportedFormatError as e:
        raise SlideError("unreadable", f"{path}: not a slide format OpenSlide supports ({e}). Fix: convert it "
                         "to a pyramidal tiled TIFF, or remove the row from the sample sheet") from e
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError("unreadable", f"{path}: OpenSlide cannot read it ({e}); the file may be truncated or "
                         "corrupt. Fix: re-download or re-export the slide") from e


def _plausible(value: float) -> bool:
    return math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]


def _from_tiff_tags(props: dict[str, str]) -> tuple[float, float] | None:
    unit = props.get("tiff.ResolutionUnit", "").lower()
    if unit not in _TIFF_UNITS_UM:
        return None
    try:
        xres, yres = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
    except (KeyError, ValueError):
        return None
    if xres <= 0 or yres <= 0:
        return None
    return _TIFF_UNITS_UM[unit] / xres, _TIFF_UNITS_UM[unit] / yres


def _from_vendor(props: dict[str, str]) -> tuple[float, float, str] | None:
    """Vendor keys OpenSlide does not always turn into ``openslide.mpp-x``."""
    for key in ("aperio.MPP", "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X", "hamamatsu.mpp-x"):
        if key in props:
            try:
                v = float(props[key])
            except ValueError:
                continue
            return v, v, key
    if "philips.DICOM_PIXEL_SPACING" in props:  # millimetres, "y x"
        try:
            y, x = (float(v) * 1e3 for v in props["philips.DICOM_PIXEL_SPACING"].strip('"').split())
            return x, y, "philips.DICOM_PIXEL_SPACING"
        except ValueError:
            pass
    return None


def resolve_mpp(props: dict[str, str], override: float | None, where: str) -> Mpp:
    """Level-0 µm/px in the documented order: sheet override, ``openslide.mpp-x``, TIFF tags, vendor keys.

    Implausible values (e.g. a 72 dpi tag written by an image editor) are skipped, not trusted.
    """
    if override is not None:
        return Mpp(float(override), float(override), "sample_sheet")
    candidates: list[tuple[float, float, str]] = []
    with contextlib.suppress(KeyError, ValueError):
        candidates.append((float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]), "openslide.mpp-x"))
    tags = _from_tiff_tags(props)
    if tags:
        candidates.append((*tags, "tiff.XResolution"))
    vendor = _from_vendor(props)
    if vendor:
        candidates.append(vendor)
    rejected = []
    for x, y, source in candidates:
        if _plausible(x) and _plausible(y):
            return Mpp(x, y, source)
        rejected.append(f"{source}={x:g}")
    why = f" (implausible values ignored: {', '.join(rejected)})" if rejected else ""
    raise SlideError("no_mpp", f"{where}: cannot determine microns per pixel: no 'openslide.mpp-x', no TIFF "
                     f"resolution tags in cm or inch, no vendor MPP{why}. Fix: put the scan's resolution in "
                     "the sample sheet's 'mpp' column for this slide (0.25 for 40x, 0.5 for 20x scans)")


def best_level(slide: openslide.OpenSlide, downsample: float, tolerance: float = 0.01) -> int:
    """The coarsest level whose downsample does not exceed ``downsample`` (within ``tolerance``).

    Unlike ``get_best_level_for_downsample`` this tolerates the rounding in level sizes
    (a "4x" level is often 4.0003x), so a level that matches the request is chosen.
    """
    level = 0
    for i, ds in enumerate(slide.level_downsamples):
        if ds <= downsample * (1 + tolerance):
            level = i
    return level


def read_rgb(slide: openslide.OpenSlide, location: tuple[int, int], level: int, size: tuple[int, int],
             out: np.ndarray | None = None) -> np.ndarray:
    """``read_region`` as RGB uint8, with transparent (outside-slide) pixels shown as white glass.

    ``out`` (h, w, 3) receives the pixels without an intermediate copy (the feature readers' hot path).
    """
    rgba = np.asarray(slide.read_region(location, level, size))
    rgb = rgba[..., :3].copy() if out is None else out
    if out is not None:
        out[...] = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 0:
        rgb[alpha == 0] = 255
    return rgb


def read_downsampled(
    slide: openslide.OpenSlide, downsample: float, block: int = 4096
) -> tuple[np.ndarray, float, float]:
    """The whole slide as RGB at roughly ``downsample`` (level-0 px per output px), read block by block.

    Memory stays bounded by the output size even when the slide has no suitable pyramid level.
    Returns the image and the exact x and y downsample of the output.
    """
    width, height = slide.dimensions
    out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
    level = best_level(slide, downsample)
    lw, lh = slide.level_dimensions[level]
    lds_x, lds_y = width / lw, height / lh
    out = np.empty((out_h, out_w, 3), np.uint8)
    sx, sy = lw / out_w, lh / out_h  # level px per output px
    step = max(1, int(block / max(sx, sy)))  # output px per block
    for oy in range(0, out_h, step):
        for ox in range(0, out_w, step):
            ow, oh = min(step, out_w - ox), min(step, out_h - oy)
            lx0, ly0 = round(ox * sx), round(oy * sy)
            lx1, ly1 = min(lw, round((ox + ow) * sx)), min(lh, round((oy + oh) * sy))
            region = read_rgb(slide, (round(lx0 * lds_x), round(ly0 * lds_y)), level,
                              (max(1, lx1 - lx0), max(1, ly1 - ly0)))
            out[oy:oy + oh, ox:ox + ow] = cv2.resize(region, (ow, oh), interpolation=cv2.INTER_AREA)
    return out, width / out_w, height / out_h
