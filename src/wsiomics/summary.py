"""The cohort summary (``results/summary/``): every method that ran, each metric as mean ± std over folds and
pooled over all test patients with a seeded patient-level bootstrap 95% CI, paired comparisons, and a
Markdown results table.

Computed only from what the methods wrote (each fold's ``metrics.json`` and the task's files beside it,
e.g. ``predictions.tsv``, ``risks.tsv``), through the task interface (:mod:`wsiomics.train.tasks.base`):
a task gives per-patient records (``Task.patient_records``) and the statistic over any set of them
(``Task.pooled_statistic``), so a new task joins the summary without edits here.

Bootstrap: the unit is the patient (all of a patient's rows, e.g. slides, move together). Each resample
draws, within each stratum of the records' ``stratum`` column (classification and the linear probe: the
label, so every resample has every class and balanced accuracy and AUC stay defined, as pROC's stratified
bootstrap; retrieval, segmentation and survival: none), as many patients as the stratum has, with
replacement: ``rng = numpy.random.default_rng(seed)``, then for each stratum in sorted order
``rng.integers(0, n_stratum, size=(B, n_stratum))``. The 95% CI is the 2.5th and 97.5th percentile
(numpy's linear interpolation) of the resamples where the statistic is defined. The generator restarts
from ``seed`` for every set of patients, so a method's CI does not depend on which other methods ran, and
two methods on the same patients see the same resamples: a paired comparison is the per-resample
difference of the two statistics over the patients both have.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["method", "group", "metric", "mean", "std", "pooled", "ci_low", "ci_high", "n_patients"]
COMPARISON_COLUMNS = ["method", "versus", "relation", "metric", "difference", "ci_low", "ci_high", "n_patients",
                      "method_pooled", "versus_pooled"]
GROUPS = ("baselines", "GiMP", "MGI", "segmentation", "survival", "other")  # the tables' row order
FAMILIES = {"gimp": "GiMP", "mgi": "MGI"}  # model -> group, for classification methods
TASK_GROUPS = {"segment": "segmentation", "survival": "survival"}
TASK_TITLES = {"classify": "Classification", "segment": "Segmentation", "survival": "Survival"}
LABELS = {"balanced_accuracy": "Balanced acc.", "accuracy": "Accuracy", "auc_macro": "AUC (macro)",
          "f1_macro": "F1 (macro)", "recall_i2g@1": "R@1 img→gene", "recall_i2g@5": "R@5 img→gene",
          "recall_g2i@1": "R@1 gene→img", "recall_g2i@5": "R@5 gene→img",
          "linear_probe_balanced_accuracy": "Linear probe (bal. acc.)", "dice_mean": "Dice (mean)",
          "dice_pooled": "Dice (pooled)", "c_index": "C-index", "c_index_uno": "C-index (Uno)",
          "td_auc_mean": "td-AUC", "integrated_brier_score": "IBS"}
LOWER_IS_BETTER = {"integrated_brier_score"}
REFERENCE = ("recall_chance@",)  # reference levels: in metrics.tsv, not compared, not columns of the table


@dataclass
class SummaryParams:
    bootstrap: int = 1000  # bootstrap resamples of the test patients
    seed: int = 0  # seed of the resampling


@dataclass
class MethodRun:
    """One method's folds: their metrics.json and the pooled test records by kind (with a ``fold`` column)."""

    name: str
    task: Any  # wsiomics.train.tasks.base.Task
    group: str
    folds: dict[int, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, pd.DataFrame] = field(default_factory=dict)


def _task_of(name: str, fold_dir: Path, metrics: dict[str, Any]):
    """The method's task (a method of another code version: from the files it wrote)."""
    from wsiomics.train.methods import METHODS
    from wsiomics.train.tasks import get_task
    from wsiomics.train.tasks.base import Task

    if name in METHODS:
        return get_task(METHODS[name].task)
    for task, present in (("classify", (fold_dir / "predictions.tsv").exists()),
                          ("survival", (fold_dir / "risks.tsv").exists()), ("segment", "dice_per_slide" in metrics)):
        if present:
            return get_task(task)
    return Task()


def method_group(name: str, task: str) -> str:
    """baselines / GiMP / MGI for classification methods (by network), segmentation and survival by task;
    ``other`` for a method of unknown name or of another task."""
    from wsiomics.train.methods import METHODS

    if task in TASK_GROUPS:
        return TASK_GROUPS[task]
    if name not in METHODS or task != "classify":
        return "other"
    return FAMILIES.get(METHODS[name].model, "baselines")


def is_pretrained(name: str) -> bool:
    from wsiomics.train.methods import METHODS, pretrained_source

    return name in METHODS and bool(pretrained_source(METHODS[name]))


def is_baseline(name: str) -> bool:
    """A method without pretraining that is not a ``_no_pretrain`` ablation of a pretrained one."""
    from wsiomics.train.methods import METHODS

    return name in METHODS and not is_pretrained(name) and not name.endswith("_no_pretrain")


def ablation_of(name: str, ran: list[str]) -> str | None:
    """The pretrained method's ``_no_pretrain`` ablation among ``ran``: ``<name>_no_pretrain``, else the
    ``_no_pretrain`` method of the same network and task (gimp_no_mpm -> gimp_no_pretrain)."""
    from wsiomics.train.methods import METHODS

    if f"{name}_no_pretrain" in ran:
        return f"{name}_no_pretrain"
    spec = METHODS[name]
    same = [m for m in ran if m.endswith("_no_pretrain") and m in METHODS and METHODS[m].model == spec.model
            and METHODS[m].task == spec.task]
    return same[0] if same else None


def load_runs(paths: list[str | Path]) -> dict[str, MethodRun]:
    """Every fold's metrics.json, grouped by method in the order given, with the task's test records."""
    runs: dict[str, MethodRun] = {}
    for path in map(Path, paths):
        try:
            metrics = json.loads(path.read_text())
            name, fold = str(metrics["method"]), int(metrics["fold"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: not a fold's metrics.json with method and fold ({e}); rerun its method") from e
        if name not in runs:
            task = _task_of(name, path.parent, metrics)
            runs[name] = MethodRun(name, task, method_group(name, task.name))
        run = runs[name]
        if fold in run.folds:
            raise ValueError(f"{path}: {name} fold {fold} given twice")
        run.folds[fold] = metrics
        for kind, table in run.task.patient_records(path.parent, metrics).items():
            table = table.assign(fold=fold, patient_id=table["patient_id"].astype(str))
            run.records[kind] = pd.concat([run.records[kind], table], ignore_index=True) if kind in run.records \
                else table.reset_index(drop=True)
    return runs


class Bootstrap:
    """Seeded patient-level resamples of a set of patients, and a method's statistic on each (cached)."""

    def __init__(self, params: SummaryParams):
        self.params = params
        self._draws: dict[tuple, np.ndarray] = {}
        self._stats: dict[tuple, dict[str, np.ndarray]] = {}

    def draws(self, patients: tuple[str, ...], strata: tuple[str, ...] | None) -> np.ndarray:
        """(B, n) positions into ``patients``, resampled within each stratum (module docstring)."""
        key = (patients, strata)
        if key not in self._draws:
            rng = np.random.default_rng(self.params.seed)
            b, n = self.params.bootstrap, len(patients)
            if strata is None:
                out = rng.integers(0, n, size=(b, n))
            else:
                labels = np.asarray(strata, dtype=object)
                parts = []
                for s in sorted(set(strata)):
                    members = np.flatnonzero(labels == s)
                    parts.append(members[rng.integers(0, len(members), size=(b, len(members)))])
                out = np.concatenate(parts, axis=1)
            self._draws[key] = out
        return self._draws[key]

    def distribution(self, run: MethodRun, kind: str, patients: tuple[str, ...],
                     strata: tuple[str, ...] | None) -> dict[str, np.ndarray]:
        """The statistic of ``run``'s records of ``patients`` on every resample (NaN where undefined); two
        methods given the same patients and strata get the same resamples."""
        key = (run.name, kind, patients, strata)
        if key not in self._stats:
            records = run.records[kind]
            rows = records.groupby("patient_id", sort=False).indices  # patient -> its row positions
            per_patient = [rows[p] for p in patients]
            draws = self.draws(patients, strata)
            taken = np.concatenate(per_patient)  # the records of these patients, patient by patient
            drawn = np.zeros((len(draws), len(patients)))  # (B, patients): times each patient is drawn
            np.add.at(drawn, (np.arange(len(draws))[:, None], draws), 1)
            weights = drawn[:, np.repeat(np.arange(len(patients)), [len(r) for r in per_patient])]  # (B, rows)
            fast = run.task.bootstrap_statistic(kind, records.iloc[taken].reset_index(drop=True), weights)
            if fast is not None:
                self._stats[key] = {m: np.asarray(v, float) for m, v in fast.items()}
                return self._stats[key]
            values: dict[str, list[float]] = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. a class predicted that no resampled patient has
                for draw in draws:
                    sample = records.iloc[np.concatenate([per_patient[j] for j in draw])]
                    for metric, value in run.task.pooled_statistic(kind, sample).items():
                        values.setdefault(metric, []).append(np.nan if value is None else float(value))
            self._stats[key] = {m: np.asarray(v) for m, v in values.items()}
        return self._stats[key]


def strata_of(run: MethodRun, kind: str, patients: tuple[str, ...]) -> tuple[str, ...] | None:
    """Each patient's stratum (its first row's), None when the records have none."""
    records = run.records[kind]
    if "stratum" not in records:
        return None
    first = records.drop_duplicates("patient_id").set_index("patient_id")["stratum"].astype(str)
    return tuple(first[p] for p in patients)


def _ci(values: np.ndarray) -> tuple[float, float]:
    valid = values[np.isfinite(values)]
    if not len(valid):
        return np.nan, np.nan
    low, high = np.percentile(valid, [2.5, 97.5])
    return float(low), float(high)


def _point(run: MethodRun, kind: str, patients: tuple[str, ...] | None = None) -> dict[str, float]:
    records = run.records[kind]
    if patients is not None:
        records = records[records["patient_id"].isin(patients)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = run.task.pooled_statistic(kind, records)
    return {m: np.nan if v is None else float(v) for m, v in found.items()}


def _patients(run: MethodRun, kind: str) -> tuple[str, ...]:
    return tuple(sorted(run.records[kind]["patient_id"].unique()))


def metric_table(runs: dict[str, MethodRun], boot: Bootstrap) -> pd.DataFrame:
    """One row per method x metric: mean and std (population, ddof 0, as results/models/summary.tsv) over the
    folds' metrics.json, the value pooled over every fold's test patients, its bootstrap 95% CI and the
    number of patients pooled. Methods in group order, then in the order given."""
    rows = []
    for run in sorted(runs.values(), key=lambda r: GROUPS.index(r.group)):
        pooled: dict[str, tuple[float, float, float, int]] = {}
        for kind in run.records:
            patients = _patients(run, kind)
            dist = boot.distribution(run, kind, patients, strata_of(run, kind, patients))
            for metric, value in _point(run, kind).items():
                pooled[metric] = (value, *_ci(dist.get(metric, np.array([]))), len(patients))
        for metric in run.task.summary_metrics:
            folds = [float(m[metric]) for m in run.folds.values() if m.get(metric) is not None]
            if not folds and metric not in pooled:
                continue
            value, low, high, n = pooled.get(metric, (np.nan, np.nan, np.nan, None))
            rows.append({"method": run.name, "group": run.group, "metric": metric,
                         "mean": np.mean(folds) if folds else np.nan, "std": np.std(folds) if folds else np.nan,
                         "pooled": value, "ci_low": low, "ci_high": high, "n_patients": n})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS).astype({"n_patients": "Int64"})


def best_baseline(runs: dict[str, MethodRun], task: str, table: pd.DataFrame) -> str | None:
    """The baseline of ``task`` with the highest pooled primary metric (the task's first summary metric)."""
    candidates = [r for r in runs.values() if r.task.name == task and is_baseline(r.name)]
    if not candidates:
        return None
    primary = candidates[0].task.summary_metrics[0]
    scores = table[(table["metric"] == primary) & table["method"].isin([r.name for r in candidates])]
    scores = scores.dropna(subset=["pooled"])
    if scores.empty:
        return None
    best = scores["pooled"].idxmin() if primary in LOWER_IS_BETTER else scores["pooled"].idxmax()
    return str(scores.loc[best, "method"])


def compare(a: MethodRun, b: MethodRun, relation: str, boot: Bootstrap) -> list[dict[str, Any]]:
    """``a`` minus ``b`` on each pooled metric both have, over the test patients both have, with the paired
    bootstrap's 95% CI (the same resamples for both)."""
    rows = []
    for kind in [k for k in a.records if k in b.records]:
        common = tuple(sorted(set(_patients(a, kind)) & set(_patients(b, kind))))
        if not common:
            continue
        strata = strata_of(a, kind, common)  # one set of resamples for both: paired
        da, db = boot.distribution(a, kind, common, strata), boot.distribution(b, kind, common, strata)
        pa, pb = _point(a, kind, common), _point(b, kind, common)
        for metric in a.task.summary_metrics:
            if metric not in pa or metric not in pb or metric.startswith(REFERENCE):
                continue
            low, high = _ci(da[metric] - db[metric])
            rows.append({"method": a.name, "versus": b.name, "relation": relation, "metric": metric,
                         "difference": pa[metric] - pb[metric], "ci_low": low, "ci_high": high,
                         "n_patients": len(common), "method_pooled": pa[metric], "versus_pooled": pb[metric]})
    order = {m: i for i, m in enumerate(a.task.summary_metrics)}
    return sorted(rows, key=lambda r: order[r["metric"]])  # the task's metric order, whatever the kinds


def comparison_table(runs: dict[str, MethodRun], table: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """Each pretrained method against its ``_no_pretrain`` ablation and against its task's best baseline."""
    ran = list(runs)
    rows = []
    for run in runs.values():
        if not is_pretrained(run.name):
            continue
        ablation = ablation_of(run.name, ran)
        if ablation:
            rows += compare(run, runs[ablation], "ablation", boot)
        baseline = best_baseline(runs, run.task.name, table)
        if baseline:
            rows += compare(run, runs[baseline], "best_baseline", boot)
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS).astype({"n_patients": "Int64"})


def _fmt(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _cell(row: pd.Series, bold: bool) -> str:
    """``pooled [ci_low, ci_high]; mean ± std`` (parts left out where missing)."""
    text = _fmt(row["pooled"])
    text = f"**{text}**" if bold else text
    if np.isfinite(row["ci_low"]):
        text += f" [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]"
    if np.isfinite(row["mean"]):
        text += f"; {_fmt(row['mean'])} ± {_fmt(row['std'])}"
    return text


def markdown(table: pd.DataFrame, comparisons: pd.DataFrame, runs: dict[str, MethodRun],
             params: SummaryParams) -> str:
    """A results table per task, rows grouped (baselines, GiMP, MGI, ...), each cell the pooled value with its
    95% CI and, after it, the mean ± std over folds; the best pooled value of each column in bold."""
    lines = ["# Results", ""]
    for task in dict.fromkeys(r.task.name for r in sorted(runs.values(), key=lambda r: GROUPS.index(r.group))):
        names = [r.name for r in runs.values() if r.task.name == task]
        part = table[table["method"].isin(names)]
        metrics = [m for m in dict.fromkeys(part["metric"]) if not m.startswith(REFERENCE)]
        if not metrics:
            continue
        cell = part.set_index(["method", "metric"])
        best = {}
        for m in metrics:
            col = part[part["metric"] == m].dropna(subset=["pooled"])
            if len(col) > 1:
                best[m] = col["pooled"].min() if m in LOWER_IS_BETTER else col["pooled"].max()
        n = part.groupby("method")["n_patients"].max()
        lines += [f"## {TASK_TITLES.get(task, task)}", "",
                  "| Method | n | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |",
                  "|" + "---|" * (len(metrics) + 2)]
        for group in GROUPS:
            members = part[part["group"] == group]["method"].unique()
            if not len(members):
                continue
            lines.append(f"| *{group}* |" + " |" * (len(metrics) + 1))
            for method in members:
                cells = []
                for m in metrics:
                    if (method, m) not in cell.index:
                        cells.append("–")
                        continue
                    r = cell.loc[(method, m)]
                    cells.append(_cell(r, bold=m in best and r["pooled"] == best[m]))
                count = n.get(method)
                lines.append(f"| {method} | {'–' if pd.isna(count) else int(count)} | " + " | ".join(cells) + " |")
        chance = part[part["metric"].str.startswith(REFERENCE)].groupby("metric")["pooled"].mean()
        lines.append("")
        if len(chance):
            lines += ["Retrieval at chance (pooled): " + ", ".join(
                f"{m.replace('recall_chance', 'recall')} {_fmt(v)}" for m, v in chance.items()) + ".", ""]
    lines += [
        f"Each cell: the value pooled over every fold's test patients [patient-level bootstrap 95% CI, "
        f"{params.bootstrap} resamples, seed {params.seed}; classification resampled within labels]; then the "
        "mean ± std (ddof 0) over folds. n: test patients pooled. Retrieval pools each query's hits, ranked within "
        "its own fold (each fold's embeddings are a different space); the c-index pools pairs of patients of the "
        "same fold (each fold's risks come from its own model). Best pooled value per column in bold.", ""]
    lines += pretraining_pool_lines(runs)
    if len(comparisons):
        lines += ["## Paired comparisons", "",
                  "Pooled difference (method − versus) on the test patients both have, paired bootstrap 95% CI.", "",
                  "| Method | Versus | Relation | Metric | Difference [95% CI] | n |", "|---|---|---|---|---|---|"]
        for r in comparisons.itertuples():
            label = LABELS.get(r.metric, r.metric)
            lines.append(f"| {r.method} | {r.versus} | {r.relation.replace('_', ' ')} | {label} | "
                         f"{r.difference:+.3f} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}] | {r.n_patients} |")
        lines.append("")
    return "\n".join(lines)


def pretraining_pool_lines(runs: dict[str, MethodRun]) -> list[str]:
    """Who pretrained: per ``train.pretrain.pool``, the mean train and unlabelled patients per fold and the
    methods (from each fold's pretraining record; none for runs written before it was kept)."""
    pools: dict[tuple[str, float, float], list[str]] = {}
    for run in runs.values():
        info = [(m.get("pretrain") or {}).get("training") or m.get("training") or {} for m in run.folds.values()]
        info = [i for i in info if "unlabelled_patients" in i]
        if info:
            key = (str(info[0]["pool"]), float(np.mean([i["train_patients"] for i in info])),
                   float(np.mean([i["unlabelled_patients"] for i in info])))
            pools.setdefault(key, []).append(run.name)
    lines = [f"Pretraining (train.pretrain.pool: {pool}): {train:.3g} train patients per fold "
             + (f"+ {unlabelled:.3g} unlabelled" if pool == "all" else f"({unlabelled:.3g} unlabelled left out)")
             + f" (means over folds; unlabelled patients are never fine-tuned on or tested): {', '.join(names)}."
             for (pool, train, unlabelled), names in pools.items()]
    return [*lines, ""] if lines else []


def summarize(paths: list[str | Path], params: SummaryParams) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """metrics.tsv, comparisons.tsv and metrics.md of the given folds' metrics.json files."""
    if params.bootstrap < 1:
        raise ValueError(f"summary.bootstrap is {params.bootstrap}; use at least 1 resample (e.g. 1000)")
    runs = load_runs(paths)
    boot = Bootstrap(params)
    table = metric_table(runs, boot)
    comparisons = comparison_table(runs, table, boot)
    return table, comparisons, markdown(table, comparisons, runs, params)


def write(out_dir: str | Path, table: pd.DataFrame, comparisons: pd.DataFrame, text: str) -> None:
    from wsiomics.io import atomic_path, write_text

    out = Path(out_dir)
    for name, frame in (("metrics.tsv", table), ("comparisons.tsv", comparisons)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    write_text(out / "metrics.md", text)


def main(argv: list[str] | None = None) -> int:
    from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args

    parser = argparse.ArgumentParser(prog="python -m wsiomics.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, type=Path,
                        help="folder for metrics.tsv, comparisons.tsv and metrics.md (results/summary)")
    parser.add_argument("metrics", nargs="+", help="every fold's metrics.json (results/models/<method>/fold<k>/)")
    add_dataclass_options(parser, SummaryParams)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        table, comparisons, text = summarize(args.metrics, dataclass_from_args(SummaryParams, args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write(args.out_dir, table, comparisons, text)
    log.info("wrote %s: %d methods, %d metric rows, %d comparisons", args.out_dir, table["method"].nunique(),
             len(table), len(comparisons))
    return 0


if __name__ == "__main__":
    sys.exit(main())
