"""Survival: follow-up time and event from the sample sheet; a Cox head (default) or a discrete-time hazard
head on any network; c-index (Harrell, Uno), time-dependent AUC, integrated Brier score; ``risks.tsv`` and a
Kaplan-Meier figure of the test patients split at the training patients' median risk.

Settings (``train.survival``): ``loss`` ``cox`` (partial likelihood, Breslow ties; default) or ``nll``
(discrete-time hazards over ``n_bins`` bins cut at quantiles of the training patients' event times, as MCAT
and SurvPath).
Everything fitted for evaluation (bins, Uno's censoring weights, the time grid, the Cox calibration behind the
Brier score, the Kaplan-Meier split) uses the training patients only.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsiomics.datasets import FoldData
from wsiomics.io import atomic_path
from wsiomics.models.batch import Batch
from wsiomics.models.survival import LOSSES, bin_index, cox_nll, discrete_time_nll, discrete_time_risk, time_bins
from wsiomics.train import evaluate as ev
from wsiomics.train.roles import ALL_ROLES, EVAL_ROLES, TRAIN_ROLES, VAL_ROLES
from wsiomics.train.tasks.base import StageContext, Task, register_task, sheet_input

log = logging.getLogger(__name__)

RISK_COLUMNS = ["patient_id", "role", "risk", "time", "event"]


def settings(cfg: dict[str, Any]) -> tuple[str, int]:
    s = dict(cfg.get("survival") or {})
    loss, n_bins = str(s.get("loss", "cox")), int(s.get("n_bins", 4))
    if loss not in LOSSES:
        raise ValueError(f"train.survival.loss is {loss!r}; choose one of {', '.join(LOSSES)}")
    if n_bins < 2:
        raise ValueError(f"train.survival.n_bins is {n_bins}; use at least 2")
    return loss, n_bins


def fit_roles_of(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The roles a survival network is fitted on: ``train``, and ``val`` too when the fine-tune selects no
    epoch on it (``select: last``)."""
    select = str((cfg.get("finetune") or {}).get("select", "val"))
    return (*TRAIN_ROLES, *VAL_ROLES) if select == "last" else TRAIN_ROLES


def read_outcomes(samples: str | Path, required: bool = True) -> pd.DataFrame:
    """Per-patient ``time`` (days) and ``event`` (1 = event, 0 = censored) from the sample sheet, which
    :func:`wsiomics.samples.load_sample_sheet` checks (a bad or conflicting value is a sheet error naming
    its row); patients with both empty have no follow-up and are left out of survival training. A sheet
    without any follow-up is an error unless not ``required`` (then the table is empty)."""
    from wsiomics.samples import load_sample_sheet

    sheet = load_sample_sheet(samples)
    given = sheet[(sheet["time"] != "") & (sheet["event"] != "")]
    if given.empty and not required:
        return pd.DataFrame({"time": pd.Series(dtype=float), "event": pd.Series(dtype=int)},
                            index=pd.Index([], name="patient_id"))
    if given.empty:
        raise ValueError(f"{samples}: no patient has survival data; survival methods need the columns time (days "
                         "of follow-up) and event (1 = event, 0 = censored)")
    rows = given.groupby("patient_id", sort=True)[["time", "event"]].first()
    return rows.astype({"time": float, "event": int})


def _structured(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=events.astype(bool), time=times.astype(np.float64))


def survival_metrics(train_time: np.ndarray, train_event: np.ndarray, train_risk: np.ndarray,
                     time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict[str, Any]:
    """Harrell's and Uno's c-index, cumulative/dynamic AUC at the training event-time quartiles and the
    integrated Brier score of a one-variable Cox model of the risk (fitted on the training patients) on the
    evaluated patients (scikit-survival). Metrics that are undefined for these patients are None."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )

    out: dict[str, Any] = {"n_test": int(len(time)), "n_events": int(event.sum()), "c_index": None,
                           "c_index_uno": None, "td_auc": {}, "td_auc_mean": None, "integrated_brier_score": None}
    if len(time) < 2 or event.sum() == 0:
        return out
    out["c_index"] = float(concordance_index_censored(event.astype(bool), time, risk)[0])
    train_s, test_s = _structured(train_time, train_event), _structured(time, event)
    follow = train_time.max()
    inside = time < follow  # Uno's weights and the AUC need test times within the training follow-up
    try:
        out["c_index_uno"] = float(concordance_index_ipcw(train_s, test_s[inside], risk[inside])[0])
    except ValueError as e:
        log.info("Uno's c-index undefined here (%s)", e)
    grid = np.quantile(train_time[train_event == 1], [0.25, 0.5, 0.75]) if train_event.sum() else np.array([])
    grid = grid[(grid > time[inside].min()) & (grid < time[inside].max())] if inside.sum() > 1 else grid[:0]
    if len(grid):
        try:
            auc, mean_auc = cumulative_dynamic_auc(train_s, test_s[inside], risk[inside], grid)
            out["td_auc"] = {f"{t:.0f}": float(a) for t, a in zip(grid, auc, strict=True)}
            out["td_auc_mean"] = float(mean_auc)
        except ValueError as e:
            log.info("time-dependent AUC undefined here (%s)", e)
        try:
            cox = CoxPHSurvivalAnalysis(alpha=1e-4).fit(train_risk[:, None], train_s)
            curves = cox.predict_survival_function(risk[inside][:, None])
            estimate = np.stack([f(grid) for f in curves])
            out["integrated_brier_score"] = float(integrated_brier_score(train_s, test_s[inside], estimate, grid))
        except ValueError as e:
            log.info("integrated Brier score undefined here (%s)", e)
    return out


def km_figure(path: Path, time: np.ndarray, event: np.ndarray, high: np.ndarray, title: str) -> float | None:
    """Kaplan-Meier curves of the high- and low-risk groups with the log-rank p-value (lifelines); the p-value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    p_value = None
    for name, mask, colour in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if mask.any():
            fitter = KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})").fit(time[mask], event[mask])
            fitter.plot_survival_function(ax=ax, ci_show=False, color=colour, show_censors=True)
    if high.any() and (~high).any():
        p_value = float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value)
    ax.set_xlabel("days")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}\nlog-rank p = {p_value:.3g}" if p_value is not None else title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return p_value


class Survival(Task):
    name = "survival"
    summary_metrics = ("c_index", "c_index_uno", "td_auc_mean", "integrated_brier_score")
    history_title = "survival"

    def prepare(self, ctx: StageContext) -> FoldData:
        outcomes = sheet_input(ctx, "outcomes", read_outcomes, "time and event columns")
        for p in ctx.data.patients:
            p.outcome = (np.array([outcomes.at[p.patient_id, "time"], outcomes.at[p.patient_id, "event"]], np.float32)
                         if p.patient_id in outcomes.index else None)
        loss, n_bins = settings(ctx.cfg)
        train = [p.outcome for p in ctx.data.role(*fit_roles_of(ctx.cfg)) if p.outcome is not None]
        event_times = np.array([o[0] for o in train if o[1] == 1])
        if len(event_times) < 2:
            raise ValueError(f"{ctx.method.name} fold {ctx.data.fold}: {len(event_times)} training patients with an "
                             "event; survival training needs at least 2 (check the sheet's event column)")
        ctx.found["loss"] = loss
        ctx.found["cuts"] = time_bins(event_times, n_bins) if loss == "nll" else np.array([])
        return ctx.data

    def head_outputs(self, data: FoldData, cfg: dict[str, Any]) -> int:
        loss, n_bins = settings(cfg)
        return n_bins if loss == "nll" else 1

    def training_data(self, ctx: StageContext) -> FoldData:
        """The patients with follow-up, plus the evaluated ones. Without model selection (``finetune.select:
        last``) the ``val`` patients train too: nothing else would use them (``coxph`` fits on them as well)."""
        data, fit_roles = ctx.data, fit_roles_of(ctx.cfg)
        return replace(data, patients=[replace(p, role=TRAIN_ROLES[0]) if p.role in fit_roles else p
                                       for p in data.patients if p.role in EVAL_ROLES or p.outcome is not None])

    def objective(self, ctx: StageContext):
        loss = ctx.found["loss"]
        cuts = torch.as_tensor(ctx.found["cuts"], dtype=torch.float32)

        def objective(model: torch.nn.Module, batch: Batch, gen: torch.Generator) -> dict[str, torch.Tensor]:
            out = model(batch)
            known = ~torch.isnan(batch.outcomes[:, 0])  # (B,)
            time, event = batch.outcomes[known, 0], batch.outcomes[known, 1]
            if not known.any() or (loss == "cox" and not event.any()):  # nothing to learn: the loop skips the step
                return {"loss": out.logits.new_zeros((), dtype=torch.float32)}
            logits = out.logits[known]
            if loss == "nll":
                return {"loss": discrete_time_nll(logits, bin_index(time, cuts.to(time.device)), event)}
            return {"loss": cox_nll(logits[:, 0], time, event)}

        return objective

    def risk(self, ctx: StageContext, logits: np.ndarray) -> float:
        """A patient's risk from its head outputs (higher = earlier event)."""
        if ctx.found["loss"] == "nll":
            return float(discrete_time_risk(torch.as_tensor(logits)[None])[0])
        return float(logits[0])

    def predict(self, model: torch.nn.Module, ctx: StageContext) -> list[ev.PatientResult]:
        """Every patient's risk (training patients too: the Kaplan-Meier split and the Brier calibration are
        fitted on them); only the evaluated roles are scored."""
        results = ev.run_model(model, ctx.data, ALL_ROLES, ctx.device, ctx.dparams)
        for r in results:
            r.probs = None
            r.risk = self.risk(ctx, r.logits)
        return results

    def write(self, ctx: StageContext, results: list[ev.PatientResult], info: dict[str, Any],
              extra: dict[str, Any]) -> dict[str, Any]:
        method, data, out = ctx.method, ctx.data, ctx.out
        rows = [{"patient_id": r.patient.patient_id, "role": r.patient.role, "risk": r.risk,
                 "time": np.nan if r.patient.outcome is None else float(r.patient.outcome[0]),
                 "event": pd.NA if r.patient.outcome is None else int(r.patient.outcome[1])} for r in results]
        table = pd.DataFrame(rows, columns=RISK_COLUMNS).astype({"event": "Int64"})
        with atomic_path(out / "risks.tsv") as tmp:
            table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
        known = table.dropna(subset=["time"])
        fit = known[known["role"].isin((*TRAIN_ROLES, *VAL_ROLES))]
        metrics: dict[str, Any] = {}
        for role in ("test", "heldout"):
            part = known[known["role"] == role]
            if role == "heldout" and part.empty:
                continue
            found = survival_metrics(*(fit[c].to_numpy(float) for c in ("time", "event", "risk")),
                                     *(part[c].to_numpy(float) for c in ("time", "event", "risk")))
            if role == "test":
                metrics.update(found)
            else:
                metrics["heldout"] = found
        threshold = float(fit["risk"].median()) if len(fit) else 0.0
        test = known[known["role"] == "test"]
        title = f"{method.name} fold {data.fold}: test patients at the training median risk"
        metrics["km_logrank_p"] = km_figure(out / "km.png", test["time"].to_numpy(float), test["event"].to_numpy(int),
                                            test["risk"].to_numpy(float) > threshold, title)
        metrics.update(extra)
        metrics.update({"method": method.name, "fold": data.fold, "loss": ctx.found.get("loss"),
                        "bins": [float(c) for c in ctx.found.get("cuts", [])], "risk_threshold": threshold,
                        "training": info})
        ev.write_json(out / "metrics.json", metrics)
        log.info("%s fold %d test: c-index %s (Uno %s), td-AUC %s, IBS %s, log-rank p %s", method.name, data.fold,
                 metrics["c_index"], metrics["c_index_uno"], metrics["td_auc_mean"],
                 metrics["integrated_brier_score"], metrics["km_logrank_p"])
        return metrics

    def pooled_metrics(self, metrics_paths: list[Path]) -> dict[str, Any]:
        """Harrell's c-index over every fold's test patients, pairs within a fold (:meth:`pooled_statistic`)."""
        parts = [self.patient_records(p.parent, {})["survival"].assign(fold=k) for k, p in enumerate(metrics_paths)
                 if p.with_name("risks.tsv").exists()]
        if not parts:
            return {}
        return {"c_index_pooled": self.pooled_statistic("survival", pd.concat(parts))["c_index"]}

    def patient_records(self, fold_dir: Path, metrics: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """``survival``: the test patients of risks.tsv with follow-up (risk, time, event)."""
        path = fold_dir / "risks.tsv"
        if not path.exists():
            return {}
        table = pd.read_csv(path, sep="\t", dtype={"patient_id": str})
        test = table[table["role"] == "test"].dropna(subset=["time", "event", "risk"])
        return {"survival": test[["patient_id", "risk", "time", "event"]]}

    def pooled_statistic(self, kind: str, records: pd.DataFrame) -> dict[str, float | None]:
        """Harrell's c-index over the pairs of patients of the same fold, pooled over folds: each fold's risks
        come from its own model, on its own scale, so patients of different folds are never compared. None
        without a comparable pair."""
        if kind != "survival":
            return super().pooled_statistic(kind, records)
        from sksurv.exceptions import NoComparablePairException
        from sksurv.metrics import concordance_index_censored

        concordant = comparable = 0.0
        for _, part in records.groupby("fold"):
            if len(part) < 2 or part["event"].sum() == 0:
                continue
            try:
                _, conc, disc, tied_risk, _ = concordance_index_censored(
                    part["event"].astype(bool).to_numpy(), part["time"].to_numpy(float), part["risk"].to_numpy(float))
            except NoComparablePairException:  # e.g. a resample of one patient drawn twice
                continue
            concordant += conc + 0.5 * tied_risk
            comparable += conc + disc + tied_risk
        return {"c_index": concordant / comparable if comparable else None}


register_task(Survival())
