"""Few-shot protocol (rule ``fewshot``): what a pretrained embedding is worth when few patients are labelled.

Per pretrained method and fold, for k labelled training patients per class (``train.fewshot.k``) and
``train.fewshot.draws`` seeded draws, a logistic-regression probe (scikit-learn) is fitted on frozen embeddings
of the drawn patients and scored on the fold's ``test`` patients. Embeddings (the ``embedding`` column):

* ``fused``, ``image``, ``gene``: the method's pretrained network (its fold's ``pretrain/model.pt``). ``image``
  is the slide encoder alone: no model's image embedding reads the genes, so it is what a slide without RNA
  gets at deployment (tested).
* ``fused_no_pretrain``, ``image_no_pretrain``, ``gene_no_pretrain``: the same network as constructed with the
  method's seed, before any training: exactly the network its pretraining started from.
* ``pooled_features``: the mean patch feature of the patient's slides.

Draws (:func:`draw_patients`): per (k, draw) a generator seeded with ``(seed, k, draw)`` picks, for each class
in sorted order, k patients without replacement among the fold's labelled ``train`` patients (never ``val``,
``test``, ``heldout`` or any other role, nor a patient without a label). The same patients serve every
embedding (a paired comparison), so only patients with every embedding take part (both a usable slide and
expression, when the probes include both kinds); the test patients are the labelled ``test`` patients with
every embedding. A k for which some class has fewer than k such training patients is skipped on that fold (no
rows; the log says so): a point of the curve is always k patients per class, never fewer.

Probe (:func:`probe_scores`): each embedding dimension is standardised with the mean and std of every training
patient of the fold (labels unused; never a test patient), then an L2 logistic regression with a fixed C
(``train.fewshot.c``: too few patients to tune it) is fitted on the drawn patients.

:func:`fewshot_table` is the pure part (embeddings and labels in, the rows of ``fewshot.tsv`` out), also called
by ``bench/pretraining.py`` on feature cohorts. :func:`summarize` pools every fold's table into
``results/fewshot/summary.tsv`` and :func:`plot_curves` draws the curves.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsiomics.train.roles import TRAIN_ROLES

log = logging.getLogger(__name__)

FEWSHOT_COLUMNS = ["k", "draw", "embedding", "balanced_accuracy", "auc_macro", "n_train", "n_test"]
METRICS = ("balanced_accuracy", "auc_macro")
SUMMARY_COLUMNS = ["method", "embedding", "k", "n", "n_folds", "n_train_mean", "n_test_mean",
                   *[f"{m}_{s}" for m in METRICS for s in ("mean", "std", "ci_low", "ci_high")]]
NETWORK_EMBEDDINGS = ("fused", "image", "gene")
NO_PRETRAIN = "_no_pretrain"  # suffix of the untrained network's embeddings
POOLED = "pooled_features"
EMBEDDING_ORDER = (*NETWORK_EMBEDDINGS, *(e + NO_PRETRAIN for e in NETWORK_EMBEDDINGS), POOLED)
TEST_ROLE = "test"


@dataclass
class FewshotParams:
    k: tuple[int, ...] = (1, 2, 4, 8, 16)  # labelled training patients per class
    draws: int = 10  # seeded draws per k
    c: float = 1.0  # inverse L2 penalty of the probe (scikit-learn's C), fixed: too few patients to tune it
    device: str = ""  # where the networks run: "" = the method's train.device; auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        self.k = tuple(int(v) for v in self.k)
        if any(v < 1 for v in self.k):
            raise ValueError(f"train.fewshot.k is {list(self.k)}; every k must be at least 1 patient per class")
        if int(self.draws) < 1:
            raise ValueError(f"train.fewshot.draws is {self.draws}; use at least 1 draw per k (e.g. 10)")
        if not float(self.c) > 0:
            raise ValueError(f"train.fewshot.c is {self.c}; the probe's C must be positive (e.g. 1.0)")
        self.draws, self.c = int(self.draws), float(self.c)


def draw_patients(labels: Sequence[str], pool: np.ndarray, classes: Sequence[str], k: int, draw: int,
                  seed: int) -> np.ndarray | None:
    """Indices (sorted) of ``k`` patients of each class among ``pool`` (bool per patient), drawn without
    replacement by a generator seeded with (seed, k, draw); None when some class has fewer than ``k``."""
    labels = np.asarray(labels, dtype=object)
    rng = np.random.default_rng([int(seed), int(k), int(draw)])
    chosen = []
    for c in sorted(classes):
        candidates = np.flatnonzero(pool & (labels == c))
        if len(candidates) < k:
            return None
        chosen.append(rng.choice(candidates, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def probe_scores(x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray, y_test: Sequence[str],
                 classes: Sequence[str], c: float = 1.0, x_scale: np.ndarray | None = None) -> dict[str, Any]:
    """L2 logistic regression (C = ``c``) fitted on the training rows, scored on the test rows: balanced accuracy
    and macro AUC with the definitions of every other classification metric (``evaluate.classification_metrics``).

    Features are standardised with the mean and std of ``x_scale`` (default ``x_train``): the stage passes every
    training patient's embedding, labels unused. Statistics of the 2 patients drawn at k = 1 would scale each
    noise dimension up to the size of the signal's."""
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from wsiomics.train.evaluate import weighted_classification_metrics

    classes = list(classes)
    y = np.array([classes.index(v) for v in y_train])
    # thousands of tiny fits per job: scikit-learn's per-call argument checks cost more than the fits (inputs
    # are checked finite by the caller)
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        scaler = StandardScaler().fit(x_train if x_scale is None else x_scale)
        model = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x_train), y)
        probs = np.zeros((len(x_test), len(classes)))
        probs[:, model.classes_] = model.predict_proba(scaler.transform(x_test))
    # the closed form of evaluate.classification_metrics (same definitions), without its per-call overhead
    found = weighted_classification_metrics(np.array([classes.index(v) for v in y_test]), probs,
                                            np.ones((1, len(y_test))))
    auc = float(found["auc_macro"][0])
    return {"balanced_accuracy": float(found["balanced_accuracy"][0]), "auc_macro": None if np.isnan(auc) else auc,
            "n_test": len(y_test)}


def _labelled(labels: Sequence[Any]) -> np.ndarray:
    return np.array([isinstance(v, str) and v != "" for v in labels], dtype=bool)


def fewshot_table(embeddings: Mapping[str, np.ndarray], labels: Sequence[Any], roles: Sequence[str],
                  params: FewshotParams, seed: int, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of ``fewshot.tsv`` for one fold: ``embeddings`` name -> (P, D) array (a NaN row: the patient
    lacks that embedding), ``labels`` (P,) (None or "" = unlabelled), ``roles`` (P,) the fold's roles.
    ``classes``: the fold's classes (default: the labels of its train and test patients)."""
    n = len(labels)
    if len(roles) != n:
        raise ValueError(f"{len(roles)} roles for {n} labels: give one role per patient")
    matrices = {}
    for name, x in embeddings.items():
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) != n:
            raise ValueError(f"embedding {name!r} has shape {x.shape}; expected ({n}, D), one row per patient")
        matrices[name] = x
    if not matrices:
        raise ValueError("no embedding to probe")
    labels_arr, roles_arr = np.array(labels, dtype=object), np.array(roles, dtype=object)
    complete = np.logical_and.reduce([np.isfinite(x).all(1) for x in matrices.values()])
    usable = _labelled(labels) & complete
    scale = complete & np.isin(roles_arr, TRAIN_ROLES)  # every training patient, labelled or not: the scaler
    train_pool = usable & scale
    test = usable & (roles_arr == TEST_ROLE)
    if classes is None:
        classes = sorted({str(v) for v in labels_arr[train_pool | test]})
    classes = sorted(str(c) for c in classes)
    test &= np.isin(labels_arr, classes)
    rows: list[dict[str, Any]] = []
    if len(classes) < 2 or not test.any():
        log.warning("few-shot: nothing to probe (%d classes, %d test patients with every embedding)", len(classes),
                    int(test.sum()))
        return pd.DataFrame(rows, columns=FEWSHOT_COLUMNS)
    y_test = labels_arr[test].tolist()
    for k in params.k:
        for draw in range(params.draws):
            idx = draw_patients(labels_arr, train_pool, classes, k, draw, seed)
            if idx is None:
                counts = {c: int((train_pool & (labels_arr == c)).sum()) for c in classes}
                log.warning("few-shot: k=%d skipped, a class has fewer than %d training patients with every "
                            "embedding (%s)", k, k, counts)
                break
            for name, x in matrices.items():
                found = probe_scores(x[idx], labels_arr[idx].tolist(), x[test], y_test, classes, params.c,
                                     x_scale=x[scale])
                rows.append({"k": k, "draw": draw, "embedding": name, "balanced_accuracy": found["balanced_accuracy"],
                             "auc_macro": found["auc_macro"], "n_train": len(idx), "n_test": int(test.sum())})
    return pd.DataFrame(rows, columns=FEWSHOT_COLUMNS)


# ---------------------------------------------------------------- the stage: one method on one fold


def fold_embeddings(method_name: str, cfg: dict[str, Any], data, pretrained: str | Path,
                    out_dir: str | Path) -> tuple[list, dict[str, np.ndarray]]:
    """The fold's train and test patients and their embeddings (:data:`EMBEDDING_ORDER`, those the cohort has):
    the pretrained network's, the untrained network's and the pooled patch features. A patient without slides
    gets NaN image rows, one without expression NaN gene rows."""
    import torch

    from wsiomics.train import evaluate as ev
    from wsiomics.train.build import build_model
    from wsiomics.train.linear import pooled_features
    from wsiomics.train.methods import get_method
    from wsiomics.train.stages import fold_context, initial_model

    method = get_method(method_name)
    if not method.pretrain:
        raise ValueError(f"method {method.name} has no pretraining stage: the few-shot protocol compares a "
                         "pretrained network with its untrained self")
    # the pretraining stage's context: its configuration, seed, device and threads
    ctx = fold_context(method, cfg, data, out_dir, "pretrain", pretrained)
    trained, _, _ = initial_model(ctx)  # the fold's pretrained checkpoint, every tensor
    torch.manual_seed(ctx.seed)  # the network as pretrain() constructs it, before its first step
    initial = build_model(method, ctx.cfg, data)
    roles = (*TRAIN_ROLES, TEST_ROLE)
    out: dict[str, np.ndarray] = {}
    patients: list = []
    for suffix, model in (("", trained), (NO_PRETRAIN, initial)):
        results = ev.run_model(model, data, roles, ctx.device, ctx.dparams)
        patients = [r.patient for r in results]
        for name in NETWORK_EMBEDDINGS:
            if not all(name in r.embeddings for r in results):
                continue
            x = np.stack([r.embeddings[name] for r in results]).astype(np.float64)
            lacks = [(not r.patient.slides) if name == "image" else (r.patient.genes is None) if name == "gene"
                     else False for r in results]
            x[np.array(lacks, dtype=bool)] = np.nan  # a missing-modality token is not an embedding of data
            out[name + suffix] = x
    if data.feature_dim:
        out[POOLED] = pooled_features(data, patients, ctx.dparams)
    # a modality the cohort lacks altogether (no expression at all, say) leaves the probes, not the patients
    for name in [n for n, x in out.items() if not np.isfinite(x).all(1).any()]:
        log.warning("few-shot: no patient has a %s embedding; it is left out", name)
        del out[name]
    return patients, {name: out[name] for name in EMBEDDING_ORDER if name in out}


def run_fold(method_name: str, cfg: dict[str, Any], data, pretrained: str | Path, out_dir: str | Path,
             params: FewshotParams) -> pd.DataFrame:
    """``<out_dir>/fewshot.tsv`` for one method and fold."""
    from wsiomics.io import atomic_path

    if params.device:
        cfg = {**cfg, "device": params.device}
    patients, embeddings = fold_embeddings(method_name, cfg, data, pretrained, out_dir)
    seed = int(cfg["seed"]) + 1000 * data.fold
    table = fewshot_table(embeddings, [p.label for p in patients], [p.role for p in patients], params, seed,
                          data.classes)
    with atomic_path(Path(out_dir) / "fewshot.tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    return table


# ---------------------------------------------------------------- the cohort summary and the curves


def _t_interval(values: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, std, low, high): Student's t 95% interval of the mean, mean ± t(0.975, n-1) · sd / sqrt(n)."""
    from scipy import stats

    values = values[np.isfinite(values)]
    if not len(values):
        return (np.nan,) * 4
    mean = float(values.mean())
    if len(values) < 2:
        return mean, np.nan, np.nan, np.nan
    sd = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sd / np.sqrt(len(values))
    return mean, sd, mean - half, mean + half


def read_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Every fold's fewshot.tsv (``results/models/<method>/fold<k>/fewshot.tsv``) with ``method`` and ``fold``."""
    frames = []
    for path in paths:
        path = Path(path)
        fold_dir = path.parent.name
        if not fold_dir.startswith("fold") or not fold_dir[4:].isdigit():
            raise ValueError(f"{path}: expected results/models/<method>/fold<k>/fewshot.tsv")
        table = pd.read_csv(path, sep="\t")
        missing = [c for c in FEWSHOT_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: columns {missing} missing; rerun its fewshot job")
        frames.append(table.assign(method=path.parent.parent.name, fold=int(fold_dir[4:])))
    if not frames:
        return pd.DataFrame(columns=[*FEWSHOT_COLUMNS, "method", "fold"])
    return pd.concat(frames, ignore_index=True)


def summarize(tables: pd.DataFrame) -> pd.DataFrame:
    """Per method x embedding x k, over folds x draws: count, folds, mean n_train and n_test, and per metric the
    mean, std and a Student's t 95% CI of the mean (:func:`_t_interval`; NaN with a single value)."""
    rank = {e: i for i, e in enumerate(EMBEDDING_ORDER)}
    rows = []
    for (method, embedding, k), part in tables.groupby(["method", "embedding", "k"], sort=False):
        row = {"method": method, "embedding": embedding, "k": int(k), "n": len(part),
               "n_folds": int(part["fold"].nunique()), "n_train_mean": float(part["n_train"].mean()),
               "n_test_mean": float(part["n_test"].mean())}
        for metric in METRICS:
            stats = _t_interval(part[metric].to_numpy(dtype=float))
            row.update(dict(zip([f"{metric}_{s}" for s in ("mean", "std", "ci_low", "ci_high")], stats, strict=True)))
        rows.append(row)
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    if len(out):
        out = out.assign(_e=out["embedding"].map(lambda e: rank.get(e, len(rank))))
        out = out.sort_values(["method", "_e", "embedding", "k"]).drop(columns="_e").reset_index(drop=True)
    return out


def _style(embedding: str) -> dict[str, Any]:
    colours = {"fused": "tab:purple", "image": "tab:blue", "gene": "tab:green"}
    if embedding == POOLED:
        return {"color": "black", "linestyle": ":", "marker": "s"}
    base = embedding.removesuffix(NO_PRETRAIN)
    return {"color": colours.get(base, "tab:grey"), "linestyle": "--" if embedding.endswith(NO_PRETRAIN) else "-",
            "marker": "o"}


def plot_curves(summary: pd.DataFrame, png: str | Path, svg: str | Path) -> None:
    """Balanced accuracy against k (log2 axis), one panel per method, one line per embedding with its 95% CI band;
    pretrained solid, untrained dashed, pooled features dotted black, chance (1 / classes) in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsiomics.io import atomic_path

    methods = list(dict.fromkeys(summary["method"])) or ["no few-shot rows (every k skipped?)"]
    cols = min(3, len(methods))
    nrows = int(np.ceil(len(methods) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        part = summary[summary["method"] == method]
        for embedding, line in part.groupby("embedding", sort=False):
            line = line.sort_values("k")
            style = _style(embedding)
            ax.plot(line["k"], line["balanced_accuracy_mean"], label=embedding, markersize=3, linewidth=1.2, **style)
            ax.fill_between(line["k"], line["balanced_accuracy_ci_low"], line["balanced_accuracy_ci_high"],
                            color=style["color"], alpha=0.12, linewidth=0)
        if len(part):
            classes = float((part["n_train_mean"] / part["k"]).median())
            ax.axhline(1.0 / classes, color="grey", linewidth=0.8, linestyle="-.", label="chance")
            ax.set_xscale("log", base=2)
            ticks = sorted(part["k"].unique())
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("labelled training patients per class (k)")
        ax.set_ylim(0, 1.02)
    for ax in axes[:, 0]:
        ax.set_ylabel("balanced accuracy (test)")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    for path, fmt in ((png, "png"), (svg, "svg")):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)


def write_summary(paths: Sequence[str | Path], out_dir: str | Path) -> pd.DataFrame:
    """``summary.tsv``, ``curves.png`` and ``curves.svg`` under ``out_dir`` from the folds' fewshot.tsv files."""
    from wsiomics.io import atomic_path

    out = Path(out_dir)
    summary = summarize(read_tables(paths))
    with atomic_path(out / "summary.tsv") as tmp:
        summary.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    plot_curves(summary, out / "curves.png", out / "curves.svg")
    return summary


# ---------------------------------------------------------------- command line


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def main(argv: Sequence[str] | None = None) -> int:
    from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args
    from wsiomics.train.__main__ import _common, fold_inputs, run_config

    parser = argparse.ArgumentParser(prog="python -m wsiomics.fewshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one pretrained method on one fold: <out-dir>/fewshot.tsv")
    _common(run)
    run.add_argument("--pretrained", required=True, help="the fold's pretrain/model.pt")
    run.add_argument("--k", type=_ints, default=FewshotParams.k, metavar="K1,K2,...",
                     help="labelled training patients per class, comma-separated; empty: none "
                          f"(default: {','.join(map(str, FewshotParams.k))})")
    add_dataclass_options(run, FewshotParams, section="train.fewshot", skip=("k",))
    sm = sub.add_parser("summarize", help="summary.tsv and the curves (PNG, SVG) from every fold's fewshot.tsv")
    sm.add_argument("tables", nargs="+", help="results/models/<method>/fold<k>/fewshot.tsv")
    sm.add_argument("--out-dir", required=True, help="results/fewshot")
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "summarize":
        summary = write_summary(args.tables, args.out_dir)
        log.info("wrote %s: %d rows", args.out_dir, len(summary))
        return 0
    params = dataclass_from_args(FewshotParams, args, k=args.k)
    cfg = run_config(args)
    data = fold_inputs(args)
    table = run_fold(args.method, cfg, data, args.pretrained, args.out_dir, params)
    log.info("done: %d rows (k = %s)", len(table), sorted(table["k"].unique().tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
