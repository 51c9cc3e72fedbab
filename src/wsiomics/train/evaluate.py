"""The one evaluation: per-patient predictions, scikit-learn metrics, embeddings and per-tile attention.

Test patients are run one at a time with every token (no crop, no padding). Outputs follow the contract
of ``results/models/<method>/fold<k>/`` (README "Training and evaluation").
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from sklearn import metrics as skm

from wsiomics.datasets import DatasetParams, FoldData, PatientRecord
from wsiomics.io import atomic_path, atomic_zarr, json_safe, write_text
from wsiomics.train.loop import autocast
from wsiomics.train.methods import METHODS

log = logging.getLogger(__name__)

EMBEDDINGS = ("image", "gene", "fused")


@dataclass
class PatientResult:
    patient: PatientRecord
    probs: np.ndarray | None = None  # (C,) softmax of the head's outputs
    logits: np.ndarray | None = None  # (C,) the head's outputs (survival: hazard logits or log-risk)
    risk: float | None = None  # survival: higher = earlier event
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    attention: list[np.ndarray] = field(default_factory=list)  # per slide, raster order
    tile_scores: list[np.ndarray] = field(default_factory=list)  # per slide, raster order


@torch.no_grad()
def run_model(model: torch.nn.Module, data: FoldData, roles: tuple[str, ...], device: torch.device,
              params: DatasetParams) -> list[PatientResult]:
    """Every patient of ``roles`` through the model, alone and with all of its tokens."""
    dataset = data.dataset(roles, params, train=False)
    loader = data.loader(dataset, batch_size=1, shuffle=False)
    model.to(device).eval()
    results = []
    for batch, patient in zip(loader, dataset.patients, strict=True):
        with autocast(device):
            out = model(batch.to(device))
        res = PatientResult(patient)
        if out.logits is not None:
            res.logits = out.logits.float()[0].cpu().numpy()
            res.probs = torch.softmax(out.logits.float(), dim=-1)[0].cpu().numpy()
        for name in EMBEDDINGS:
            value = getattr(out, name)
            if value is not None:
                res.embeddings[name] = value.float()[0].cpu().numpy()
        sidx = batch.slide_index[0].numpy()
        for attr, dest in (("attention", res.attention), ("tile_logits", res.tile_scores)):
            value = getattr(out, attr)
            if value is not None and patient.slides:
                v = value.float()[0].cpu().numpy()
                dest.extend(v[sidx == k] for k in range(len(patient.slides)))
        results.append(res)
    return results


def classification_metrics(labels: list[str], probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """accuracy, balanced accuracy, macro one-vs-rest AUC and macro F1 (scikit-learn) over labelled patients."""
    keep = [i for i, y in enumerate(labels) if y in classes]
    out: dict[str, Any] = {"n_test": len(keep)}
    if not keep:
        return {**out, "accuracy": None, "balanced_accuracy": None, "auc_macro": None, "f1_macro": None}
    y = np.array([classes.index(labels[i]) for i in keep])
    p = probs[keep]
    pred = p.argmax(1)
    out["accuracy"] = float(skm.accuracy_score(y, pred))
    out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y, pred))
    out["f1_macro"] = float(skm.f1_score(y, pred, average="macro", labels=np.unique(y), zero_division=0))
    present = np.unique(y)
    if len(present) < 2:
        out["auc_macro"] = None  # undefined with one class among the test patients
    elif len(classes) == 2:
        out["auc_macro"] = float(skm.roc_auc_score(y, p[:, 1]))
    else:
        # One-vs-rest over the classes present among the test patients, renormalised over them.
        sub = p[:, present] / np.clip(p[:, present].sum(1, keepdims=True), 1e-12, None)
        yy = np.searchsorted(present, y)
        out["auc_macro"] = float(skm.roc_auc_score(yy, sub, multi_class="ovr", average="macro")) if len(
            present) > 2 else float(skm.roc_auc_score(yy, sub[:, 1]))
    return out


def _weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney, ties count half) of ``score`` (n,) for ``positive`` (n,) against the rest, with
    each sample counted ``weights`` (B, n) times: (B,), NaN without both kinds."""
    above = (score[:, None] > score[None, :]) + 0.5 * (score[:, None] == score[None, :])  # (n, n) pos i vs neg j
    pos, neg = weights * positive, weights * ~positive  # (B, n)
    denom = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.einsum("bi,ij,bj->b", pos, above, neg) / denom, np.nan)


def weighted_classification_metrics(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`classification_metrics` of B resamples at once: ``y`` (n,) class indices,
    ``probs`` (n, C), ``weights`` (B, n) the times each patient is drawn. The same definitions (argmax
    prediction; balanced accuracy and macro F1 over the classes present; one-vs-rest macro AUC over the
    present classes with probabilities renormalised over them, the binary AUC with two), in closed form."""
    n_classes = probs.shape[1]
    onehot = np.eye(n_classes, dtype=float)
    truth, pred = onehot[y], onehot[probs.argmax(1)]  # (n, C)
    total = weights.sum(1)  # (B,)
    count = weights @ truth  # (B, C) patients per class
    hits = weights @ (truth * pred)  # (B, C) true positives
    present = count > 0  # (B, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / count, np.nan)
        f1 = np.where(present, 2 * hits / (count + weights @ pred), np.nan)
        out = {"accuracy": hits.sum(1) / total, "balanced_accuracy": np.nanmean(recall, 1),
               "f1_macro": np.nanmean(f1, 1), "auc_macro": np.full(len(weights), np.nan)}
    for pattern in np.unique(present, axis=0):  # resamples with the same classes present share the AUC's form
        rows, cls = np.all(present == pattern, axis=1), np.flatnonzero(pattern)
        if len(cls) < 2:
            continue
        w = weights[rows]
        if n_classes == 2:
            out["auc_macro"][rows] = _weighted_auc(probs[:, 1], y == 1, w)
            continue
        sub = probs[:, cls] / np.clip(probs[:, cls].sum(1, keepdims=True), 1e-12, None)
        w = w * np.isin(y, cls)  # patients of the absent classes carry no weight already
        if len(cls) == 2:
            out["auc_macro"][rows] = _weighted_auc(sub[:, 1], y == cls[1], w)
        else:
            out["auc_macro"][rows] = np.mean([_weighted_auc(sub[:, j], y == c, w) for j, c in enumerate(cls)], 0)
    return out


def predictions_table(results: list[PatientResult], fold: int, classes: list[str]) -> pd.DataFrame:
    rows = []
    for r in results:
        if r.probs is None:
            continue
        row = {"patient_id": r.patient.patient_id, "fold": fold, "role": r.patient.role, "label": r.patient.label,
               "predicted": classes[int(np.argmax(r.probs))]}
        row.update({f"prob_{c}": float(p) for c, p in zip(classes, r.probs, strict=True)})
        rows.append(row)
    columns = ["patient_id", "fold", "role", "label", "predicted", *[f"prob_{c}" for c in classes]]
    return pd.DataFrame(rows, columns=columns)


def metrics_by_role(table: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Metrics of the fold's ``test`` patients at the top level, the fixed ``heldout`` set on its own."""
    def of(role: str) -> dict[str, Any]:
        part = table[table["role"] == role]
        probs = part[[f"prob_{c}" for c in classes]].to_numpy() if len(part) else np.zeros((0, len(classes)))
        return classification_metrics(part["label"].tolist(), probs, classes)

    out = of("test")
    if (table["role"] == "heldout").any():
        out["heldout"] = of("heldout")
    return out


def write_predictions(path: str | Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def write_history(path: Path, history: list[dict[str, float]], title: str) -> None:
    """history.tsv and a loss-curve PNG beside it."""
    table = pd.DataFrame(history)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    x = table["epoch"] if "epoch" in table else np.arange(len(table))
    for col in table.columns:
        if col.endswith("loss") and (col.startswith("train_") or col.startswith("val_")):
            ax.plot(x, table[col], label=col, linestyle="-" if col.startswith("train_") else "--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path.with_name(path.stem.replace("history", "loss_curve") + ".png")) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_json(path: str | Path, value: dict[str, Any]) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    write_text(path, json.dumps(clean(json_safe(value)), indent=1) + "\n")


def write_embeddings(path: str | Path, results: list[PatientResult], attrs: dict[str, Any]) -> None:
    """``patient_id`` plus each embedding every patient has, one row per patient."""
    with atomic_zarr(path, attrs=json_safe(attrs)) as root:
        for name, values in (("patient_id", [r.patient.patient_id for r in results]),
                             ("role", [r.patient.role for r in results])):
            arr = root.create_array(name, shape=(len(values),), dtype=str)  # variable-length UTF-8
            if values:
                arr[:] = np.array(values, dtype=object)
        for name in EMBEDDINGS:
            if results and all(name in r.embeddings for r in results):
                root.create_array(name, data=np.stack([r.embeddings[name] for r in results]).astype(np.float32))


def _stored_order(slide, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile values from raster order back to the store's row order, with the store's coords."""
    coords = zarr.open_array(f"{slide.store}/coords", mode="r")[:]
    out = np.empty(slide.n_tokens, dtype=np.float32)
    out[slide.order] = values
    return coords, out


def write_tile_maps(out_dir: str | Path, results: list[PatientResult], kind: str, array: str,
                    attrs: dict[str, Any]) -> list[str]:
    """One store per slide, ``coords`` exactly as in the tiles store plus ``array`` per tile."""
    written = []
    for r in results:
        values = r.attention if kind == "attention" else r.tile_scores
        for slide, v in zip(r.patient.slides, values, strict=False):
            coords, ordered = _stored_order(slide, v)
            with atomic_zarr(Path(out_dir) / f"{slide.slide_id}.zarr",
                             attrs=json_safe({**attrs, "slide_id": slide.slide_id,
                                              "patient_id": r.patient.patient_id})) as root:
                root.create_array("coords", data=coords.astype(np.int64))
                root.create_array(array, data=ordered)
            written.append(slide.slide_id)
    return written


TIE_TOLERANCE = 1e-6  # cosine similarities this close count as tied (float32 embeddings resolve ~1e-7)


def retrieval_hits(image: np.ndarray, gene: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, np.ndarray]:
    """Per query, image->gene and gene->image, the expected hit of recall@k (``i2g@k``, ``g2i@k``: (N,) each,
    in [0, 1]) of paired rows (row i of each is one patient), cosine similarity; recall@k is their mean.

    Ties are broken uniformly at random, in expectation: a query whose partner has ``b`` candidates scoring
    strictly higher and ``t`` others tied with it (within ``TIE_TOLERANCE``) is equally likely at any of
    the ranks b+1 .. b+t+1, so it adds ``clip(k - b, 0, t + 1) / (t + 1)`` to recall@k.
    """
    image, gene = np.asarray(image, np.float64), np.asarray(gene, np.float64)
    if len(image) == 0:
        return {f"{d}@{k}": np.zeros(0) for d in ("i2g", "g2i") for k in ks}
    i = image / np.clip(np.linalg.norm(image, axis=1, keepdims=True), 1e-12, None)
    g = gene / np.clip(np.linalg.norm(gene, axis=1, keepdims=True), 1e-12, None)
    sim = i @ g.T  # (N, N): image queries x gene candidates
    out = {}
    for name, s in (("i2g", sim), ("g2i", sim.T)):
        true = np.diag(s)[:, None]
        better = (s > true + TIE_TOLERANCE).sum(axis=1)  # (N,) candidates strictly above the partner
        tied = (np.abs(s - true) <= TIE_TOLERANCE).sum(axis=1) - 1  # (N,) others level with it
        for k in ks:
            out[f"{name}@{k}"] = np.clip(k - better, 0, tied + 1) / (tied + 1)
    return out


def retrieval_metrics(image: np.ndarray, gene: np.ndarray, ks: tuple[int, ...] = (1, 5),
                      patient_ids: list[str] | None = None) -> dict[str, Any]:
    """Image->gene and gene->image recall@k of paired rows (row i of each is one patient), cosine similarity:
    the mean over queries of :func:`retrieval_hits`.

    A collapsed model (one embedding for everyone) scores chance, ``min(k, n) / n``, which is reported beside
    as ``recall_chance@k`` with ``n_retrieval``, the candidates per query (recall@k is 1 whenever n <= k).
    With ``patient_ids`` (one per row), each query's hits are kept too (``retrieval_per_patient``: columns
    ``patient_id`` and ``recall_i2g@k`` ...), for the cohort summary's pooled recall and its bootstrap.
    """
    n = len(image)
    out: dict[str, Any] = {"n_retrieval": n}
    if n == 0:
        return {**out, **{f"recall_{d}@{k}": None for d in ("i2g", "g2i", "chance") for k in ks}}
    hits = retrieval_hits(image, gene, ks)
    for name, values in hits.items():
        out[f"recall_{name}"] = float(values.mean())
    for k in ks:
        out[f"recall_chance@{k}"] = min(k, n) / n
    if patient_ids is not None:
        out["retrieval_per_patient"] = {"patient_id": list(patient_ids),
                                        **{f"recall_{name}": values.tolist() for name, values in hits.items()}}
    return out


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks, 2|P & T| / (|P| + |T|); 1.0 when both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, truth).sum() / denom)


def segmentation_metrics(slides: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float = 0.5) -> dict[str, Any]:
    """Per-slide Dice (probabilities >= threshold vs tile labels) averaged over slides, and pooled over all tiles."""
    per_slide = {sid: dice_score(p >= threshold, t >= 0.5) for sid, (p, t) in slides.items()}
    if not slides:
        return {"dice_mean": None, "dice_pooled": None, "dice_per_slide": {}, "tiles_per_slide": {}, "n_slides": 0}
    pred = np.concatenate([p >= threshold for p, _ in slides.values()])
    truth = np.concatenate([t >= 0.5 for _, t in slides.values()])
    # per slide |P & T|, |P|, |T|: the pooled Dice of any set of slides (the summary's bootstrap) from these
    counts = {sid: [int(np.logical_and(p >= threshold, t >= 0.5).sum()), int((p >= threshold).sum()),
                    int((t >= 0.5).sum())] for sid, (p, t) in slides.items()}
    return {"dice_mean": float(np.mean(list(per_slide.values()))), "dice_pooled": dice_score(pred, truth),
            "dice_per_slide": per_slide, "tiles_per_slide": counts, "n_slides": len(slides)}


def write_tumour_heatmap(path: str | Path, coords: np.ndarray, probs: np.ndarray, tile_size: float,
                         outline: list[np.ndarray], title: str) -> None:
    """Tumour probability per tile on the slide grid (level-0 px axes), the annotation outline drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    step = float(tile_size)
    grid = np.rint(coords / step).astype(np.int64)
    lo = grid.min(0) if len(grid) else np.zeros(2, np.int64)
    shape = (grid.max(0) - lo + 1) if len(grid) else np.ones(2, np.int64)
    image = np.full((int(shape[1]), int(shape[0])), np.nan)
    if len(grid):
        image[grid[:, 1] - lo[1], grid[:, 0] - lo[0]] = probs
    x0, y0 = lo * step
    extent = (x0, x0 + shape[0] * step, y0 + shape[1] * step, y0)
    aspect = shape[1] / max(1, shape[0])
    fig, ax = plt.subplots(figsize=(5.5, max(2.5, 5.5 * aspect)), dpi=100)
    ax.set_facecolor("#d9d9d9")  # grey where the slide has no tile
    im = ax.imshow(np.ma.masked_invalid(image), cmap="magma", vmin=0.0, vmax=1.0, extent=extent,
                   interpolation="nearest")
    for ring in outline:
        ax.plot(ring[:, 0], ring[:, 1], color="cyan", linewidth=1.0)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=ax, fraction=0.04, label="tumour probability")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


BASELINE = "linear"  # the deep methods' bar (METHODS.md: a deep method that does not beat it says so)
VS_BASELINE = {"balanced_accuracy_vs_linear_mean": "float64", "folds_won_vs_linear": "Int64",
               "n_folds_vs_linear": "Int64", "beats_linear": "boolean"}  # summary columns and their dtypes


def summarize(paths: list[str]) -> pd.DataFrame:
    """One row per method: mean and std over folds of each metric the method reports, then each deep
    method's balanced accuracy paired with ``linear``'s over the folds both have (:func:`versus_baseline`).
    The metrics are those the tasks name (:func:`wsiomics.train.tasks.summary_metrics`)."""
    from wsiomics.train.tasks import get_task, summary_metrics

    names = summary_metrics()
    records = []
    for path in paths:
        with open(path) as f:
            m = json.load(f)
        records.append({"method": m["method"], "fold": m["fold"], "path": str(path),
                        **{k: m.get(k) for k in names if m.get(k) is not None}})
    frame = pd.DataFrame(records)
    rows = []
    for method, part in frame.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method, "n_folds": len(part)}
        if method in METHODS:  # metrics over every fold's test patients together, as the task defines them
            row.update(get_task(METHODS[method].task).pooled_metrics([Path(p) for p in part["path"]]))
        for k in names:
            if k in part and part[k].notna().any():
                values = part[k].dropna().astype(float)
                row[f"{k}_mean"] = values.mean()
                row[f"{k}_std"] = values.std(ddof=0)
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.join(versus_baseline(frame), on="method")


def versus_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Each deep method's balanced accuracy against ``linear``'s, fold by fold (``frame``: one row per
    method and fold): the mean difference, the folds won (strictly higher) and the folds both report. A
    method beats ``linear`` when the mean difference is positive and it wins more folds than it loses;
    every deep method that does not is named in a warning. Empty cells for ``linear``, the other
    scikit-learn methods and methods without a balanced accuracy."""
    methods = pd.Index(frame["method"].unique(), name="method")
    out = pd.DataFrame({c: pd.Series(index=methods, dtype=t) for c, t in VS_BASELINE.items()})
    metric = "balanced_accuracy"
    if metric not in frame:
        return out
    scores = frame.dropna(subset=[metric]).pivot_table(index="fold", columns="method", values=metric, aggfunc="first")
    if BASELINE not in scores:
        log.info("no %s baseline among the metrics: the deep methods are not compared with it", BASELINE)
        return out
    for method in methods:
        spec = METHODS.get(method)
        if method == BASELINE or method not in scores or (spec is not None and spec.is_sklearn):
            continue
        paired = scores[[method, BASELINE]].dropna()
        if paired.empty:
            continue
        diff = paired[method] - paired[BASELINE]  # (folds,)
        won, lost = int((diff > 0).sum()), int((diff < 0).sum())
        beats = bool(diff.mean() > 0 and won > lost)
        out.loc[method] = [float(diff.mean()), won, len(diff), beats]
        if not beats:
            log.warning("%s does not beat %s: %s %+.4f on average over %d paired folds, won %d of %d (lost %d)",
                        method, BASELINE, metric, diff.mean(), len(diff), won, len(diff), lost)
    return out


def write_summary(path: str | Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
