"""Tissue detection and tiling of whole-slide images into per-slide zarr stores."""

from wsiomics.tiling.core import STATUSES, TilingError, TilingParams, TilingResult, tile_slide
from wsiomics.tiling.mask import MaskParams, detect_tissue

__all__ = ["STATUSES", "MaskParams", "TilingError", "TilingParams", "TilingResult", "detect_tissue", "tile_slide"]
