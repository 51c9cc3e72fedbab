"""Tile one slide: resolve its resolution, find tissue, lay the patch grid, write the tiles store.

The store ``<slide_id>.zarr`` holds ``coords`` (N x 2 level-0 x, y, raster order), per-tile
``tissue_fraction`` and ``artifact_fraction``, and ``tissue_mask`` (low resolution), with attrs
recording everything needed to read a patch again. A slide that cannot be tiled still gets a store,
with zero tiles and ``status``/``reason`` attrs, so one bad slide never stops a cohort run; strict mode
raises instead.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openslide

from wsiomics.io import atomic_zarr, json_safe, write_array
from wsiomics.slide import SlideError, best_level, open_slide, read_downsampled, read_rgb, resolve_mpp
from wsiomics.tiling.grid import cell_fractions, make_grid
from wsiomics.tiling.mask import MaskParams, detect_tissue

log = logging.getLogger("wsiomics.tiling")

OK, NO_TISSUE = "ok", "no_tissue"
STATUSES = (OK, NO_TISSUE, "no_mpp", "unreadable", "resolution_too_low", "error")


@dataclass(frozen=True)
class TilingParams:
    target_mpp: float = 0.5  # micrometres per pixel of the patches (0.5 = 20x)
    patch_size: int = 224  # patch side in pixels at target_mpp
    min_tissue_fraction: float = 0.5
    max_artifact_fraction: float = 0.05  # pen ink / dark marks allowed inside a kept tile
    mask_mpp: float = 4.0  # resolution the tissue mask is computed at
    allow_upsampling: bool = False  # tile a scan coarser than target_mpp by enlarging it
    verify_reads: int = 16  # patches read back (spread over the slide) to catch damaged tile data; 0: none
    mask: MaskParams = field(default_factory=MaskParams)


class TilingError(RuntimeError):
    """Raised in strict mode for a slide that could not be tiled."""


@dataclass
class TilingResult:
    slide_id: str
    status: str
    reason: str
    n_tiles: int
    attrs: dict[str, Any]


def _slide_attrs(slide, path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"slide_path": str(path), "slide_bytes": stat.st_size, "slide_mtime": stat.st_mtime,
            "vendor": slide.properties.get("openslide.vendor", "unknown"),
            "slide_width": slide.dimensions[0], "slide_height": slide.dimensions[1],
            "level_dimensions": [list(d) for d in slide.level_dimensions],
            "level_downsamples": list(slide.level_downsamples)}


def _tile(slide, slide_id: str, mpp_override: float | None, params: TilingParams, where: str):
    mpp = resolve_mpp(dict(slide.properties), mpp_override, where)
    if mpp.mean > params.target_mpp * 1.1 and not params.allow_upsampling:
        raise SlideError("resolution_too_low", f"{where}: scanned at {mpp.mean:.3f} um/px ({mpp.source}), coarser "
                         f"than the target {params.target_mpp} um/px. Fix: lower tiling.target_mpp, set "
                         "tiling.allow_upsampling: true, or correct the 'mpp' column if the value is wrong")
    mask_ds = max(1.0, params.mask_mpp / mpp.mean)
    thumb, ds_x, ds_y = read_downsampled(slide, mask_ds)
    mask = detect_tissue(thumb, mpp.mean * (ds_x + ds_y) / 2, params.mask)

    patch_level0 = params.patch_size * params.target_mpp / mpp.mean
    grid = make_grid(*slide.dimensions, patch_level0)
    tissue_frac = cell_fractions(grid, mask.tissue, ds_x, ds_y)
    artifact_frac = cell_fractions(grid, mask.artifact, ds_x, ds_y)
    keep = (tissue_frac >= params.min_tissue_fraction) & (artifact_frac <= params.max_artifact_fraction)
    coords = np.round(grid.origins()[keep]).astype(np.int64)

    target_ds = params.target_mpp / mpp.mean
    level = best_level(slide, target_ds)
    level_ds = slide.level_downsamples[level]
    geometry = {
        "mpp_x": mpp.x, "mpp_y": mpp.y, "mpp": mpp.mean, "mpp_source": mpp.source,
        "target_mpp": params.target_mpp, "patch_size": params.patch_size, "patch_size_level0": patch_level0,
        "read_level": level, "read_downsample": level_ds, "read_size": int(round(patch_level0 / level_ds)),
        "grid_cols": grid.n_cols, "grid_rows": grid.n_rows, "mask_downsample": [ds_x, ds_y],
        "mask_mpp": mpp.mean * (ds_x + ds_y) / 2, "saturation_threshold": mask.saturation_threshold,
        "tissue_area_mm2": float(mask.tissue.sum() * ds_x * ds_y * mpp.x * mpp.y / 1e6),
        "upsampled": bool(target_ds < 1 / 1.1),
    }
    _verify_reads(slide, coords, level, geometry["read_size"], params.verify_reads, where)
    return coords, tissue_frac[keep], artifact_frac[keep], mask, thumb, geometry


def _verify_reads(slide, coords: np.ndarray, level: int, size: int, n: int, where: str) -> None:
    """Read ``n`` patches spread over the slide: damaged level-0 data (the pyramid above it may be intact)
    is found here rather than halfway through feature extraction."""
    if n <= 0 or len(coords) == 0:
        return
    for i in np.unique(np.linspace(0, len(coords) - 1, min(n, len(coords))).round().astype(int)):
        x, y = (int(v) for v in coords[i])
        try:
            read_rgb(slide, (x, y), level, (size, size))
        except Exception as e:  # OpenSlide raises its own error; a broken codec may raise others
            raise SlideError("unreadable", f"{where}: the patch at level-0 ({x}, {y}) cannot be read from level "
                             f"{level} ({type(e).__name__}: {e}); the slide's tile data is damaged. Fix: "
                             "re-download or re-export the slide") from e


def tile_slide(slide_path: str | os.PathLike, slide_id: str, out: str | os.PathLike, qc_png: str | os.PathLike,
               params: TilingParams = TilingParams(), mpp_override: float | None = None,
               strict: bool = False, patient_id: str = "") -> TilingResult:
    """Tile one slide into the store ``out`` and draw ``qc_png``; see the module docstring."""
    start = time.perf_counter()
    path = Path(slide_path).resolve()
    where = f"slide {slide_id} ({path})"
    attrs: dict[str, Any] = {"slide_id": slide_id, "patient_id": patient_id, "slide_path": str(path),
                             "params": asdict(params), "store": "tiles"}
    coords = np.zeros((0, 2), np.int64)
    tissue_frac = artifact_frac = np.zeros(0, np.float32)
    mask = thumb = None
    status, reason = OK, ""
    try:
        slide = open_slide(path)
        try:
            attrs.update(_slide_attrs(slide, path))
            coords, tissue_frac, artifact_frac, mask, thumb, geometry = _tile(slide, slide_id, mpp_override,
                                                                              params, where)
            attrs.update(geometry)
        finally:
            slide.close()
        if len(coords) == 0:
            status, reason = NO_TISSUE, (f"{where}: no tile has >= {params.min_tissue_fraction:.0%} tissue "
                                         "(blank slide, or tissue too faint for the saturation threshold)")
    except SlideError as e:
        status, reason = e.status, str(e)
    except (openslide.OpenSlideError, OSError) as e:  # decoding failed somewhere in the file
        status, reason = "unreadable", (f"{where}: {type(e).__name__}: {e}. Fix: re-download or re-export "
                                        "the slide")
    except MemoryError:
        raise
    except Exception as e:  # anything else is likely our bug: record it loudly, keep the cohort going
        log.exception("unexpected failure while tiling %s", where)
        status, reason = "error", (f"{where}: unexpected {type(e).__name__}: {e} (please report this with "
                                   "the rule's log)")
    attrs.update({"status": status, "reason": reason, "n_tiles": int(len(coords)),
                  "seconds": round(time.perf_counter() - start, 3)})
    if status != OK and strict:
        raise TilingError(f"{reason} (strict mode: set strict: false to record the slide and carry on)")
    if status != OK:
        log.warning("%s: %s", status, reason)

    attrs = json_safe(attrs)
    with atomic_zarr(out, attrs) as root:
        write_array(root, "coords", coords, chunk_rows=65536)
        write_array(root, "tissue_fraction", tissue_frac.astype(np.float32), chunk_rows=65536)
        write_array(root, "artifact_fraction", artifact_frac.astype(np.float32), chunk_rows=65536)
        if mask is not None:
            write_array(root, "tissue_mask", mask.tissue.astype(np.uint8))
            write_array(root, "artifact_mask", mask.artifact.astype(np.uint8))
    _draw(qc_png, slide_id, status, reason, attrs, thumb, mask, coords)
    log.info("%s: %s, %d tiles in %.1f s", slide_id, status, len(coords), attrs["seconds"])
    return TilingResult(slide_id, status, reason, len(coords), attrs)


def _draw(qc_png, slide_id, status, reason, attrs, thumb, mask, coords) -> None:
    # Imported here: matplotlib costs ~0.2 s, and the workflow imports this package to parse every job.
    from wsiomics.tiling.qc import write_qc_png

    if thumb is None:
        write_qc_png(qc_png, f"{slide_id}: {status}", message=reason)
        return
    ds_x, ds_y = attrs["mask_downsample"]
    tiles_xy = coords / np.array([ds_x, ds_y]) if len(coords) else None
    caption = (f"{attrs['n_tiles']} tiles of {attrs['patch_size']} px at {attrs['target_mpp']} um/px; "
               f"source {attrs['mpp']:.3f} um/px ({attrs['mpp_source']})")
    write_qc_png(qc_png, f"{slide_id}: {status}", thumb, mask.tissue, mask.artifact, tiles_xy,
                 attrs["patch_size_level0"] / ds_x, message=caption if status == OK else reason)
