"""Pictures over the slides: tumour maps and attention maps drawn over each slide's H&E thumbnail, the
slide's most and least attended tiles, and the gallery of the tiling QC pictures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsiomics.figures import register
from wsiomics.figures.params import FigureParams
from wsiomics.figures.sources import Results, SlideMap

log = logging.getLogger("wsiomics.figures")


def spread(n_items: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_items)``, both ends included (all when there are fewer)."""
    if n_items <= n:
        return list(range(n_items))
    return sorted({int(round(i)) for i in np.linspace(0, n_items - 1, n)})


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank within the slide as a share in [0, 1] (ties share their mean rank): attention is
    compared within a slide, where its raw scale (softmax over all of a patient's tiles) says little."""
    from scipy.stats import rankdata

    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return np.ones_like(values)
    return (rankdata(values) - 1) / (len(values) - 1)


def draw_over_slide(ax, results: Results, smap: SlideMap, values: np.ndarray, params: FigureParams, cmap: str,
                    vmin: float, vmax: float, alpha: float = 0.55, outline: list[np.ndarray] | None = None):
    """The slide's thumbnail (level-0 px axes), the per-tile ``values`` over it and ``outline`` rings on top.
    Without the slide file the values are drawn on grey. Returns the colour-mapped image for a colour bar."""
    from wsiomics.figures import style

    attrs = results.tile_attrs(smap.slide_id) or {}
    tile = float(attrs.get("patch_size_level0") or _infer_step(smap.coords))
    thumb = results.thumbnail(smap.slide_id, params.thumbnail_px)
    image, extent = style.tile_grid(ax, smap.coords, values, tile)
    if thumb is not None:
        rgb, ds_x, ds_y = thumb
        ax.imshow(rgb, extent=(0, rgb.shape[1] * ds_x, rgb.shape[0] * ds_y, 0), interpolation="nearest")
        xlim, ylim = (0, rgb.shape[1] * ds_x), (rgb.shape[0] * ds_y, 0)
    else:
        ax.set_facecolor(style.MISSING)
        xlim, ylim = (extent[0], extent[1]), (extent[2], extent[3])
        alpha = 1.0
    im = ax.imshow(np.ma.masked_invalid(image), cmap=cmap, vmin=vmin, vmax=vmax, extent=extent,
                   interpolation="nearest", alpha=alpha)
    for i, ring in enumerate(outline or []):
        ax.plot(ring[:, 0], ring[:, 1], color=style.OUTLINE, linewidth=1.0, label="annotation" if i == 0 else None)
    ax.set(xlim=xlim, ylim=ylim, xticks=[], yticks=[])
    return im


def _infer_step(coords: np.ndarray) -> float:
    """Tile side from the coordinates' smallest non-zero spacing (a store without the tiles' attrs)."""
    diffs = np.diff(np.unique(np.asarray(coords).reshape(-1, 2)[:, 0]))
    return float(diffs[diffs > 0].min()) if (diffs > 0).any() else 1.0


# ----- tumour maps -----


def annotation_rings(samples: str | None, options: dict[str, Any] | None) -> dict[str, list[np.ndarray]]:
    """slide_id -> the tumour outline rings of its GeoJSON annotation (the sheet's annotation_path, read with
    the segmentation config), for the slides that have one."""
    if not samples:
        return {}
    from wsiomics.annotations import AnnotationError, params_from_config, polygon_rings, read_annotation
    from wsiomics.train.tasks.segment import annotation_paths

    params = params_from_config(options)
    out = {}
    for slide_id, path in annotation_paths(samples).items():
        try:
            out[slide_id] = polygon_rings(read_annotation(path, params).tumour)
        except AnnotationError as e:
            log.info("tumour_map: %s", e)
    return out


@register("tumour_map", category="Segmentation", subcategory="Tumour maps", pattern="{method}/{slide_id}.png")
def draw_tumour_maps(results: Results, out: Path, params: FigureParams) -> list[Path]:
    """Per segmentation method, ``tumour_slides`` test slides spread from the best to the worst Dice."""
    from wsiomics.figures import style

    written = []
    rings = None
    for method in results.methods:
        maps = results.slide_maps(method, "tumour")
        if not maps:
            continue
        if rings is None:
            rings = annotation_rings(results.samples, results.annotation_options)
        dice = {sid: d for fold in results.fold_dirs(method)
                for sid, d in (results.metrics(method, fold).get("dice_per_slide") or {}).items()}
        maps.sort(key=lambda m: (-dice.get(m.slide_id, -1.0), m.slide_id))
        for i in spread(len(maps), params.tumour_slides):
            smap = maps[i]
            with style.figure(size=(4.6, 3.8)) as (fig, axes):
                ax = axes[0, 0]
                im = draw_over_slide(ax, results, smap, smap.values, params, style.HEAT, 0.0, 1.0,
                                     outline=rings.get(smap.slide_id))
                score = f", Dice {dice[smap.slide_id]:.3f}" if smap.slide_id in dice else ", no annotation"
                ax.set_title(f"{method} fold {smap.fold}: {smap.slide_id}{score}")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(loc="lower right", frameon=True, framealpha=0.8)
                fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="tumour probability")
                written += style.save(fig, out / method / f"{smap.slide_id}.png")
    return written


# ----- attention maps -----


def pick_slides(maps: list[SlideMap], labels: dict[str, str], confidence: dict[str, float], per_class: int
                ) -> list[tuple[str, SlideMap]]:
    """``per_class`` slides of each true class, the patients the model was most confident about (the
    probability of their true class) first; slides of unlabelled patients are left out."""
    by_class: dict[str, list[SlideMap]] = {}
    for m in maps:
        if m.patient_id in labels:
            by_class.setdefault(labels[m.patient_id], []).append(m)
    chosen = []
    for label in sorted(by_class):
        ranked = sorted(by_class[label], key=lambda m: (-confidence.get(m.patient_id, -1.0), m.slide_id))
        chosen += [(label, m) for m in ranked[:per_class]]
    return chosen


@register("attention", category="Models", subcategory="Attention maps", pattern="{method}/{slide_id}.png")
def draw_attention(results: Results, out: Path, params: FigureParams) -> list[Path]:
    """Per method that wrote per-tile attention: test slides per true class, the attention (as its
    percentile within the slide) over the thumbnail, and the ``top_tiles`` most and least attended tiles."""
    from wsiomics.figures import style

    labels = dict(zip(results.patients["patient_id"], results.patients["label"], strict=True)) \
        if results.patients is not None else {}
    written = []
    for method in results.methods:
        maps = [m for m in results.slide_maps(method, "attention") if len(m.values)]
        if not maps:
            log.info("attention: %s wrote no per-tile attention; skipped", method)
            continue
        confidence: dict[str, float] = {}
        found = results.predictions(method)
        if found is not None:
            table, _ = found
            for _, row in table.iterrows():
                confidence[row["patient_id"]] = float(row[f"prob_{row['label']}"])
        k = params.top_tiles
        for label, smap in pick_slides(maps, labels, confidence, params.slides_per_class):
            order = np.argsort(-smap.values, kind="stable")
            top, bottom = order[:k], order[::-1][:k]
            tiles = results.tiles(smap.slide_id, smap.coords[np.r_[top, bottom]]) if k else None
            ranks = percentile_ranks(smap.values)
            with style.canvas(4.4 + (1.1 * k if tiles else 0), 3.6) as fig:
                grid = fig.add_gridspec(2, 1 + (k if tiles else 0), width_ratios=[4.0, *([1.0] * k if tiles else [])])
                ax = fig.add_subplot(grid[:, 0])
                im = draw_over_slide(ax, results, smap, ranks, params, style.HEAT, 0.0, 1.0)
                p = confidence.get(smap.patient_id)
                ax.set_title(f"{method} fold {smap.fold}: {smap.slide_id}\ntrue {style.title_case(label)}"
                             + (f", p(true) {p:.2f}" if p is not None else ""))
                fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.05, pad=0.03,
                             label="attention percentile within the slide")
                for row, (name, idx) in enumerate((("top", top), ("bottom", bottom))):
                    for j, i in enumerate(idx):
                        if not tiles:
                            break
                        tax = fig.add_subplot(grid[row, 1 + j])
                        tax.imshow(tiles[row * len(top) + j])
                        tax.axis("off")
                        tax.set_title(f"{name} {j + 1}: {smap.values[i]:.2g}", fontsize=6)
                written += style.save(fig, out / method / f"{smap.slide_id}.png")
    return written


# ----- QC gallery -----


@register("qc_gallery", category="QC", subcategory="Thumbnails gallery", pattern="{page}.png")
def draw_qc_gallery(results: Results, out: Path, params: FigureParams) -> list[Path]:
    """Every slide's tiling QC picture (results/qc/tiles/<slide_id>.png) on pages of ``gallery_per_page``,
    titled with the slide's status (red when it is not usable)."""
    import matplotlib.image as mpimg

    from wsiomics.figures import style

    pictures = sorted((results.root / "qc" / "tiles").glob("*.png"))
    if not pictures:
        log.info("qc_gallery: no tiling QC picture under %s; skipped", results.root / "qc" / "tiles")
        return []
    status = {}
    if results.slide_status is not None and {"slide_id", "status"} <= set(results.slide_status.columns):
        status = dict(zip(results.slide_status["slide_id"], results.slide_status["status"], strict=True))
    per_page = max(1, params.gallery_per_page)
    written = []
    for page, start in enumerate(range(0, len(pictures), per_page), 1):
        chunk = pictures[start:start + per_page]
        ncols = min(8, len(chunk))
        nrows = -(-len(chunk) // ncols)
        with style.figure(ncols=ncols, nrows=nrows, size=(2.0, 1.9)) as (fig, axes):
            for ax in axes.flat:
                ax.axis("off")
            for ax, path in zip(axes.flat, chunk, strict=False):
                ax.imshow(mpimg.imread(path))
                state = status.get(path.stem, "")
                ax.set_title(f"{path.stem}\n{state}", fontsize=6, color="black" if state in ("ok", "") else "red")
            fig.suptitle(f"tiling QC, slides {start + 1}-{start + len(chunk)} of {len(pictures)}", fontsize=9)
            written += style.save(fig, out / f"page{page}.png")
    return written
