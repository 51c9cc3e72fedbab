"""Where is the label in MGI's slide encoder? Few-shot probes of every slide-side tensor of one
``bench/pretraining.py`` run, beside references that bound what any slide embedding can reach (issue 19 A).

For one training size ``--n`` of a finished ``bench/pretraining.py --out WORK`` (same ``--seed``, so the same
split), the few-shot stage's :func:`wsiomics.fewshot.fewshot_table` (k labelled training patients per class,
seeded draws, the test pool) on:

* ``projection``, ``cls``, ``token_mean``: MGI's projected image embedding (what the few-shot stage probes as
  ``image``), the slide [CLS] before the projection head (SimCLR's choice for linear probes) and the mean of
  the slide transformer's token outputs, of the pretrained network (``WORK/n<n>/<label>/pretrain/model.pt``)
  and, suffixed ``_untrained``, of the same network as built before its first step;
* ``pooled_features``: the mean patch feature;
* ``tile_clusters``, ``tile_clusters_centred``: a bag of ``--clusters`` k-means tile clusters fitted on the
  training patients' tiles, raw or with each slide's tiles centred on the slide's mean (which removes the
  per-slide offset and stain shift that the generator adds to every tile of a slide);
* ``truth_tissue``, ``truth_latent``: the generator's tissue type (all the image shows of a tissue x programme
  label) and its two latent factors (all that image and genes share), from ``patients_truth.tsv``.

``python bench/pretraining_probe.py --work WORK --cohort COHORT --n 500 --seed 0 [--label mgi] [--overlay Y]``
(about a minute per run, one thread). Prints balanced accuracy per k and embedding and writes
``WORK/n<n>/<label>/probe.tsv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining as bench  # noqa: E402  (the bench's split and folds, so the patients are the same)


def slide_tensors(model, data, roles: tuple[str, ...], dparams) -> tuple[list, dict[str, np.ndarray]]:
    """(patients, {projection, cls, token_mean}) of an MGI network over ``roles``, one patient at a time."""
    import torch

    dataset = data.dataset(roles, dparams, train=False)
    loader = data.loader(dataset, batch_size=1, shuffle=False)
    rows: dict[str, list[np.ndarray]] = {"projection": [], "cls": [], "token_mean": []}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            projection, tokens, _, cls = model.encode_image(batch)  # (1, E), (1, L, Di), _, (1, Di)
            rows["projection"].append(projection[0].numpy())
            rows["cls"].append(cls[0].numpy())
            rows["token_mean"].append(tokens[0][batch.token_mask[0]].mean(0).numpy())
    return dataset.patients, {k: np.stack(v).astype(np.float64) for k, v in rows.items()}


def tile_clusters(data, patients, roles: list[str], clusters: int, centred: bool, seed: int, dparams
                  ) -> np.ndarray:
    """(P, clusters) share of each patient's tiles per k-means cluster (fitted on a quarter of the training
    patients' tiles); ``centred``: each patient's tiles minus their mean first."""
    from sklearn.cluster import MiniBatchKMeans

    dataset = data.dataset([], dparams, train=False)
    dataset.patients = patients
    tiles = []
    for i in range(len(patients)):
        x = np.asarray(dataset[i].features, dtype=np.float64)
        tiles.append(x - x.mean(0) if centred else x)
    fit = np.concatenate([t[::4] for t, r in zip(tiles, roles, strict=True) if r == "train"])
    km = MiniBatchKMeans(clusters, random_state=seed, n_init=3).fit(fit)
    return np.stack([np.bincount(km.predict(t), minlength=clusters) / len(t) for t in tiles])


def main(argv: list[str] | None = None) -> None:
    import torch

    import wsiomics.fewshot as fs
    from wsiomics.datasets import load_fold
    from wsiomics.samples import load_sample_sheet
    from wsiomics.train.build import build_model
    from wsiomics.train.linear import pooled_features
    from wsiomics.train.methods import deep_merge, get_method, method_config
    from wsiomics.train.stages import fold_context, initial_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="a bench/pretraining.py --out folder")
    parser.add_argument("--cohort", required=True, help="its feature cohort (samples.tsv, patients_truth.tsv)")
    parser.add_argument("--n", type=int, default=500, help="training size (WORK/n<n>)")
    parser.add_argument("--seed", type=int, default=0, help="the bench run's --seed")
    parser.add_argument("--label", default="mgi", help="the run's label (WORK/n<n>/<label>), an MGI network")
    parser.add_argument("--overlay", default="", help="the run's variant overlay YAML, if any")
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=16)
    args = parser.parse_args(argv)
    work, cohort = Path(args.work), Path(args.cohort)

    sheet = load_sample_sheet(cohort / "samples.tsv")
    slides = sheet[["patient_id", "slide_id"]].drop_duplicates()
    labels = sheet.drop_duplicates("patient_id").set_index("patient_id")["label"]
    test, val, order = bench.split(list(labels.index), args.test, args.val, args.seed)
    data = load_fold(bench.folds_table(order[:args.n], val, test, labels), 0, slides, work / "features",
                     work / f"n{args.n}" / "expression.zarr")
    with open(bench.ROOT / "config.yaml") as f:
        cfg = yaml.safe_load(f)["train"]
    cfg.update(device="cpu", threads=1, seed=args.seed)
    overlay = yaml.safe_load(Path(args.overlay).read_text()) if args.overlay else {}
    cfg = deep_merge(method_config(cfg, "mgi"), overlay or {})
    run = work / f"n{args.n}" / args.label
    ctx = fold_context(get_method("mgi"), cfg, data, run, "pretrain", run / "pretrain" / "model.pt")
    trained, _, _ = initial_model(ctx)
    torch.manual_seed(ctx.seed)  # the network as pretraining built it, before its first step
    untrained = build_model(get_method("mgi"), ctx.cfg, data)

    roles_of = ("train", "test")
    patients, emb = slide_tensors(trained, data, roles_of, ctx.dparams)
    _, before = slide_tensors(untrained, data, roles_of, ctx.dparams)
    emb |= {f"{k}_untrained": v for k, v in before.items()}
    roles = [p.role for p in patients]
    emb["pooled_features"] = pooled_features(data, patients, ctx.dparams)
    for centred in (False, True):
        emb["tile_clusters" + ("_centred" if centred else "")] = tile_clusters(
            data, patients, roles, args.clusters, centred, args.seed, ctx.dparams)
    truth = pd.read_csv(cohort / "patients_truth.tsv", sep="\t", index_col="patient_id").loc[
        [p.patient_id for p in patients]]
    emb["truth_tissue"] = np.eye(2)[truth["tissue_type"].to_numpy()]
    emb["truth_latent"] = truth[["latent0", "latent1"]].to_numpy(float)

    table = fs.fewshot_table(emb, [p.label for p in patients], roles,
                             fs.FewshotParams(k=tuple(args.k), draws=args.draws), args.seed)
    table.to_csv(run / "probe.tsv", sep="\t", index=False)
    means = table.groupby(["embedding", "k"], sort=False)["balanced_accuracy"].mean().unstack("k").round(3)
    print(f"{run}: balanced accuracy (mean of {args.draws} draws, {int(table['n_test'].iloc[0])} test patients)")
    print(means.to_string())


if __name__ == "__main__":
    main()
