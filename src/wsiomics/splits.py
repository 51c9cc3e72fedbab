"""Patient-level cross-validation folds with train / val / test roles and an optional fixed held-out set.

Folds follow from the patients, their labels and the seed only: nothing about slides or expression enters,
so adding RNA for a patient, re-tiling a slide or rebuilding the expression cohort changes no one's fold.
Every stage reads the same table (``results/splits/folds.tsv``) and takes what each patient has (features,
expression) from the data itself.

Assignment (scikit-learn, deterministic given ``seed``; patients sorted by ``patient_id`` first, so the order
of the sample sheet does not matter):

0. ``unlabelled``: when the labelled patients have at least two classes, those without a label (an empty
   ``label`` cell) are set aside: role ``unlabelled`` in every fold, never trained on in fine-tuning,
   validated on or tested in any fold, and the folds below are drawn over the labelled patients alone
   (exactly the folds those patients would get on their own, so withholding a label never moves anyone
   else's fold). Pretraining may use them (``train.pretrain.pool: all``). A cohort without two classes (no
   label, or one) is a label-free cohort for the workflow and keeps every patient in the folds (strata:
   the label, empty or not);
1. ``heldout`` (only when ``test_fraction`` > 0): a label-stratified fixed set of
   ``round(test_fraction * n)`` patients (``train_test_split``), role ``heldout`` in every fold and never
   trained on, validated on or tested in any fold; later stages report it on its own;
2. the other patients go to ``n_folds`` folds with ``StratifiedKFold(shuffle=True, random_state=seed)``
   (``KFold`` when there are no labels or ``stratify`` is false): in fold ``k`` the fold's own patients have
   role ``test``, so each patient is ``test`` in exactly one fold;
3. per fold, ``val`` is a label-stratified early-stopping subset of the remaining patients
   (``val_fraction`` of them, at least one; ``train_test_split``), and ``train`` is the rest. When a label
   is too small to be spread (a class with a single patient, or fewer ``val`` places than labels), that
   subset is drawn unstratified and the log says so.

Survival cohorts (an ``event`` column in the patient table) are stratified by label and event together
(``label|event``), or by event alone when no patient has a label.

Labels: a label with fewer patients than folds is allowed but logged: some folds then test none of it; when
every label is that small (tiny demo cohorts) the folds are drawn unstratified, also logged.

Command line (rule ``splits``): ``python -m wsiomics.splits --patients patients.tsv --out folds.tsv [options]``,
where ``patients.tsv`` has columns ``patient_id`` and ``label`` (the workflow writes it from the sample
sheet). Imports only numpy, pandas and scikit-learn, so image-only stages read folds without the
expression libraries.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("wsiomics.splits")

#: train: fitted on; val: early stopping; test: the fold's held-out patients (each patient in one fold);
#: heldout: the fixed test set, the same in every fold and in none of the other roles; unlabelled: a patient
#: without a label in a cohort where others have one, the same in every fold (pretraining only).
ROLES = ("train", "val", "test", "heldout", "unlabelled")
COLUMNS = ["patient_id", "fold", "role", "label"]


class SplitError(ValueError):
    """The patients cannot be split as configured, or a folds table is broken; the message says what to change."""


@dataclass(frozen=True)
class SplitParams:
    """Field names are the ``splits:`` config keys; ``help`` is what ``--help`` shows."""

    n_folds: int = field(default=5, metadata={"help": "cross-validation folds; each patient is test in one"})
    seed: int = field(default=0, metadata={"help": "seed of every shuffle: same seed + same patients = same folds"})
    val_fraction: float = field(default=0.15, metadata={
        "help": "share of each fold's non-test patients used for early stopping (val), at least one"})
    test_fraction: float = field(default=0.0, metadata={
        "help": "share of patients held out of every fold as a fixed test set (role heldout); 0 = none"})
    stratify: bool = field(default=True, metadata={"help": "stratify folds, val and heldout by label"})


def _labels(patients: pd.DataFrame, stratify: bool) -> np.ndarray | None:
    """Per-patient strata, or None for unstratified splits: the label, combined with the survival event
    (``label|event``) when the table has an ``event`` column with any value (survival cohorts)."""
    labels = patients["label"].fillna("").astype(str).to_numpy()
    if not stratify:
        return None
    events = patients["event"].fillna("").astype(str).to_numpy() if "event" in patients else None
    if events is not None and (events == "").all():
        events = None
    if (labels == "").all():
        if events is not None:
            log.info("no patient has a label: folds are stratified by survival event")
            return np.array([f"event{e}" for e in events])
        log.info("no patient has a label: folds are not stratified")
        return None
    if events is not None:
        log.info("folds are stratified by label and survival event")
        return np.array([f"{label}|event{e}" for label, e in zip(labels, events, strict=True)])
    return labels


def _split_off(ids: np.ndarray, labels: np.ndarray | None, n: int, seed: int,
               what: str) -> tuple[np.ndarray, np.ndarray]:
    """(rest, chosen): ``n`` of ``ids`` chosen label-stratified when the labels allow it, else unstratified."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(ids))
    if labels is not None:
        try:
            rest, chosen = train_test_split(idx, test_size=n, stratify=labels, random_state=seed)
            return ids[np.sort(rest)], ids[np.sort(chosen)]
        except ValueError as e:  # a class of one patient, or fewer places than classes
            log.warning("%s: %d of %d patients drawn unstratified (%s)", what, n, len(ids), e)
    rest, chosen = train_test_split(idx, test_size=n, random_state=seed)
    return ids[np.sort(rest)], ids[np.sort(chosen)]


def _fold_seed(seed: int, fold: int) -> int:
    """Independent, reproducible stream per fold for the val draw."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def make_splits(patients: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """patients: one row per patient, ``patient_id`` as index or column, a ``label`` column -> the folds table.

    The result has one row per patient and fold (columns :data:`COLUMNS`), sorted by fold then patient_id.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if "patient_id" in patients.columns:
        pts = patients.reset_index(drop=True)
    else:
        pts = patients.rename_axis("patient_id").reset_index()
    if "label" not in pts.columns:
        pts = pts.assign(label="")
    pts = pts.assign(patient_id=pts["patient_id"].astype(str), label=pts["label"].fillna("").astype(str))
    if pts["patient_id"].duplicated().any():
        raise SplitError(f"patients {sorted(set(pts.loc[pts.patient_id.duplicated(), 'patient_id']))[:5]} appear "
                         "twice in the patient table; give one row per patient")
    pts = pts.sort_values("patient_id", kind="stable").set_index("patient_id")
    everyone = pts
    classes = set(pts["label"]) - {""}
    unlabelled = pts.index[pts["label"] == ""] if len(classes) >= 2 else pts.index[:0]
    if len(unlabelled):
        log.info("%d of %d patients have no label: role unlabelled in every fold (pretraining only); the folds "
                 "are drawn over the %d labelled patients", len(unlabelled), len(pts), len(pts) - len(unlabelled))
        pts = pts.drop(index=unlabelled)
    k, n = params.n_folds, len(pts)
    if k < 2:
        raise SplitError(f"splits.n_folds is {k}; cross-validation needs at least 2 folds.")
    if not 0 < params.val_fraction < 1:
        raise SplitError(f"splits.val_fraction is {params.val_fraction}; give a value in (0, 1).")
    if not 0 <= params.test_fraction < 1:
        raise SplitError(f"splits.test_fraction is {params.test_fraction}; give a value in [0, 1).")
    labels = _labels(pts, params.stratify)
    ids = pts.index.to_numpy(dtype=object)

    heldout = np.array([], dtype=object)
    if params.test_fraction > 0:
        n_held = max(1, int(round(params.test_fraction * n)))
        if n - n_held < k:
            raise SplitError(f"{n} patients, {n_held} of them held out (test_fraction {params.test_fraction}), "
                             f"leave {n - n_held} for {k} folds. Fix: lower splits.n_folds or test_fraction.")
        strata = None if labels is None else pd.Series(labels, index=ids)
        ids, heldout = _split_off(ids, labels, n_held, params.seed, "held-out test set")
        labels = None if strata is None else strata.loc[ids].to_numpy()
    largest_test = -(-len(ids) // k)
    if len(ids) < k or len(ids) - largest_test < 2:  # every fold: test patients, and a train and a val patient
        raise SplitError(f"{len(ids)} {'labelled ' if len(unlabelled) else ''}patients for cross-validation but "
                         f"splits.n_folds is {k}: each fold needs at least one test, one val and one train patient. "
                         "Fix: lower n_folds (or test_fraction), or label more patients.")

    if labels is not None and (pd.Series(labels).value_counts() < k).all():
        log.warning("every label has fewer patients than the %d folds (%s): folds are not stratified", k,
                    pd.Series(labels).value_counts().to_dict())
        labels_for_folds = None
    else:
        labels_for_folds = labels
    if labels_for_folds is not None:
        counts = pd.Series(labels).value_counts()
        for label, c in counts[counts < k].items():
            log.warning("label %r has %d patients, fewer than the %d folds: %d folds test none of it",
                        label, c, k, k - c)
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=params.seed)
        with warnings.catch_warnings():  # its "least populated class" warning is the log line above
            warnings.simplefilter("ignore", UserWarning)
            folds = list(splitter.split(ids, labels))
    else:
        folds = list(KFold(n_splits=k, shuffle=True, random_state=params.seed).split(ids))

    role_of: list[dict[str, str]] = []
    for fold, (other_idx, test_idx) in enumerate(folds):
        other = ids[other_idx]
        n_val = max(1, int(round(params.val_fraction * len(other))))
        other_labels = None if labels is None else labels[other_idx]
        train, val = _split_off(other, other_labels, n_val, _fold_seed(params.seed, fold), f"fold {fold} val")
        roles = {p: "unlabelled" for p in unlabelled}
        roles.update({p: "heldout" for p in heldout})
        roles.update({p: "test" for p in ids[test_idx]})
        roles.update({p: "val" for p in val})
        roles.update({p: "train" for p in train})
        role_of.append(roles)

    records = [(pid, fold, roles[pid], everyone.at[pid, "label"]) for fold, roles in enumerate(role_of)
               for pid in everyone.index]
    table = pd.DataFrame.from_records(records, columns=COLUMNS)
    check_splits(table)
    return table


def check_splits(table: pd.DataFrame, where: str = "folds table") -> None:
    """Invariants of every folds table; raises SplitError naming the first violation.

    Each fold lists the same patients, once each, with one of :data:`ROLES`; train, val and test are
    disjoint within a fold (one role per patient and fold), and each fold has all three; every patient
    that is not ``heldout`` or ``unlabelled`` is ``test`` in exactly one fold; the ``heldout`` and the
    ``unlabelled`` sets are identical in every fold, and an ``unlabelled`` patient has no label.
    """
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise SplitError(f"{where}: missing columns {missing}")
    bad = set(table["role"]) - set(ROLES)
    if bad:
        raise SplitError(f"{where}: unknown roles {sorted(bad)} (allowed: {', '.join(ROLES)})")
    dup = table.duplicated(["patient_id", "fold"])
    if dup.any():
        row = table[dup].iloc[0]
        raise SplitError(f"{where}: patient {row.patient_id} has two roles in fold {row.fold}")
    per_fold = table.groupby("fold")["patient_id"].apply(frozenset)
    if per_fold.nunique() != 1:
        raise SplitError(f"{where}: the folds do not list the same patients")
    for fold, rows in table.groupby("fold"):
        for role in ("train", "val", "test"):
            if not (rows["role"] == role).any():
                raise SplitError(f"{where}: fold {fold} has no {role} patient")
    fixed = {}
    for role in ("heldout", "unlabelled"):
        held = table[table["role"] == role].groupby("fold")["patient_id"].apply(frozenset)
        held_sets = set(held.reindex(per_fold.index).map(lambda s: s if isinstance(s, frozenset) else frozenset()))
        if len(held_sets) > 1:
            raise SplitError(f"{where}: the {role} set differs between folds")
        fixed[role] = next(iter(held_sets))
    labelled = table[(table["role"] == "unlabelled") & (table["label"].fillna("").astype(str) != "")]
    if len(labelled):
        raise SplitError(f"{where}: patient {labelled.iloc[0].patient_id} has role unlabelled but label "
                         f"{labelled.iloc[0].label!r}")
    tested = table[table["role"] == "test"]["patient_id"].value_counts()
    twice = tested[tested > 1]
    if len(twice):
        raise SplitError(f"{where}: patients {sorted(twice.index)[:5]} are test patients in more than one fold")
    never = sorted(set(table["patient_id"]) - set(tested.index) - fixed["heldout"] - fixed["unlabelled"])
    if never:
        raise SplitError(f"{where}: patients {never[:5]} are test patients in no fold (and not heldout or "
                         "unlabelled)")
    if table.groupby("patient_id")["label"].nunique().gt(1).any():
        raise SplitError(f"{where}: a patient has different labels in different folds")


def read_splits(path: str | Path) -> pd.DataFrame:
    """Read and check a folds table written by the splits rule (patient IDs and labels stay strings)."""
    try:
        table = pd.read_csv(path, sep="\t", dtype={"patient_id": str, "label": str, "role": str},
                            keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SplitError(f"{path}: cannot read the folds table ({e}). Fix: re-run the splits rule.") from None
    if list(table.columns) != COLUMNS:
        raise SplitError(f"{path}, line 1: columns {list(table.columns)}, expected {COLUMNS} (a folds table of an "
                         "older wsiomics?). Fix: delete it and re-run the splits rule.")
    check_splits(table, where=str(path))
    return table


def read_patients(path: str | Path) -> pd.DataFrame:
    """The patient table the workflow writes from the sample sheet: index patient_id, column label (and event,
    for a cohort with follow-up)."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = {"patient_id", "label"} - set(table.columns)
    if missing:
        raise SplitError(f"{path}, line 1: missing columns {sorted(missing)} (expected patient_id, label)")
    return table[["patient_id", "label", *(["event"] if "event" in table else [])]].set_index("patient_id")


def summary(table: pd.DataFrame) -> str:
    """Patients per fold and role, for the log."""
    counts = table.groupby(["fold", "role"]).size().unstack(fill_value=0)
    return counts.reindex(columns=[r for r in ROLES if r in counts.columns]).to_string()


def main(argv: list[str] | None = None) -> int:
    from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args
    from wsiomics.io import write_text

    parser = argparse.ArgumentParser(prog="python -m wsiomics.splits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", required=True, type=Path, help="TSV with patient_id and label, one row each")
    parser.add_argument("--out", required=True, type=Path, help="folds table to write (folds.tsv)")
    add_dataclass_options(parser, SplitParams)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        table = make_splits(read_patients(args.patients), dataclass_from_args(SplitParams, args))
    except SplitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_text(args.out, table.to_csv(sep="\t", index=False))
    log.info("folds (patients per role):\n%s", summary(table))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
