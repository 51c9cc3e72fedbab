"""``python -m wsiomics.train {pretrain,finetune,predict,methods}``: the training stages' command line.

The method's resolved configuration arrives as one JSON document (``--config``, built by the workflow
from ``config.yaml``'s ``train:`` section); it is parsed with ``json.loads``, never evaluated.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from wsiomics.cli import configure_logging

log = logging.getLogger("wsiomics.train")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help="method name (python -m wsiomics.train methods)")
    p.add_argument("--fold", type=int, required=True, help="fold number of the folds table")
    p.add_argument("--folds", required=True, help="results/splits/folds.tsv")
    p.add_argument("--samples", default="", help="the sample sheet (maps slides to patients)")
    p.add_argument("--features", default="", help="folder of per-slide feature stores (results/features/<encoder>)")
    p.add_argument("--expression", default="", help="the fold's expression store (results/expression/fold<k>.zarr)")
    p.add_argument("--config", required=True, help="the method's resolved configuration as JSON (or @file.json)")
    p.add_argument("--out-dir", required=True, help="results/models/<method>/fold<k>")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (overrides the config's)")


def _config(text: str) -> dict:
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    return json.loads(text)


def run_config(args: argparse.Namespace) -> dict:
    """The method's resolved configuration (``--config``), with ``--threads`` over the config's."""
    cfg = _config(args.config)
    if args.threads:
        cfg["threads"] = args.threads
    return cfg


def fold_inputs(args: argparse.Namespace):
    """The fold's data for ``--method`` from the :func:`_common` options."""
    from wsiomics.train.methods import get_method
    from wsiomics.train.stages import load_inputs

    return load_inputs(args.folds, args.samples or None, args.features or None, args.expression or None, args.fold,
                       get_method(args.method))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsiomics.train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="pretrain a method's encoders on the fold's training patients")
    _common(pre)
    ft = sub.add_parser("finetune", help="fine-tune (or fit) and evaluate on the fold's test patients")
    _common(ft)
    ft.add_argument("--pretrained", default="",
                    help="the fold's pretrain/model.pt (methods with pretraining; mgi_seg: mgi's)")
    pr = sub.add_parser("predict", help="apply a finished run's fold models to a new cohort (deployment)")
    pr.add_argument("--method", required=True, help="a classification method of the run")
    pr.add_argument("--models-dir", required=True, help="the run's results/models/<method> (fold<k>/model.pt)")
    pr.add_argument("--n-folds", type=int, required=True, help="folds of the run (fold0 .. fold<n-1>)")
    pr.add_argument("--samples", required=True, help="the new cohort's sample sheet")
    pr.add_argument("--features", default="",
                    help="the new cohort's feature stores (results/deploy/<name>/features/<encoder>)")
    pr.add_argument("--expression", default="",
                    help="the new cohort's raw expression (results/deploy/<name>/expression/cohort.zarr)")
    pr.add_argument("--fold-expression", default="",
                    help="the run's results/expression (fold<k>.zarr: each fold's fitted normalisation)")
    pr.add_argument("--train-features", default="", help="the run's feature stores (results/features/<encoder>)")
    pr.add_argument("--train-folds", default="", help="the run's folds.tsv (scikit-learn baselines are refitted)")
    pr.add_argument("--train-samples", default="", help="the run's sample sheet (scikit-learn baselines)")
    pr.add_argument("--config", required=True, help="the method's resolved configuration as JSON (or @file.json)")
    pr.add_argument("--out-dir", required=True, help="results/deploy/<name>/<method>")
    pr.add_argument("--threads", type=int, default=None, help="CPU threads (overrides the config's)")
    sub.add_parser("methods", help="list the methods")
    sm = sub.add_parser("summarize", help="method x metric table (mean, std over folds) from metrics.json files")
    sm.add_argument("metrics", nargs="+", help="results/models/<method>/fold<k>/metrics.json")
    sm.add_argument("--out", required=True, help="results/models/summary.tsv")
    args = parser.parse_args(argv)
    configure_logging()

    from wsiomics.train.methods import METHODS

    if args.command == "methods":
        for name, m in METHODS.items():
            print(f"{name:24s} {'pretrain+' if m.pretrain else ''}{m.task:10s} {m.description}")
        return 0
    if args.command == "summarize":
        from wsiomics.train.evaluate import summarize, write_summary

        table = summarize(args.metrics)
        write_summary(args.out, table)
        print(table.to_string())
        return 0
    from wsiomics.train.stages import finetune, pretrain

    cfg = run_config(args)
    if args.command == "predict":
        from wsiomics.samples import SampleSheetError
        from wsiomics.train.deploy import DeployError, predict

        try:
            predict(args.method, cfg, args.models_dir, args.n_folds, args.samples, args.out_dir,
                    features=args.features or None, expression=args.expression or None,
                    fold_expression=args.fold_expression or None, train_features=args.train_features or None,
                    train_folds=args.train_folds or None, train_samples=args.train_samples or None)
        except (DeployError, SampleSheetError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    data = fold_inputs(args)
    if args.command == "pretrain":
        info = pretrain(args.method, cfg, data, args.out_dir)
    else:
        info = finetune(args.method, cfg, data, args.out_dir, args.pretrained or None, samples=args.samples or None)
    log.info("done: %s", info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
