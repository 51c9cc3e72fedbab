"""Folds (wsiomics.splits): roles, stratification, invariants, the file contract, and fold stability in the workflow.

The unit tests take well under a second; the workflow test (marked slow) runs the splits and expression rules
three times on a small cohort and checks that folds.tsv is neither changed nor rewritten by edits that do not
concern patients or labels.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.model_selection import StratifiedKFold

from wsiomics.splits import (
    COLUMNS,
    ROLES,
    SplitError,
    SplitParams,
    check_splits,
    main,
    make_splits,
    read_splits,
)

REPO = Path(__file__).resolve().parents[1]


def patients(n: int, labels: list[str], prefix: str = "P") -> pd.DataFrame:
    return pd.DataFrame({"label": [labels[i % len(labels)] for i in range(n)]},
                        index=pd.Index([f"{prefix}{i:03d}" for i in range(n)], name="patient_id"))


def roles(table: pd.DataFrame) -> pd.DataFrame:
    """patient x fold -> role."""
    return table.pivot(index="patient_id", columns="fold", values="role")


# ------------------------------------------------------------------------------------------------ roles


def test_every_patient_is_test_in_exactly_one_fold_and_roles_are_disjoint():
    pts = patients(53, ["a", "b", "b", "c"])
    table = make_splits(pts, SplitParams(n_folds=5, seed=1))
    check_splits(table)
    assert list(table.columns) == COLUMNS and set(table.role) == {"train", "val", "test"}
    assert len(table) == 53 * 5 and not table.duplicated(["patient_id", "fold"]).any()  # one role per fold
    r = roles(table)
    assert (r == "test").sum(axis=1).eq(1).all()  # each patient tested once
    for fold in range(5):
        col = r[fold]
        assert {"train", "val", "test"} == set(col)
        # the test patients of a fold are exactly those the other folds train or validate on
        others = r.drop(columns=fold)
        assert (others.loc[col == "test"] != "test").all().all()


def test_folds_are_sklearn_stratified_kfold_on_sorted_patients():
    pts = patients(40, ["x", "y", "z", "z"])
    table = make_splits(pts.sample(frac=1, random_state=5), SplitParams(n_folds=4, seed=7))
    ids = np.array(sorted(pts.index))
    expected = StratifiedKFold(n_splits=4, shuffle=True, random_state=7).split(ids, pts.loc[ids, "label"])
    for fold, (_, test_idx) in enumerate(expected):
        got = table[(table.fold == fold) & (table.role == "test")].patient_id
        assert sorted(got) == sorted(ids[test_idx])


def test_test_and_val_are_label_stratified_and_val_has_at_least_one_patient():
    pts = patients(200, ["a", "b", "b", "c", "c", "c"])
    table = make_splits(pts, SplitParams(n_folds=5, val_fraction=0.15, seed=3))
    share = pts.label.value_counts(normalize=True)
    for fold in range(5):
        rows = table[table.fold == fold]
        test = rows[rows.role == "test"].label.value_counts()
        val = rows[rows.role == "val"].label.value_counts()
        assert (test - share * test.sum()).abs().max() <= 1  # StratifiedKFold: within one patient per label
        assert val.sum() == round(0.15 * 160) and (val - share * val.sum()).abs().max() <= 1
    tiny = make_splits(patients(10, ["a", "b"]), SplitParams(n_folds=2, val_fraction=0.01))
    assert tiny.groupby("fold").role.apply(lambda r: (r == "val").sum()).eq(1).all()


def test_too_small_labels_fall_back_to_unstratified_draws_and_say_so(caplog):
    pts = patients(12, ["a", "b", "c", "d"])  # 8 non-test patients per fold, 1 val place, 4 labels
    with caplog.at_level(logging.WARNING, logger="wsiomics.splits"):
        table = make_splits(pts, SplitParams(n_folds=3))
    check_splits(table)
    assert "fold 0 val: 1 of 8 patients drawn unstratified" in caplog.text
    assert table.groupby("fold").role.apply(lambda r: (r == "val").sum()).eq(1).all()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wsiomics.splits"):
        check_splits(make_splits(patients(8, list("abcd")), SplitParams(n_folds=3)))  # 2 per label, 3 folds
    assert "every label has fewer patients than the 3 folds" in caplog.text


def test_fixed_heldout_set_is_the_same_in_every_fold_and_in_no_other_role():
    pts = patients(60, ["a", "b", "c"])
    table = make_splits(pts, SplitParams(n_folds=5, test_fraction=0.2, seed=2))
    r = roles(table)
    held = r.index[(r == "heldout").any(axis=1)]
    assert len(held) == 12 and (r.loc[held] == "heldout").all().all()
    assert pts.loc[held].label.value_counts().eq(4).all()  # stratified
    rest = r.drop(index=held)
    assert (rest == "test").sum(axis=1).eq(1).all() and not (rest == "heldout").any().any()


def test_folds_do_not_depend_on_sheet_order_or_other_columns_but_on_the_seed():
    pts = patients(30, ["a", "b"])
    table = make_splits(pts, SplitParams(n_folds=3, test_fraction=0.2))
    extra = pts.assign(has_expression=[i % 3 == 0 for i in range(30)], n_slides=2)  # ignored
    again = make_splits(extra.sample(frac=1, random_state=1), SplitParams(n_folds=3, test_fraction=0.2))
    pd.testing.assert_frame_equal(table, again)
    column = pts.reset_index()  # patient_id as a column works too
    pd.testing.assert_frame_equal(table, make_splits(column, SplitParams(n_folds=3, test_fraction=0.2)))
    assert not table.equals(make_splits(pts, SplitParams(n_folds=3, test_fraction=0.2, seed=1)))


# ------------------------------------------------------------------------------------------------ errors


def test_label_and_size_errors_say_what_to_change():
    pts = patients(10, ["a", "b"])
    pts.loc[["P001", "P002", "P003", "P005", "P007"], "label"] = ""
    with pytest.raises(SplitError, match="5 labelled patients for cross-validation but splits.n_folds is 6.*label "
                                         "more patients"):
        make_splits(pts, SplitParams(n_folds=6))
    pts["label"] = ""
    assert len(make_splits(pts, SplitParams(n_folds=2))) == 20  # no labels at all: unstratified
    with pytest.raises(SplitError, match="n_folds is 11.*lower n_folds"):
        make_splits(pts, SplitParams(n_folds=11))
    with pytest.raises(SplitError, match="n_folds is 2: each fold needs"):
        make_splits(patients(2, ["a"]), SplitParams(n_folds=2))
    with pytest.raises(SplitError, match="leave 2 for 3 folds"):
        make_splits(patients(3, ["a"]), SplitParams(n_folds=3, test_fraction=0.3))
    assert len(make_splits(patients(3, ["a"]), SplitParams(n_folds=3))) == 9  # 1 test, 1 val, 1 train per fold
    with pytest.raises(SplitError, match="val_fraction"):
        make_splits(patients(8, ["a"]), SplitParams(n_folds=2, val_fraction=0))


def test_check_splits_catches_each_broken_invariant():
    good = make_splits(patients(20, ["a", "b"]), SplitParams(n_folds=2, test_fraction=0.2))
    check_splits(good)

    first_test = good[(good.fold == 0) & (good.role == "test")].index[0]
    pid = good.at[first_test, "patient_id"]
    same_in_fold1 = good[(good.fold == 1) & (good.patient_id == pid)].index[0]
    held = good[(good.fold == 0) & (good.role == "heldout")].index[0]
    val0 = good[(good.fold == 0) & (good.role == "val")].index
    train0 = good[(good.fold == 0) & (good.role == "train")].index[0]

    def set_role(rows, role):
        t = good.copy()
        t.loc[rows, "role"] = role
        return t

    cases = {
        "more than one fold": set_role([same_in_fold1], "test"),
        "test patients in no fold": set_role([first_test], "train"),
        "heldout set differs": set_role([held], "train"),
        "two roles in fold 0": pd.concat([good, good.loc[[first_test]].assign(role="train")], ignore_index=True),
        "unknown roles": set_role(val0, "validation"),
        "fold 0 has no val patient": set_role(val0, "train"),
        "do not list the same patients": good.drop(index=first_test),
        "different labels": good.assign(label=good.label.where(good.index != first_test, "zzz")),
        "unlabelled set differs": set_role([train0], "unlabelled").assign(
            label=good.label.where(good.patient_id != good.at[train0, "patient_id"], "")),
        "has role unlabelled but label": set_role(good.index[good.patient_id == pid], "unlabelled"),
    }
    for message, table in cases.items():
        with pytest.raises(SplitError, match=message):
            check_splits(table)


def test_unlabelled_patients_are_unlabelled_in_every_fold_and_move_no_labelled_patient():
    """A patient without a label (others have one) is role unlabelled in every fold, whatever stratify and
    test_fraction; the labelled patients get exactly the folds they get without the unlabelled ones."""
    pts = patients(30, ["a", "b", "c"])
    withheld = ["P002", "P007", "P011", "P012", "P020", "P029"]
    pts.loc[withheld, "label"] = ""
    for params in (SplitParams(n_folds=3, seed=2), SplitParams(n_folds=3, seed=2, test_fraction=0.2),
                   SplitParams(n_folds=3, seed=2, stratify=False)):
        table = make_splits(pts, params)
        check_splits(table)
        unlabelled = table[table.patient_id.isin(withheld)]
        assert (unlabelled.role == "unlabelled").all() and len(unlabelled) == 3 * len(withheld)
        assert (table.role == "unlabelled").sum() == len(unlabelled)
        alone = make_splits(pts.drop(index=withheld), params)
        pd.testing.assert_frame_equal(table[~table.patient_id.isin(withheld)].reset_index(drop=True), alone)
    one_class = pts.assign(label=pts.label.where(pts.label == "", "a"))  # label-free for the workflow
    assert "unlabelled" not in set(make_splits(one_class, SplitParams(n_folds=3)).role)
    survival = pts.assign(event=["1", "0"] * 15)
    table = make_splits(survival, SplitParams(n_folds=3))
    assert set(table.role[table.patient_id.isin(withheld)]) == {"unlabelled"}


# ------------------------------------------------------------------------------------------------ files


def test_cli_writes_the_contract_and_read_splits_checks_it(tmp_path):
    pts = patients(12, ["a", "b"], prefix="TCGA-")
    pts.reset_index().to_csv(tmp_path / "patients.tsv", sep="\t", index=False)
    out = tmp_path / "splits" / "folds.tsv"
    assert main(["--patients", str(tmp_path / "patients.tsv"), "--out", str(out), "--n-folds", "3", "--seed", "4",
                 "--val-fraction", "0.2", "--no-stratify"]) == 0
    table = read_splits(out)
    pd.testing.assert_frame_equal(table, make_splits(pts, SplitParams(n_folds=3, seed=4, val_fraction=0.2,
                                                                       stratify=False)))
    assert out.read_text().splitlines()[0].split("\t") == COLUMNS
    old = table.assign(has_slide=True, has_expression=True)  # a folds table of the previous release
    old.to_csv(tmp_path / "old.tsv", sep="\t", index=False)
    with pytest.raises(SplitError, match=r"old\.tsv, line 1.*delete it and re-run the splits rule"):
        read_splits(tmp_path / "old.tsv")
    table.assign(role=table.role.replace("test", "val")).to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(SplitError, match=r"bad\.tsv: .*test patient"):
        read_splits(tmp_path / "bad.tsv")
    assert "heldout" in ROLES and main(["--patients", str(tmp_path / "patients.tsv"), "--out", str(out),
                                        "--n-folds", "13"]) == 1


def test_reading_folds_needs_no_expression_libraries():
    code = ("import sys, wsiomics.splits; heavy = {'anndata', 'scanpy', 'zarr', 'torch', 'cv2', 'openslide'}; "
            "sys.exit(sorted(heavy & set(sys.modules)) or 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_config_schema_and_code_defaults_agree():
    config = yaml.safe_load((REPO / "config.yaml").read_text())["splits"]
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]["splits"]["properties"]
    code = asdict(SplitParams())
    assert set(props) == set(code) == set(config)
    for key, value in code.items():
        assert props[key]["default"] == value, key
    assert all(f.metadata.get("help") for f in fields(SplitParams))


# ------------------------------------------------------------------------------------------------ workflow


def write_cohort(folder: Path, n: int = 8) -> Path:
    """n patients with a placeholder slide each (only expression rules run) and GDC counts for all but the last."""
    from wsiomics.synth.expression import gene_model, sample_counts, write_gdc_counts

    model = gene_model(60, seed=1)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pid = f"TCGA-ST-{i:04d}"
        (folder / f"{pid}.svs").write_bytes(b"")
        expression = write_gdc_counts(folder / f"{pid}.tsv", model, sample_counts(model, i % 2, rng), rng).name
        rows.append({"patient_id": pid, "slide_id": f"{pid}-DX1", "slide_path": f"{pid}.svs", "label": f"c{i % 2}",
                     "mpp": "", "expression_path": expression if i < n - 1 else ""})
    pd.DataFrame(rows).to_csv(folder / "samples.tsv", sep="\t", index=False)
    return folder / "samples.tsv"


@pytest.mark.slow
@pytest.mark.integration
def test_folds_are_not_rewritten_by_new_expression_or_an_unrelated_mpp(tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    sheet = write_cohort(cohort)
    work = tmp_path / "work"
    targets = ["results/splits/folds.tsv", "results/expression/cohort.zarr", "results/expression/fold0.zarr"]
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "--cores", "2",
           "--config", f"samples={sheet}", "splits={n_folds: 2}", "expression={n_top_genes: 20}",
           "--directory", str(work), *targets]

    def snakemake(*extra):
        proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout + proc.stderr

    def planned() -> set[str]:
        """Rules of the jobs a dry run would start (its 'Job stats' table)."""
        out = snakemake("-n")
        if "Nothing to be done" in out:
            return set()
        table = out.split("Job stats:")[1].split("total")[0].splitlines()[3:]
        return {line.split()[0] for line in table if line.strip()}

    snakemake()
    folds = work / "results" / "splits" / "folds.tsv"
    cohort_store = work / "results" / "expression" / "cohort.zarr" / "zarr.json"
    text, mtime, cohort_mtime = folds.read_bytes(), os.stat(folds).st_mtime_ns, os.stat(cohort_store).st_mtime_ns
    check_splits(read_splits(folds))

    rows = pd.read_csv(sheet, sep="\t", keep_default_na=False)
    rows.loc[3, "mpp"] = "0.5"  # one slide's resolution: its tiles change, nothing patient-level does
    rows.to_csv(sheet, sep="\t", index=False)
    assert planned() == set()

    missing = rows.index[rows.expression_path == ""][0]
    (cohort / "late.tsv").write_bytes((cohort / rows.loc[0, "expression_path"]).read_bytes())
    rows.loc[missing, "expression_path"] = "late.tsv"  # RNA arrives for the last patient
    rows.to_csv(sheet, sep="\t", index=False)
    assert planned() == {"expression_cohort", "normalize_expression"}
    snakemake()
    assert os.stat(cohort_store).st_mtime_ns != cohort_mtime  # the cohort was rebuilt ...
    assert folds.read_bytes() == text and os.stat(folds).st_mtime_ns == mtime  # ... the folds were not touched

    rows.loc[0, "label"] = "c1"  # a label change is a patient-level change: the folds are redone
    rows.to_csv(sheet, sep="\t", index=False)
    assert planned() == {"expression_cohort", "splits", "normalize_expression"}


def test_survival_cohorts_are_stratified_by_event_and_label():
    """Each fold tests a share of the events close to the cohort's; the patient table without an event
    column (a cohort without follow-up) gives the folds it always gave."""
    rng = np.random.default_rng(0)
    n = 60
    labels = np.array(["a", "b"] * (n // 2))
    events = (np.arange(n) % 5 < 2).astype(int).astype(str)  # 40% events, spread over both labels
    pts = pd.DataFrame({"patient_id": [f"P{i:02d}" for i in rng.permutation(n)], "label": labels, "event": events})
    table = make_splits(pts, SplitParams(n_folds=4, seed=3))
    event_of = pts.set_index("patient_id")["event"]
    tested = table[table.role == "test"]
    shares = tested.groupby("fold")["patient_id"].apply(lambda ids: (event_of[ids] == "1").mean())
    assert shares.between(0.33, 0.47).all(), shares
    label_only = make_splits(pts.drop(columns="event"), SplitParams(n_folds=4, seed=3))
    pd.testing.assert_frame_equal(label_only, make_splits(pts.assign(event=""), SplitParams(n_folds=4, seed=3)))
    unlabelled = make_splits(pts.assign(label=""), SplitParams(n_folds=4, seed=3))
    shares = unlabelled[unlabelled.role == "test"].groupby("fold")["patient_id"].apply(
        lambda ids: (event_of[ids] == "1").mean())
    assert shares.between(0.33, 0.47).all(), shares
