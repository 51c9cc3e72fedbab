"""Patient-level, label-stratified cross-validation folds, with an optional fixed test set.

Every patient of the sample sheet is assigned, whatever modalities it has (``has_slide`` and
``has_expression`` flag what it lacks, so each stage can drop what it cannot use without changing the
split). Assignment, deterministic given ``seed``:

1. test set (when ``test_fraction`` > 0): within each label, patients are shuffled and the first ones
   are taken, with per-label counts allocated by largest remainder so the total is
   ``round(test_fraction * n_patients)``; they have role ``test`` in every fold;
2. the rest are shuffled within each label and assigned one by one, patients with both a slide and
   expression first, then expression only, then slides only; each goes to the fold with the fewest
   patients of its label, then the fewest patients, then the fewest of its modality group. So each
   label's count differs by at most one between folds, fold sizes stay balanced, and every fold gets
   its share of the patients each stage can use. Fold ``k``'s patients are its ``val`` patients; all
   others are ``train``.

Labels: every patient needs one for stratification; when no patient has a label the split is simply
unstratified. Some patients labelled and others not is an error (which stratum would they join?).
A label with fewer patients than folds is allowed but logged: it is absent from some folds' validation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger("wsiomics.expression")

ROLES = ("train", "val", "test")
COLUMNS = ["patient_id", "fold", "role", "label", "has_slide", "has_expression"]


class SplitError(ValueError):
    """The patients cannot be split as configured; the message says why and what to change."""


@dataclass(frozen=True)
class SplitParams:
    """Field names are the ``splits:`` config keys."""

    n_folds: int = 5
    seed: int = 0
    test_fraction: float = 0.0
    stratify: bool = True


def _strata(patients: pd.DataFrame, stratify: bool) -> pd.Series:
    labels = patients["label"].fillna("").astype(str)
    if not stratify or (labels == "").all():
        if stratify:
            log.info("no patient has a label: folds are not stratified")
        return pd.Series("", index=patients.index)
    missing = labels[labels == ""].index.tolist()
    if missing:
        raise SplitError(f"{len(missing)} of {len(labels)} patients have no label ({', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}), so they cannot be stratified. Fix: fill in "
                         "their label in the sample sheet, or set splits.stratify: false.")
    return labels


def _test_counts(sizes: pd.Series, n_test: int) -> pd.Series:
    """Per-label test counts summing to n_test, proportional to label sizes (largest remainder)."""
    exact = sizes * n_test / sizes.sum()
    counts = np.floor(exact).astype(int)
    left = n_test - int(counts.sum())
    order = (exact - counts).sort_values(ascending=False, kind="stable").index[:left]
    counts[order] += 1
    return counts


def make_splits(patients: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """patients: index patient_id, columns label, has_slide, has_expression -> the long folds table."""
    n = len(patients)
    k = params.n_folds
    if k < 2:
        raise SplitError(f"splits.n_folds is {k}; cross-validation needs at least 2 folds.")
    if not 0 <= params.test_fraction < 1:
        raise SplitError(f"splits.test_fraction is {params.test_fraction}; give a value in [0, 1).")
    strata = _strata(patients, params.stratify)
    rng = np.random.default_rng(params.seed)
    # Shuffle within each stratum; strata in sorted order so the result does not depend on sheet order.
    groups = {s: rng.permutation(np.sort(strata.index[strata == s].to_numpy())) for s in sorted(strata.unique())}

    test: list[str] = []
    if params.test_fraction > 0:
        sizes = pd.Series({s: len(g) for s, g in groups.items()})
        n_test = int(round(params.test_fraction * n))
        per_label = _test_counts(sizes, n_test)
        for s, g in groups.items():
            test.extend(g[: per_label[s]])
            groups[s] = g[per_label[s]:]
    n_cv = sum(len(g) for g in groups.values())
    if n_cv < k:
        raise SplitError(f"{n_cv} patients left for cross-validation (of {n}, after the test set) but "
                         f"splits.n_folds is {k}. Fix: lower n_folds or test_fraction.")
    for s, g in groups.items():
        if len(g) < k and s != "":
            log.warning("label %r has %d patients, fewer than the %d folds: it is missing from the validation "
                        "set of %d folds", s, len(g), k, k - len(g))
    # Greedy balanced assignment: patients with both modalities first, then expression only, then slides only;
    # each goes to the fold with the fewest patients of its label (so every label stays within one across
    # folds), then the fewest patients overall, then the fewest of its modality group, then the lowest index.
    modality = (~patients["has_expression"].astype(bool)).astype(int) * 2 + (~patients["has_slide"].astype(bool))
    order = [(int(modality[pid]), rank, pid) for rank, g in enumerate(groups.values()) for pid in g]
    order.sort(key=lambda t: t[:2])  # stable: keeps the shuffled order within a label
    label_n = {(s, f): 0 for s in groups for f in range(k)}
    size = [0] * k
    mod_n = {(m, f): 0 for m in range(4) for f in range(k)}
    fold_of: dict[str, int] = {}
    for m, _, pid in order:
        s = strata[pid]
        f = min(range(k), key=lambda f: (label_n[s, f], size[f], mod_n[m, f], f))
        fold_of[pid] = f
        label_n[s, f] += 1
        size[f] += 1
        mod_n[m, f] += 1

    records = []
    held_out = set(test)
    for fold in range(k):
        for pid, row in patients.iterrows():
            role = "test" if pid in held_out else "val" if fold_of[pid] == fold else "train"
            records.append((pid, fold, role, str(row.get("label", "") or ""), bool(row["has_slide"]),
                            bool(row["has_expression"])))
    table = pd.DataFrame.from_records(records, columns=COLUMNS)
    check_splits(table)
    return table


def check_splits(table: pd.DataFrame) -> None:
    """Invariants every folds table must hold; raises SplitError naming the first violation."""
    if table.duplicated(["patient_id", "fold"]).any():
        row = table[table.duplicated(["patient_id", "fold"])].iloc[0]
        raise SplitError(f"patient {row.patient_id} has two roles in fold {row.fold}")
    if not table["role"].isin(ROLES).all():
        raise SplitError(f"unknown roles {set(table['role']) - set(ROLES)}")
    per_fold = table.groupby("fold")["patient_id"].apply(frozenset)
    if per_fold.nunique() != 1:
        raise SplitError("folds do not cover the same patients")
    val_sets = table[table["role"] == "val"].groupby("fold")["patient_id"].apply(set)
    seen: set[str] = set()
    for fold, val in val_sets.items():
        if val & seen:
            raise SplitError(f"patients {sorted(val & seen)[:5]} are validation patients in fold {fold} and "
                             "in an earlier fold")
        seen |= val
    test = table[table["role"] == "test"].groupby("fold")["patient_id"].apply(frozenset)
    if test.nunique() > 1:
        raise SplitError("the test set differs between folds")


def read_splits(path: str) -> pd.DataFrame:
    """Read a folds table written by :func:`make_splits` (patient IDs stay strings)."""
    table = pd.read_csv(path, sep="\t", dtype={"patient_id": str, "label": str}, keep_default_na=False)
    missing = set(COLUMNS) - set(table.columns)
    if missing:
        raise SplitError(f"{path}, line 1: missing columns {sorted(missing)}; was it written by the splits rule?")
    return table


def summary(table: pd.DataFrame) -> str:
    counts = table.groupby(["fold", "role"]).size().unstack(fill_value=0)
    return counts.to_string()
