"""Pretraining as the number of paired patients grows: MGI's image->gene retrieval against CCA, and few-shot
probes of the pretrained image embedding against mean-pooled features (issue 19 item 4).

Protocol (the stage API directly, not the workflow; each training size is one "fold" of its own folds table):

1. a feature cohort (``python -m wsiomics.synth features``; made here when ``--cohort`` does not exist), its h5
   files imported as feature stores (``wsiomics.features.interop.import_h5``, as the workflow's
   ``import_features``) and its STAR files read into the expression cohort (``build_cohort``);
2. one seeded permutation of the patients gives a fixed **test pool** (``--test``, default 200), a fixed
   **val** set (``--val``, 50; MGI keeps its last epoch, so val only feeds the linear probe's fit) and a
   **training order**; training size n takes the first n of that order (nested: 50 is inside 100 ...);
3. per n: expression normalised on the n training patients (``normalize_fold``), then each method's own
   configuration (``config.yaml`` train section + the method's overrides + ``--overlay``): ``mgi*`` through
   ``stages.pretrain`` (embeddings of every patient), ``cca`` through its estimator (fitted on the n);
4. **retrieval over a fixed candidate count**: the test pool is cut, by one seeded permutation used for every
   n and method, into groups of ``--candidates`` (50) patients; image->gene recall@k ranks each query among its
   own group's genes (:func:`wsiomics.train.evaluate.retrieval_metrics`) and is averaged over groups (chance:
   5 / 50 = 0.10 at k = 5);
5. **few-shot** (pending the few-shot stage's function, issue 19 item 3): k labelled training patients per
   class, the pretrained ``image`` embedding against ``pooled_features``.

``--signal`` picks what the labels of a cohort made here follow (``shared``: the latent factors both modalities
see; the default ``both`` is tissue type x programme, which no image-gene alignment can help a slide probe with).

``python bench/pretraining.py --out /work/runs/k-align/bench`` (mgi + cca at the default sizes took 38 min on a
machine shared by seven; the gene-encoder ablations add about as much each). Writes ``retrieval.tsv``
(n, method, group, recall_i2g@1/@5, recall_g2i@1/@5, n_candidates),
``summary.tsv`` (mean and sd over groups) and ``retrieval.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from wsiomics.synth.cohort import SIGNALS

ROOT = Path(__file__).resolve().parents[1]
SIZES = (50, 100, 200, 500, 1000)
METHODS = ("mgi", "mgi_transformer_genes", "mgi_mlp_genes", "cca")
log = logging.getLogger("bench.pretraining")


def prepare(cohort: Path, work: Path, patients: int, seed: int, signal: str = "both"):
    """The cohort's sample sheet, slide table, imported feature stores and expression AnnData (cached in work)."""
    import anndata as ad

    from wsiomics.expression.cohort import CohortParams, build_cohort, write_anndata
    from wsiomics.features.interop import import_h5
    from wsiomics.samples import load_sample_sheet
    from wsiomics.synth.features import FeatureCohortConfig, write_feature_cohort

    if not (cohort / "samples.tsv").exists():
        write_feature_cohort(cohort, FeatureCohortConfig(patients=patients, seed=seed, signal=signal),
                             progress=False)
    sheet = load_sample_sheet(cohort / "samples.tsv")
    feature_dir = work / "features"
    feature_dir.mkdir(parents=True, exist_ok=True)
    for row in sheet.itertuples():
        out = feature_dir / f"{row.slide_id}.zarr"
        if not out.exists():
            import_h5(row.features_path, out, "synthetic", slide_id=row.slide_id, patient_id=row.patient_id)
    expr_path = work / "expression_cohort.zarr"
    if not expr_path.exists():
        with open(ROOT / "config.yaml") as f:
            write_anndata(build_cohort(sheet, section(CohortParams, yaml.safe_load(f)["expression"])), expr_path)
    slides = sheet[["patient_id", "slide_id"]].drop_duplicates()
    labels = sheet.drop_duplicates("patient_id").set_index("patient_id")["label"]
    return slides, labels, feature_dir, ad.read_zarr(expr_path)


def section(cls, values: dict[str, Any]):
    """``cls`` (a params dataclass whose fields are config keys) from a config section."""
    import dataclasses

    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def split(patients: list[str], n_test: int, n_val: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(test pool, val, training order), from one seeded permutation."""
    order = list(np.random.default_rng([seed, 19]).permutation(sorted(patients)))
    return order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]


def folds_table(train: list[str], val: list[str], test: list[str], labels: pd.Series) -> pd.DataFrame:
    rows = [(p, 0, role, labels[p]) for role, ids in (("train", train), ("val", val), ("test", test)) for p in ids]
    return pd.DataFrame(rows, columns=["patient_id", "fold", "role", "label"])


def candidate_groups(test: list[str], size: int, seed: int) -> list[list[str]]:
    """Disjoint groups of ``size`` test patients, the same for every n and method."""
    order = list(np.random.default_rng([seed, 29]).permutation(test))
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]


def group_retrieval(emb: dict[str, np.ndarray], ids: list[str], groups: list[list[str]]) -> list[dict[str, Any]]:
    from wsiomics.train.evaluate import retrieval_metrics

    index = {p: i for i, p in enumerate(ids)}
    rows = []
    for g, members in enumerate(groups):
        rows_of = [index[p] for p in members]
        found = retrieval_metrics(emb["image"][rows_of], emb["gene"][rows_of])
        rows.append({"group": g, "n_candidates": found["n_retrieval"],
                     **{k: found[k] for k in ("recall_i2g@1", "recall_i2g@5", "recall_g2i@1", "recall_g2i@5")}})
    return rows


def latent_r2(emb: dict[str, np.ndarray], ids: list[str], test: list[str], truth: pd.DataFrame, seed: int
               ) -> dict[str, float]:
    """Why retrieval is what it is: how much of the generator's two latent factors (the only signal both
    modalities carry) each side's embedding of the test pool holds, as the 5-fold cross-validated R^2 of a
    ridge regression from the embedding to the factors (mean over the two factors; 1 = all of it)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    index = {p: i for i, p in enumerate(ids)}
    rows = [index[p] for p in test]
    y = truth.loc[test, ["latent0", "latent1"]].to_numpy(float)
    out = {}
    for side in ("image", "gene"):
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        pred = cross_val_predict(model, emb[side][rows], y, cv=KFold(5, shuffle=True, random_state=seed))
        r2 = 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
        out[f"latent_r2_{side}"] = round(float(r2.mean()), 3)
    return out


def digest(cfg: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trained_with(checkpoint: Path) -> str:
    """The digest of the settings a pretraining checkpoint was trained with ("" when there is none)."""
    from wsiomics.train.loop import load_model_state

    return digest(load_model_state(checkpoint)["metadata"]["config"]) if checkpoint.exists() else ""


def method_embeddings(name: str, cfg: dict[str, Any], data, out: Path) -> tuple[dict[str, np.ndarray], list[str],
                                                                                 dict[str, Any]]:
    """(image / gene embeddings, patient ids, training info) of the fold's patients for one method."""
    import torch

    from wsiomics.io import open_store
    from wsiomics.train import stages
    from wsiomics.train.estimators import ESTIMATORS
    from wsiomics.train.methods import get_method

    method = get_method(name)
    if method.pretrain:
        if trained_with(out / "pretrain" / "model.pt") == digest(cfg):  # done before with these settings: reused
            info = json.loads((out / "pretrain" / "metrics.json").read_text())["training"]
        else:
            info = stages.pretrain(name, cfg, data, out)
        root = open_store(out / "pretrain" / "embeddings.zarr")
        ids = [str(v) for v in root["patient_id"][:]]
        return {k: np.asarray(root[k][:]) for k in ("image", "gene")}, ids, info
    ctx = stages.fold_context(method, cfg, data, out, "finetune")
    ctx.device = torch.device("cpu")
    results, info, _ = ESTIMATORS[method.model](ctx)
    ids = [r.patient.patient_id for r in results]
    return {k: np.stack([r.embeddings[k] for r in results]) for k in ("image", "gene")}, ids, info


def step_budget(cfg: dict[str, Any], n: int, max_steps: int) -> dict[str, Any]:
    """``cfg`` with pretraining epochs cut so that n pairs take at most ``max_steps`` optimiser steps (0: no cap):
    the bench's CPU budget; at the default 400, n <= 200 keep the configured 30 epochs, 1,000 pairs get 6."""
    section = cfg.get("pretrain") or {}
    if max_steps <= 0 or not section:
        return cfg
    per_epoch = -(-n // int(section.get("batch_size") or cfg["data"]["batch_size"]))
    epochs = max(1, min(int(section["epochs"]), max_steps // per_epoch))
    section.update(epochs=epochs, min_epochs=min(int(section.get("min_epochs", 1)), epochs))
    return cfg


def runs(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, overlay of the method's resolved configuration): the methods as configured, then each
    ``--variant LABEL=METHOD:OVERLAY.yaml`` (a candidate change measured beside the method it changes)."""
    out = [(name, name, {}) for name in args.methods]
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        name, _, path = rest.partition(":")
        with open(path) as f:
            out.append((label, name, yaml.safe_load(f) or {}))
    return out


def fewshot_inputs(out: Path, data, emb: dict[str, np.ndarray], ids: list[str], train: list[str],
                   test: list[str], labels: pd.Series) -> None:
    """What the few-shot column needs, kept beside each run: the pretrained ``image`` embedding, mean-pooled
    features (``pooled_features``, the baseline) and labels of the n training and the test-pool patients.

    The few-shot probe itself (k labelled training patients per class, seeded draws, balanced accuracy) is the
    few-shot stage's pure function (issue 19 item 3, branch k-fewshot), not re-implemented here: until it lands
    the column is reported as pending, and these files let it be filled in without retraining."""
    from wsiomics.datasets import DatasetParams
    from wsiomics.train.linear import pooled_features

    index = {p: i for i, p in enumerate(ids)}
    patients = {p.patient_id: p for p in data.patients}
    who = [p for p in (*train, *test) if p in index]
    pooled = pooled_features(data, [patients[p] for p in who], DatasetParams(cache_mb=256.0))  # every token
    np.savez_compressed(out / "fewshot_inputs.npz", patient_id=np.array(who), role=np.array(
        ["train" if i < len(train) else "test" for i in range(len(who))]), label=labels[who].to_numpy(str),
        image=emb["image"][[index[p] for p in who]], pooled_features=pooled.astype(np.float32))


def fewshot(work: Path, ks: tuple[int, ...], draws: int, seed: int) -> pd.DataFrame | None:
    """Few-shot balanced accuracy of MGI's pretrained ``image`` embedding and of ``pooled_features`` per n and k:
    the few-shot stage's ``fewshot_table`` on each n's kept inputs (k labelled training patients per class,
    ``draws`` seeded draws, scored on the test pool), one ``run`` per MGI run (``mgi`` and its variants). None
    when no n has its inputs."""
    import wsiomics.fewshot as module

    tables = []
    for path in sorted(work.glob("n*/*/fewshot_inputs.npz")):
        x = np.load(path)
        table = module.fewshot_table({"image": x["image"], "pooled_features": x["pooled_features"]},
                                     x["label"].tolist(), x["role"].tolist(),
                                     module.FewshotParams(k=ks, draws=draws), seed)
        tables.append(table.assign(n_pretrain=int(path.parent.parent.name[1:]), run=path.parent.name))
    if not tables:
        return None
    rows = pd.concat(tables)
    rows.to_csv(work / "fewshot.tsv", sep="\t", index=False)
    return rows


def run(args: argparse.Namespace) -> pd.DataFrame:
    from wsiomics.datasets import load_fold
    from wsiomics.expression.cohort import write_anndata
    from wsiomics.expression.normalize import NormalizeParams, normalize_fold
    from wsiomics.train.methods import deep_merge, method_config

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    slides, labels, feature_dir, cohort = prepare(Path(args.cohort), work, args.patients, args.seed, args.signal)
    test, val, order = split(list(labels.index), args.test, args.val, args.seed)
    sizes = [n for n in args.sizes if n <= len(order)]
    groups = candidate_groups(test, args.candidates, args.seed)
    truth = pd.read_csv(Path(args.cohort) / "patients_truth.tsv", sep="\t", index_col="patient_id")
    with open(ROOT / "config.yaml") as f:
        config = yaml.safe_load(f)
    train_cfg, expression_cfg = config["train"], config["expression"]  # as the workflow runs them
    train_cfg.update(device="cpu", threads=args.threads, seed=args.seed)
    for path in args.overlay:
        with open(path) as f:
            train_cfg = deep_merge(train_cfg, yaml.safe_load(f) or {})
    rows = []
    table = work / "retrieval.tsv"
    for n in sizes:
        folds = folds_table(order[:n], val, test, labels)
        expr = work / f"n{n}" / "expression.zarr"
        if not expr.exists():
            keep = cohort.obs_names.isin(folds["patient_id"])
            write_anndata(normalize_fold(cohort[keep].copy(), folds, 0, section(NormalizeParams, expression_cfg)), expr)
        data = load_fold(folds, 0, slides, feature_dir, expr)
        for label, name, overlay in runs(args):
            t0 = time.perf_counter()
            cfg = step_budget(deep_merge(method_config(train_cfg, name), overlay), n, args.max_steps)
            emb, ids, info = method_embeddings(name, cfg, data, work / f"n{n}" / label)
            found = group_retrieval(emb, ids, groups)
            r2 = latent_r2(emb, ids, test, truth, args.seed)
            if name == "mgi":  # MGI as configured and its --variant runs
                fewshot_inputs(work / f"n{n}" / label, data, emb, ids, order[:n], test, labels)
            seconds = time.perf_counter() - t0
            epochs = info.get("epochs", "")
            for r in found:
                rows.append({"n_train": n, "method": label, **r, **r2, "epochs": epochs, "seconds": round(seconds, 1)})
            frame = pd.DataFrame(found)
            log.info("n=%d %s: recall_i2g@5 %.3f (sd %.3f over %d groups of %d), %.0f s", n, label,
                     frame["recall_i2g@5"].mean(), frame["recall_i2g@5"].std(), len(frame), args.candidates, seconds)
            pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame, out: Path) -> pd.DataFrame:
    metrics = ["recall_i2g@1", "recall_i2g@5", "recall_g2i@5"]
    summary = rows.groupby(["n_train", "method"], sort=False)[metrics].agg(["mean", "std"]).round(3)
    summary.columns = [f"{m}_{s}" for m, s in summary.columns]
    extra = rows.groupby(["n_train", "method"], sort=False)[["latent_r2_image", "latent_r2_gene", "epochs",
                                                            "seconds"]].first()
    summary = summary.join(extra).reset_index()
    summary.to_csv(out / "summary.tsv", sep="\t", index=False)
    return summary


def plot(summary: pd.DataFrame, out: Path, candidates: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, part in summary.groupby("method", sort=False):
        ax.errorbar(part["n_train"], part["recall_i2g@5_mean"], yerr=part["recall_i2g@5_std"], marker="o",
                    capsize=3, label=name)
    ax.axhline(5 / candidates, color="grey", ls=":", label="chance")
    ax.set(xscale="log", xlabel="training pairs", ylabel=f"image->gene recall@5 ({candidates} candidates)",
           title="Retrieval vs training pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder (feature stores, per-n runs, tables, figure)")
    parser.add_argument("--cohort", default="", help="feature cohort folder (made when absent; default OUT/cohort)")
    parser.add_argument("--patients", type=int, default=1300, help="patients of a cohort made here")
    parser.add_argument("--seed", type=int, default=0, help="cohort, split and training seed")
    parser.add_argument("--signal", default="both", choices=SIGNALS,
                        help="what the labels of a cohort made here follow (wsiomics.synth.cohort.SIGNALS)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="training pairs")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--test", type=int, default=200, help="test pool (cut into candidate groups)")
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=50, help="candidates per retrieval query")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="few-shot: patients per class")
    parser.add_argument("--draws", type=int, default=10, help="few-shot: seeded draws per k")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=400, help="pretraining steps at most (CPU budget; 0: none)")
    parser.add_argument("--overlay", nargs="*", default=[], help="YAML overlays of the train section")
    parser.add_argument("--variant", nargs="*", default=[],
                        help="LABEL=METHOD:OVERLAY.yaml: METHOD with OVERLAY merged over its configuration")
    args = parser.parse_args(argv)
    args.cohort = args.cohort or str(Path(args.out) / "cohort")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("wsiomics").setLevel(logging.WARNING)
    rows = run(args)
    summary = summarise(rows, Path(args.out))
    plot(summary, Path(args.out), args.candidates)
    print(summary.to_string(index=False))
    shots = fewshot(Path(args.out), tuple(args.k), args.draws, args.seed)
    if shots is not None:
        table = shots.groupby(["n_pretrain", "run", "k", "embedding"])["balanced_accuracy"].agg(["mean", "std"])
        table = table.round(3)
        table.reset_index().to_csv(Path(args.out) / "fewshot_summary.tsv", sep="\t", index=False)
        print(table.unstack("embedding").to_string())
    (Path(args.out) / "args.json").write_text(json.dumps(vars(args), indent=1))


if __name__ == "__main__":
    main()
