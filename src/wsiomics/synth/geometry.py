"""Known-truth slide layouts: tissue, tumour, pen ink and dust as shapely geometry.

Everything is laid out in micrometres first and only then scaled to level-0 pixels, so the same
seed gives the same physical slide at 40x and at 20x. The geometry is the ground truth that tests and
benchmarks score tissue detection and tiling against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from shapely import affinity
from shapely.geometry import LineString, MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

PEN_TRANSMITTANCE = {  # fraction of light each ink lets through, per RGB channel
    "blue": (0.22, 0.35, 0.85),
    "green": (0.25, 0.62, 0.40),
    "black": (0.16, 0.16, 0.19),
}


@dataclass(frozen=True)
class SlideLayout:
    """A slide's physical content; ``scale_to_pixels`` turns it into a :class:`SlideGeometry`."""

    width_um: float
    height_um: float
    tissue: BaseGeometry
    tumour: BaseGeometry
    pens: tuple[tuple[str, BaseGeometry], ...]
    dust: BaseGeometry


@dataclass(frozen=True)
class SlideGeometry:
    """Level-0 pixel geometry of a slide plus its resolution."""

    width: int
    height: int
    mpp: float
    tissue: BaseGeometry
    tumour: BaseGeometry
    pens: tuple[tuple[str, BaseGeometry], ...]
    dust: BaseGeometry
    tissue_type: int = 0
    stain: tuple[float, float] = field(default=(1.0, 1.0))

    @property
    def pen(self) -> BaseGeometry:
        return unary_union([g for _, g in self.pens]) if self.pens else Polygon()


def blob(rng: np.random.Generator, cx: float, cy: float, radius: float, roughness: float = 0.18,
         n_vertices: int = 160) -> Polygon:
    """A smooth random closed shape: a circle whose radius is perturbed by a few low harmonics."""
    theta = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 7):
        r += rng.normal(0, roughness / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.45, None)
    poly = Polygon(np.c_[cx + r * np.cos(theta), cy + r * np.sin(theta)])
    return poly if poly.is_valid else poly.buffer(0)


def random_layout(seed: int, width_um: float, height_um: float, *, blank: bool = False,
                  pen: bool = False, tumour: bool = True, n_fragments: int = 2) -> SlideLayout:
    """Draw a slide: one or two large tissue pieces with a lumen, small fragments, pen strokes, dust."""
    rng = np.random.default_rng(seed)
    frame = box(0, 0, width_um, height_um)
    inner = box(0.04 * width_um, 0.04 * height_um, 0.96 * width_um, 0.96 * height_um)
    short = min(width_um, height_um)
    pieces: list[Polygon] = []
    tumour_geom: BaseGeometry = Polygon()
    if not blank:
        n_main = int(rng.integers(1, 3))
        for i in range(n_main):
            cx = width_um * (0.3 + 0.4 * i if n_main == 2 else 0.5) + rng.normal(0, 0.03 * width_um)
            cy = height_um * 0.5 + rng.normal(0, 0.04 * height_um)
            radius = short * (0.30 if n_main == 1 else 0.24) * rng.uniform(0.9, 1.1)
            piece = blob(rng, cx, cy, radius)
            lumen = blob(rng, cx + rng.normal(0, 0.2 * radius), cy + rng.normal(0, 0.2 * radius),
                         rng.uniform(220, 300), roughness=0.1)
            pieces.append(piece.difference(lumen))
        # Small fragments, 80-150 um across: must never be dropped for being few pixels at low resolution.
        for _ in range(n_fragments):
            for _attempt in range(20):
                cx, cy = rng.uniform(0.08, 0.92) * width_um, rng.uniform(0.08, 0.92) * height_um
                frag = blob(rng, cx, cy, rng.uniform(110, 160), roughness=0.1)
                if not frag.buffer(150).intersects(unary_union(pieces)):
                    pieces.append(frag)
                    break
        if tumour:
            main = max(pieces, key=lambda p: p.area)
            c = main.representative_point()
            tumour_geom = blob(rng, c.x, c.y, 0.4 * np.sqrt(main.area / np.pi)).intersection(main)
    tissue = unary_union(pieces).intersection(inner) if pieces else Polygon()
    tumour_geom = tumour_geom.intersection(tissue) if not tumour_geom.is_empty else tumour_geom

    pens: list[tuple[str, BaseGeometry]] = []
    if pen:
        colours = list(PEN_TRANSMITTANCE)
        for colour in rng.choice(colours, size=2, replace=False):
            # A stroke that starts on glass and crosses into tissue, as when a pathologist marks a region.
            x0, y0 = rng.uniform(0.1, 0.9) * width_um, rng.uniform(0.05, 0.2) * height_um
            pts = [(x0, y0)]
            for _ in range(4):
                pts.append((pts[-1][0] + rng.normal(0, 0.12 * width_um), pts[-1][1] + 0.17 * height_um))
            stroke = LineString(pts).buffer(rng.uniform(35, 60), cap_style="round").intersection(inner)
            pens.append((str(colour), stroke))

    specks = [blob(rng, rng.uniform(0, width_um), rng.uniform(0, height_um), rng.uniform(8, 25), 0.1)
              for _ in range(int(rng.integers(3, 8)))]
    dust = unary_union(specks).intersection(frame).difference(tissue)
    return SlideLayout(width_um, height_um, tissue, tumour_geom, tuple(pens), dust)


def scale_to_pixels(layout: SlideLayout, mpp: float, tissue_type: int = 0,
                    stain: tuple[float, float] = (1.0, 1.0)) -> SlideGeometry:
    """Express a physical layout in level-0 pixels of a scan at ``mpp`` micrometres per pixel."""
    f = 1.0 / mpp

    def scale(g: BaseGeometry) -> BaseGeometry:
        return affinity.scale(g, xfact=f, yfact=f, origin=(0, 0)) if not g.is_empty else g

    return SlideGeometry(
        width=int(round(layout.width_um * f)),
        height=int(round(layout.height_um * f)),
        mpp=mpp,
        tissue=scale(layout.tissue),
        tumour=scale(layout.tumour),
        pens=tuple((c, scale(g)) for c, g in layout.pens),
        dust=scale(layout.dust),
        tissue_type=tissue_type,
        stain=stain,
    )


def polygons(geom: BaseGeometry) -> list[Polygon]:
    """Flatten any (multi)polygon geometry into a list of polygons."""
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return list(geom.geoms)
    return [g for part in getattr(geom, "geoms", []) for g in polygons(part)]
