"""Maps of the patients' embeddings: UMAP (scanpy) of each method's test-patient embeddings, every fold pooled."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from wsiomics.figures import register
from wsiomics.figures.params import FigureParams
from wsiomics.figures.sources import Results

log = logging.getLogger("wsiomics.figures")

MIN_PATIENTS = 5  # fewer points make no map


def embedding_matrix(table: pd.DataFrame) -> tuple[np.ndarray, str] | None:
    """The vector each patient is mapped by: ``fused`` when the method has one, else image and gene side by
    side, else the one it has."""
    for names in (("fused",), ("image", "gene"), ("image",), ("gene",)):
        if set(names) <= set(table.columns):
            return np.concatenate([np.stack(table[n].to_list()) for n in names], axis=1), " + ".join(names)
    return None


def umap_coordinates(x: np.ndarray, seed: int) -> np.ndarray:
    """(n, 2) UMAP of the rows of ``x``, seeded: scanpy's exact nearest neighbours on the raw vectors with
    Gaussian-kernel connectivities (``method="gauss"``: the default UMAP connectivities JIT-compile for ~20 s
    on a 2-core machine, longer than drawing every other figure; a map of a few hundred patients does not
    need them), then ``scanpy.tl.umap``'s layout."""
    import anndata as ad
    import scanpy as sc

    data = ad.AnnData(np.asarray(x, np.float32))
    sc.pp.neighbors(data, n_neighbors=max(2, min(15, len(x) - 1)), use_rep="X", random_state=seed,
                    transformer="sklearn", method="gauss")
    sc.tl.umap(data, random_state=seed)
    return np.asarray(data.obsm["X_umap"])


@register("embedding_map", category="Models", subcategory="Embedding maps", pattern="{method}.png")
def draw_embedding_maps(results: Results, out: Path, params: FigureParams) -> list[Path]:
    from wsiomics.figures import style

    labels = results.patients.set_index("patient_id")["label"] if results.patients is not None else None
    written = []
    for method in results.methods:
        table, stage = None, ""
        for stage in ("finetune", "pretrain"):
            table = results.embeddings(method, stage)
            if table is not None:
                break
        if table is None:
            log.info("embedding_map: %s wrote no embeddings; skipped", method)
            continue
        found = embedding_matrix(table)
        if found is None or len(table) < MIN_PATIENTS:
            log.info("embedding_map: %s has %d test patients with embeddings (< %d); skipped", method, len(table),
                     MIN_PATIENTS)
            continue
        x, which = found
        finite = np.isfinite(x).all(1)  # a patient without one modality can have NaN in its embedding
        if not finite.all():
            log.info("embedding_map: %s: %d patients without a finite %s embedding are left out", method,
                     int((~finite).sum()), which)
            table, x = table[finite].reset_index(drop=True), x[finite]
        if len(table) < MIN_PATIENTS:
            log.info("embedding_map: %s has %d patients with finite embeddings (< %d); skipped", method, len(table),
                     MIN_PATIENTS)
            continue
        xy = umap_coordinates(x, params.seed)
        colourings = {
            "label": [labels.get(p, "unlabelled") if labels is not None else "unknown" for p in table["patient_id"]],
            "fold": [f"fold {f}" for f in table["fold"]],
            "modalities": results.modalities(table["patient_id"].tolist()),
        }
        with style.figure(ncols=3, size=(3.4, 3.0)) as (fig, axes):
            for ax, (name, values) in zip(axes[0], colourings.items(), strict=True):
                groups = sorted(set(values))
                for group, colour in zip(groups, style.colours(len(groups)), strict=True):
                    mask = np.array([v == group for v in values])
                    ax.scatter(xy[mask, 0], xy[mask, 1], s=14, color=colour, label=style.title_case(group),
                               edgecolors="white", linewidths=0.3)
                ax.set(title=f"coloured by {name}", xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, markerscale=1.2)
            fig.suptitle(f"{method}: {which} embeddings ({'fine-tuned' if stage == 'finetune' else 'pretrained'}), "
                         f"{len(table)} test patients, {table['fold'].nunique()} folds", fontsize=9, y=1.02)
            written += style.save(fig, out / f"{method}.png")
    return written
