"""Patch features: every tile of a slide through an encoder, into ``results/features/<encoder>/<slide>.zarr``.

Store layout: ``features`` (N, D; float16 by default, chunked by rows), ``coords`` (N, 2; level-0 x, y of
each tile, in the tiles store's order), attrs naming the encoder, its weights (source + sha256), the
transforms, precision, tile geometry, source tiles store, timings and provenance.
"""

from wsiomics.features.extract import (
                                       ExtractParams,
                                       ExtractResult,
                                       FeatureError,
                                       TileReadError,
                                       extract_slide,
                                       resolve_device,
                                       resolve_precision,
)
from wsiomics.features.tiles import TileBatches, TileGeometry, read_tile

__all__ = [
    "ExtractParams",
    "ExtractResult",
    "FeatureError",
    "TileBatches",
    "TileGeometry",
    "TileReadError",
    "extract_slide",
    "read_tile",
    "resolve_device",
    "resolve_precision",
]
