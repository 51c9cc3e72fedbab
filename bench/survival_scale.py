"""Survival where pretraining should pay: many paired patients, few with follow-up (issue 18's open question,
issue 19's regime).

Protocol (the stage API directly, one "fold" per follow-up count, the same patients throughout):

1. a feature cohort with follow-up (``python -m wsiomics.synth features --survival``; made here when ``--cohort``
   does not exist): log-hazard 2 latent0 + 2 latent1 + tissue type + programme, the latent factors seen by both
   modalities, tissue type by a minority of tiles only, programme by the genes only;
2. one seeded permutation (:func:`pretraining.split`) gives a fixed **test pool** (``--test``, 200) and a
   training order; the first m patients of that order keep their follow-up (role ``train``), every other
   non-test patient is role ``unlabelled``: it pretrains and is never fine-tuned on (issue 19's pool ``all``);
3. expression normalised once on train + unlabelled (the same patients for every m, so one pretraining of
   ``mgi`` on every non-test patient serves every m);
4. per m (``--follow``): ``coxph`` (ridge Cox on pooled features + genes), the survival networks without
   pretraining (``image_only_survival``, ``gene_only_survival``, ``late_fusion_survival``), ``mgi_survival``
   fine-tuned from the pretrained checkpoint, and ``mgi_survival_no_pretrain``: the same fine-tune from the
   untrained network (the checkpoint pretraining would have started from). Harrell's and Uno's c-index on the
   test pool.

``python bench/survival_scale.py --out /work/runs/surv-scale`` writes ``cindex.tsv`` (follow, method, seed,
c_index, c_index_uno, n_test, n_events, seconds; method ``oracle``: the c-index of the generator's own
log-hazard on the test pool, the ceiling) and prints the table of means. ``--overlay F.yaml --tag _x`` reruns
the fine-tunes with changed settings beside the others (``cindex_x.tsv``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining as bench  # noqa: E402  (the pretraining bench's cohort preparation, split and step budget)

NETWORKS = ("image_only_survival", "gene_only_survival", "late_fusion_survival")
STARTS = ("mgi_survival", "mgi_survival_no_pretrain")  # MGI's survival head from the pretrained / untrained network
log = logging.getLogger("bench.survival_scale")


def make_cohort(cohort: Path, patients: int, seed: int) -> None:
    from wsiomics.synth.features import FeatureCohortConfig, write_feature_cohort

    if not (cohort / "samples.tsv").exists():
        write_feature_cohort(cohort, FeatureCohortConfig(patients=patients, seed=seed, survival=True), progress=False)


def folds_for(order: list[str], follow: int, test: list[str]) -> pd.DataFrame:
    """Role ``train`` for the first ``follow`` patients of the order, ``unlabelled`` for the rest, ``test``."""
    rows = [(p, 0, "train" if i < follow else "unlabelled", "") for i, p in enumerate(order)]
    rows += [(p, 0, "test", "") for p in test]
    return pd.DataFrame(rows, columns=["patient_id", "fold", "role", "label"])


def untrained_checkpoint(cfg: dict[str, Any], data, out: Path) -> Path:
    """MGI as pretraining builds it before its first step, saved as a checkpoint a fine-tune can start from."""
    import torch

    from wsiomics.train.build import build_model
    from wsiomics.train.loop import save_model
    from wsiomics.train.methods import get_method
    from wsiomics.train.stages import fold_context

    path = out / "model.pt"
    if not path.exists():
        ctx = fold_context(get_method("mgi"), cfg, data, out, "pretrain")
        torch.manual_seed(ctx.seed)
        model = build_model(get_method("mgi"), ctx.cfg, data)
        save_model(path, model, {"method": "mgi", "stage": "initial", "config": ctx.cfg})
    return path


def finetune(name: str, cfg: dict[str, Any], data, out: Path, samples: Path, pretrained: Path | None = None
             ) -> dict[str, Any]:
    from wsiomics.train.stages import finetune as run_finetune

    if not (out / "metrics.json").exists():
        run_finetune(name, cfg, data, out, pretrained=pretrained, samples=str(samples))
    return json.loads((out / "metrics.json").read_text())


def oracle(cohort: Path, test: list[str]) -> float:
    """Harrell's c-index of the generator's own log-hazard on the test pool: the ceiling for any model."""
    from sksurv.metrics import concordance_index_censored

    from wsiomics.synth.cohort import SURVIVAL_WEIGHTS

    truth = pd.read_csv(cohort / "patients_truth.tsv", sep="\t", index_col="patient_id").loc[test]
    log_hazard = sum(w * truth[k].to_numpy(float) for k, w in SURVIVAL_WEIGHTS.items())
    return float(concordance_index_censored(truth["event"].to_numpy(bool), truth["time"].to_numpy(float),
                                            log_hazard)[0])


def run(args: argparse.Namespace) -> pd.DataFrame:
    from wsiomics.datasets import load_fold
    from wsiomics.expression.cohort import write_anndata
    from wsiomics.expression.normalize import NormalizeParams, normalize_fold
    from wsiomics.train import stages
    from wsiomics.train.methods import deep_merge, method_config

    work, cohort_dir = Path(args.out), Path(args.cohort)
    work.mkdir(parents=True, exist_ok=True)
    make_cohort(cohort_dir, args.patients, args.seed)
    slides, labels, feature_dir, cohort = bench.prepare(cohort_dir, work, args.patients, args.seed)
    test, _, order = bench.split(list(labels.index), args.test, 0, args.seed)
    samples = cohort_dir / "samples.tsv"
    with open(bench.ROOT / "config.yaml") as f:
        config = yaml.safe_load(f)
    expr = work / "expression.zarr"
    if not expr.exists():  # fitted on train + unlabelled: the same patients whatever the follow-up count
        write_anndata(normalize_fold(cohort.copy(), folds_for(order, 0, test), 0,
                                     bench.section(NormalizeParams, config["expression"])), expr)
    rows = [{"follow": m, "method": "oracle", "seed": "", "c_index": oracle(cohort_dir, test)} for m in args.follow]
    overlay: dict[str, Any] = {}
    for path in args.overlay:  # the fine-tunes' settings (MGI's pretraining keeps the configured ones)
        with open(path) as f:
            overlay = deep_merge(overlay, yaml.safe_load(f) or {})
    for seed in args.train_seeds:
        train_cfg = deep_merge(config["train"], {"device": "cpu", "threads": args.threads, "seed": seed})
        pool = load_fold(folds_for(order, 0, test), 0, slides, feature_dir, expr)
        pre_cfg = bench.step_budget(method_config(train_cfg, "mgi"), len(order), args.max_steps)
        pre_dir = work / f"seed{seed}" / "mgi"
        if not (pre_dir / "pretrain" / "model.pt").exists():
            stages.pretrain("mgi", pre_cfg, pool, pre_dir)
        starts = {"mgi_survival": pre_dir / "pretrain" / "model.pt",
                  "mgi_survival_no_pretrain": untrained_checkpoint(pre_cfg, pool, work / f"seed{seed}" / "mgi_init")}
        for follow in args.follow:
            data = load_fold(folds_for(order, follow, test), 0, slides, feature_dir, expr)
            for label in [m for m in ("coxph", *NETWORKS, *starts) if m in args.methods]:
                name = "mgi_survival" if label.startswith("mgi_survival") else label
                t0 = time.perf_counter()
                out = work / f"seed{seed}" / f"m{follow}" / f"{label}{args.tag}"
                cfg = deep_merge(method_config(train_cfg, name), overlay)
                found = finetune(name, cfg, data, out, samples, starts.get(label))
                rows.append({"follow": follow, "method": f"{label}{args.tag}", "seed": seed,
                             **{k: found[k] for k in ("c_index", "c_index_uno", "n_test", "n_events")},
                             "seconds": round(time.perf_counter() - t0, 1)})
                log.info("seed %d, %d with follow-up, %s: c-index %.3f (Uno %.3f)", seed, follow, label,
                         found["c_index"], found["c_index_uno"] or float("nan"))
                pd.DataFrame(rows).to_csv(work / f"cindex{args.tag}.tsv", sep="\t", index=False)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work folder (feature stores, runs, cindex.tsv)")
    parser.add_argument("--cohort", default="", help="feature cohort with follow-up (made when absent; OUT/cohort)")
    parser.add_argument("--patients", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0, help="cohort and split seed")
    parser.add_argument("--test", type=int, default=200, help="test pool")
    parser.add_argument("--follow", type=int, nargs="+", default=[30, 60, 120, 240],
                        help="training patients with follow-up (the rest of the non-test patients only pretrain)")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=400, help="MGI pretraining steps at most (0: no cap)")
    parser.add_argument("--methods", nargs="+", default=["coxph", *NETWORKS, *STARTS])
    parser.add_argument("--overlay", nargs="*", default=[], help="YAML overlays of the fine-tunes' train section")
    parser.add_argument("--tag", default="", help="suffix of the run folders and labels (runs with an overlay)")
    args = parser.parse_args(argv)
    args.cohort = args.cohort or str(Path(args.out) / "cohort")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("wsiomics").setLevel(logging.WARNING)
    rows = run(args)
    table = rows.groupby(["follow", "method"], sort=False)["c_index"].agg(["mean", "std", "count"]).round(3)
    print(table.unstack("method")["mean"].to_string())


if __name__ == "__main__":
    main()
