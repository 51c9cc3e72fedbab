"""Curves and tables of the methods' evaluations: pooled ROC curves, confusion matrices, loss curves and
retrieval recall@k, each computed from the files the training stage wrote."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from wsiomics.figures import register
from wsiomics.figures.params import FigureParams
from wsiomics.figures.sources import Results

log = logging.getLogger("wsiomics.figures")


def roc_points(labels: list[str] | np.ndarray, probs: np.ndarray, classes: list[str]
               ) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """One-vs-rest ROC of each class present with at least one patient on each side: class -> (fpr, tpr, auc),
    plus ``"macro"``: the per-class TPRs interpolated on their union of FPRs and averaged (the curve whose
    area is the macro AUC). Two classes: the one curve of the second class's probability."""
    from sklearn import metrics as skm

    labels = np.asarray(labels)
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    shown = classes[1:] if len(classes) == 2 else classes
    for c in shown:
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        # every threshold kept (drop_intermediate=False): the plotted steps are exactly the data's
        fpr, tpr, _ = skm.roc_curve(positive, probs[:, classes.index(c)], drop_intermediate=False)
        curves[c] = (fpr, tpr, float(skm.auc(fpr, tpr)))
    if len(curves) > 1:
        grid = np.unique(np.concatenate([f for f, _, _ in curves.values()]))
        mean = np.mean([np.interp(grid, f, t) for f, t, _ in curves.values()], axis=0)
        curves["macro"] = (grid, mean, float(np.mean([a for _, _, a in curves.values()])))
    return curves


@register("roc", category="Models", subcategory="ROC curves", pattern="{method}.png")
def draw_roc(results: Results, out: Path, params: FigureParams) -> list[Path]:
    from wsiomics.figures import style

    written = []
    for method, table, classes in results.methods_with_predictions():
        probs = table[[f"prob_{c}" for c in classes]].to_numpy(float)
        curves = roc_points(table["label"].to_numpy(), probs, classes)
        if not curves:
            log.info("roc: %s's test patients are all of one class; no ROC curve", method)
            continue
        with style.figure(size=(3.4, 3.2)) as (fig, axes):
            ax = axes[0, 0]
            ax.plot([0, 1], [0, 1], color=style.CHANCE, linestyle=":", linewidth=1.0, label="chance")
            for (name, (fpr, tpr, auc)), colour in zip(((k, v) for k, v in curves.items() if k != "macro"),
                                                       style.colours(len(curves)), strict=False):
                ax.plot(fpr, tpr, color=colour, linewidth=1.0, drawstyle="steps-post",
                        label=f"{name} (AUC {auc:.3f})")
            if "macro" in curves:
                fpr, tpr, auc = curves["macro"]
                ax.plot(fpr, tpr, color="black", linewidth=2.0, label=f"macro mean (AUC {auc:.3f})")
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate",
                   title=f"{method}: {len(table)} test patients, {table['fold'].nunique()} folds pooled")
            ax.set_aspect("equal")
            style.legend_outside(ax)
            written += style.save(fig, out / f"{method}.png", svg=True)
    return written


@register("confusion", category="Models", subcategory="Confusion matrices", pattern="{method}.png")
def draw_confusion(results: Results, out: Path, params: FigureParams) -> list[Path]:
    from sklearn import metrics as skm

    from wsiomics.figures import style

    written = []
    for method, table, classes in results.methods_with_predictions():
        counts = skm.confusion_matrix(table["label"], table["predicted"], labels=classes)
        rows = counts.sum(1, keepdims=True)
        share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
        n = len(classes)
        with style.figure(size=(1.2 + 0.55 * n, 0.9 + 0.55 * n)) as (fig, axes):
            ax = axes[0, 0]
            im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.6 else "black")
            ax.set_xticks(range(n), [style.title_case(c) for c in classes], rotation=45, ha="right")
            ax.set_yticks(range(n), [style.title_case(c) for c in classes])
            ax.set(xlabel="predicted", ylabel="true", title=f"{method}: {int(counts.sum())} test patients")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
            written += style.save(fig, out / f"{method}.png")
    return written


def loss_columns(history: pd.DataFrame) -> list[str]:
    """The total losses of a history.tsv: train_loss and val_loss (components such as train_mpm are left out)."""
    return [c for c in ("train_loss", "val_loss") if c in history and history[c].notna().any()]


@register("loss", category="Models", subcategory="Loss curves", pattern="{method}/{stage}.png")
def draw_loss(results: Results, out: Path, params: FigureParams) -> list[Path]:
    from matplotlib.lines import Line2D

    from wsiomics.figures import style

    written = []
    for method in results.methods:
        for stage, folds in results.histories(method).items():
            colours = style.colours(max(folds) + 1)
            with style.figure(size=(4.2, 2.8)) as (fig, axes):
                ax = axes[0, 0]
                for fold, history in folds.items():
                    x = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
                    for col in loss_columns(history):
                        dash = "-" if col.startswith("train") else "--"
                        ax.plot(x, history[col], color=colours[fold], linestyle=dash, linewidth=1.1)
                    best = history["val_loss"].idxmin() if "val_loss" in history and history["val_loss"].notna().any() \
                        else None
                    if best is not None:
                        ax.plot(x[best], history["val_loss"][best], marker="o", markersize=3.5, color=colours[fold])
                handles = [Line2D([], [], color=colours[f], label=f"fold {f}") for f in folds]
                handles += [Line2D([], [], color="black", linestyle="-", label="train"),
                            Line2D([], [], color="black", linestyle="--", label="validation (dot: lowest)")]
                ax.set(xlabel="epoch", ylabel="loss", title=f"{method}: {stage}")
                style.legend_outside(ax, handles)
                written += style.save(fig, out / method / f"{stage}.png", svg=True)
    return written


def recall_curve(image: np.ndarray, gene: np.ndarray) -> dict[str, np.ndarray]:
    """recall@k for k = 1..n of paired rows (evaluate.retrieval_hits: cosine similarity, ties split evenly):
    ``i2g`` and ``g2i`` per query, (n, n) each, and ``chance`` (n,) = k / n."""
    from wsiomics.train.evaluate import retrieval_hits

    n = len(image)
    ks = tuple(range(1, n + 1))
    hits = retrieval_hits(image, gene, ks)
    return {d: np.stack([hits[f"{d}@{k}"] for k in ks], axis=1) for d in ("i2g", "g2i")} | {
        "chance": np.array(ks, float) / n}


def pooled_recall(embeddings: pd.DataFrame, paired: set[str] | None) -> dict[str, np.ndarray] | None:
    """recall@k over every fold's test patients with both modalities, each query ranked among its own fold's
    candidates (as metrics.json's recall@1/@5): the mean hit per k, k up to the largest fold (a fold with
    fewer candidates counts a hit for every larger k), and chance likewise."""
    if not {"image", "gene"} <= set(embeddings.columns):
        return None
    parts: dict[str, list[np.ndarray]] = {"i2g": [], "g2i": [], "chance": []}
    folds = []
    for _, part in embeddings.groupby("fold"):
        part = part[part["patient_id"].isin(paired)] if paired is not None else part
        finite = [np.isfinite(i).all() and np.isfinite(g).all()
                  for i, g in zip(part["image"], part["gene"], strict=True)]
        part = part[np.array(finite, bool)] if len(part) else part
        if len(part) >= 2:
            folds.append(part)
    if not folds:
        return None
    kmax = max(len(p) for p in folds)
    for part in folds:
        curve = recall_curve(np.stack(part["image"].to_list()), np.stack(part["gene"].to_list()))
        n = len(part)
        for d in ("i2g", "g2i"):
            parts[d].append(np.pad(curve[d], ((0, 0), (0, kmax - n)), constant_values=1.0))
        parts["chance"].append(np.tile(np.pad(curve["chance"], (0, kmax - n), constant_values=1.0), (n, 1)))
    return {d: np.concatenate(v).mean(0) for d, v in parts.items()} | {"n": sum(len(p) for p in folds)}


@register("retrieval", category="Models", subcategory="Retrieval", pattern="{direction}.png")
def draw_retrieval(results: Results, out: Path, params: FigureParams) -> list[Path]:
    """Image->gene and gene->image recall@k of every method with both embeddings (the pretrained model's when
    the method pretrains, as in metrics.json), one figure per direction."""
    from wsiomics.figures import style

    paired = None
    genes = results.expression_patients
    if genes is not None:
        paired = set(genes)
        if results.slide_status is not None and "status" in results.slide_status:
            paired &= set(results.slide_status.loc[results.slide_status["status"] == "ok", "patient_id"])
    curves = {}
    for method in results.methods:
        for stage in ("pretrain", "finetune"):
            emb = results.embeddings(method, stage)
            found = pooled_recall(emb, paired) if emb is not None else None
            if found is not None:
                curves[method] = found
                break
    if not curves:
        log.info("retrieval: no method wrote image and gene embeddings; no recall@k curve")
        return []
    written = []
    colours = style.colours(len(curves))
    for direction, title in (("i2g", "image → expression"), ("g2i", "expression → image")):
        with style.figure(size=(4.2, 3.0)) as (fig, axes):
            ax = axes[0, 0]
            longest = max(curves.values(), key=lambda c: len(c["chance"]))
            k = np.arange(1, len(longest["chance"]) + 1)
            ax.plot(k, longest["chance"], color=style.CHANCE, linestyle=":", label="chance")
            for (method, c), colour in zip(curves.items(), colours, strict=True):
                kk = np.arange(1, len(c[direction]) + 1)
                ax.plot(kk, c[direction], color=colour, marker="o", markersize=2.5,
                        label=f"{method} (R@1 {c[direction][0]:.2f})")
            ax.set(xlabel="k (candidates ranked)", ylabel="recall@k", ylim=(0, 1.02),
                   title=f"{title}: {next(iter(curves.values()))['n']} test patients pooled")
            style.legend_outside(ax)
            written += style.save(fig, out / f"{direction}.png", svg=True)
    return written
