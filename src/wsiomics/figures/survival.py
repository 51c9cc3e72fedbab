"""Survival: Kaplan-Meier curves of every fold's test patients pooled, split into high and low risk."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from wsiomics.figures import register
from wsiomics.figures.params import FigureParams
from wsiomics.figures.sources import Results

log = logging.getLogger("wsiomics.figures")

FIT_ROLES = ("train", "val")  # the patients each fold's risk threshold is taken from


def risk_groups(results: Results, method: str) -> pd.DataFrame | None:
    """The test patients of every fold with follow-up: time, event and ``high`` (risk above the median risk of
    that fold's training patients, as each fold's own km.png), from each fold's risks.tsv."""
    parts = []
    for fold, d in results.fold_dirs(method).items():
        path = d / "risks.tsv"
        if not path.is_file():
            continue
        table = pd.read_csv(path, sep="\t", dtype={"patient_id": str}).dropna(subset=["time", "event", "risk"])
        fit, test = table[table["role"].isin(FIT_ROLES)], table[table["role"] == "test"]
        if fit.empty or test.empty:
            continue
        parts.append(test.assign(fold=fold, high=test["risk"] > fit["risk"].median()))
    return pd.concat(parts, ignore_index=True) if parts else None


@register("km", category="Survival", subcategory="Kaplan-Meier curves", pattern="{method}.png")
def draw_km(results: Results, out: Path, params: FigureParams) -> list[Path]:
    written = []
    for method in results.methods:
        table = risk_groups(results, method)
        if table is None:
            continue  # not a survival method: nothing to say
        from lifelines import KaplanMeierFitter
        from lifelines.statistics import logrank_test

        from wsiomics.figures import style

        time, event, high = table["time"].to_numpy(float), table["event"].to_numpy(int), table["high"].to_numpy(bool)
        with style.figure(size=(4.2, 3.2)) as (fig, axes):
            ax = axes[0, 0]
            for (name, mask), colour in zip((("low risk", ~high), ("high risk", high)), style.colours(2), strict=True):
                if mask.any():
                    KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})").fit(time[mask], event[mask]) \
                        .plot_survival_function(ax=ax, ci_show=True, color=colour, show_censors=True)
            title = f"{method}: {len(table)} test patients, {table['fold'].nunique()} folds pooled"
            if high.any() and (~high).any():
                p = float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value)
                title += f"\nlog-rank p = {p:.3g}"
            ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02), title=title)
            style.legend_outside(ax)
            written += style.save(fig, out / f"{method}.png", svg=True)
    if not written:
        log.info("km: no method wrote risks.tsv; no Kaplan-Meier figure")
    return written


