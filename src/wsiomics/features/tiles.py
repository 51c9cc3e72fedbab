"""Reading a slide's tiles for an encoder, in DataLoader worker processes.

Each item is a whole batch (uint8, ``(n, 3, S, S)``): batching in the worker keeps inter-process traffic
to one tensor per batch, and uint8 is a quarter of the bytes of float32 on the way to the GPU, where
normalisation happens. Every worker opens its own OpenSlide handle (handles must not cross a fork).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from wsiomics.slide import open_slide, read_rgb

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class TileGeometry:
    """How to cut tiles from a slide: level-0 corners, the pyramid level read, sizes in pixels."""

    level: int  # pyramid level read
    read_size: int  # tile side at that level
    out_size: int  # tile side fed to the encoder
    interpolation: str = "bilinear"


def read_tile(slide, xy: tuple[int, int], geometry: TileGeometry, out: np.ndarray | None = None) -> np.ndarray:
    """One tile as RGB uint8 ``(S, S, 3)``, resized (antialiased) to the encoder's input size, into ``out``."""
    location, size = (int(xy[0]), int(xy[1])), (geometry.read_size, geometry.read_size)
    if geometry.read_size == geometry.out_size:
        return read_rgb(slide, location, geometry.level, size, out=out)
    image = Image.fromarray(read_rgb(slide, location, geometry.level, size))
    rgb = np.asarray(image.resize((geometry.out_size, geometry.out_size), RESAMPLE[geometry.interpolation]))
    if out is None:
        return rgb
    out[...] = rgb
    return out


class TileBatches(torch.utils.data.Dataset):
    """Batch ``i`` = tiles ``[i * batch_size, (i + 1) * batch_size)`` of ``coords``, in order."""

    def __init__(self, slide_path: str, coords: np.ndarray, geometry: TileGeometry, batch_size: int):
        self.slide_path = str(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64)
        self.geometry = geometry
        self.batch_size = int(batch_size)
        self._slide = None
        self._pid = None

    def __len__(self) -> int:
        return -(-len(self.coords) // self.batch_size)

    def _handle(self):
        if self._pid != os.getpid():  # a forked worker must not reuse its parent's handle
            self._slide = open_slide(self.slide_path)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, index: int) -> torch.Tensor:
        # -> (n, 3, S, S) uint8
        slide = self._handle()
        rows = self.coords[index * self.batch_size:(index + 1) * self.batch_size]
        size = self.geometry.out_size
        out = np.empty((len(rows), size, size, 3), dtype=np.uint8)
        for i, xy in enumerate(rows):
            read_tile(slide, xy, self.geometry, out=out[i])
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def __getstate__(self):
        return {**self.__dict__, "_slide": None, "_pid": None}
