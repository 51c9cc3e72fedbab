"""Options of the figures stage (config ``figures:``; defaults mirror the schema)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FigureParams:
    slides_per_class: int = 1  # attention maps: test slides per true class and method (the most confident first)
    top_tiles: int = 4  # attention maps: the slide's most and least attended tiles shown beside it
    tumour_slides: int = 4  # tumour maps per segmentation method (best, worst and between by Dice)
    gallery_per_page: int = 48  # QC gallery: slides per page
    thumbnail_px: int = 640  # longest side of the slide thumbnails drawn under the maps
    seed: int = 0  # UMAP's seed
