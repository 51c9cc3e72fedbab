"""Tests for the sample-sheet contract (wsiomics.samples) and its Snakemake schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from wsiomics.samples import (
    ALLOWED_COLUMNS,
    SampleSheetError,
    imported,
    load_sample_sheet,
    main,
    patients,
    slide_mpp_override,
    slides,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "samples.schema.yaml"

HEADER = ["patient_id", "slide_id", "slide_path", "label", "mpp", "annotation_path", "expression_path"]


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_sheet(path: Path, rows: list[list[str]], header: list[str] | None = None, sep: str = "\t") -> Path:
    lines = [sep.join(header or HEADER)] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A project folder with dummy slides, an annotation and expression files (relative to it)."""
    for name in ("s1a.svs", "s1b.svs", "s2.svs", "s4.svs"):
        touch(tmp_path / "slides" / name)
    touch(tmp_path / "ann" / "s1a.geojson")
    for name in ("p1.tsv", "p3.tsv", "p4.tsv"):
        touch(tmp_path / "expr" / name)
    return tmp_path


VALID_ROWS = [
    # P1: two slides, expression repeated on both rows, one annotation, an mpp override
    ["P1", "S1a", "slides/s1a.svs", "tumor", "0.25", "ann/s1a.geojson", "expr/p1.tsv"],
    ["P1", "S1b", "slides/s1b.svs", "", "", "", "./expr/p1.tsv"],
    # P2: slide only, no expression
    ["P2", "S2", "slides/s2.svs", "normal", "", "", ""],
    # P3: expression-only
    ["P3", "", "", "tumor", "", "", "expr/p3.tsv"],
    # P4: slide row plus a separate expression-only row
    ["P4", "S4", "slides/s4.svs", "", "", "", ""],
    ["P4", "", "", "", "", "", "expr/p4.tsv"],
]


def errors_of(sheet: Path) -> str:
    with pytest.raises(SampleSheetError) as info:
        load_sample_sheet(sheet)
    return str(info.value)


# --- valid sheets -------------------------------------------------------------------------------


def test_valid_sheet(data_dir: Path) -> None:
    df = load_sample_sheet(write_sheet(data_dir / "samples.tsv", VALID_ROWS))

    assert list(df.columns) == [*ALLOWED_COLUMNS, "row"]
    assert list(df["row"]) == [2, 3, 4, 5, 6, 7]
    assert df.loc[0, "slide_path"] == str(data_dir / "slides" / "s1a.svs")
    assert df.loc[1, "expression_path"] == str(data_dir / "expr" / "p1.tsv")  # "./" normalised away
    assert df.loc[3, "slide_path"] == ""  # empty stays empty
    assert all(isinstance(v, str) for v in df["mpp"])

    sl = slides(df)
    assert list(sl.index) == ["S1a", "S1b", "S2", "S4"]
    assert sl.index.name == "slide_id"
    assert sl.loc["S2", "slide_path"] == str(data_dir / "slides" / "s2.svs")
    assert slide_mpp_override(sl.loc["S1a"]) == 0.25
    assert slide_mpp_override(sl.loc["S1b"]) is None

    pt = patients(df)
    assert list(pt.index) == ["P1", "P2", "P3", "P4"]
    assert pt.loc["P1", "n_slides"] == 2
    assert pt.loc["P1", "label"] == "tumor"
    assert pt.loc["P1", "expression_path"] == str(data_dir / "expr" / "p1.tsv")
    assert bool(pt.loc["P2", "has_slide"]) and not bool(pt.loc["P2", "has_expression"])
    assert pt.loc["P3", "n_slides"] == 0 and not bool(pt.loc["P3", "has_slide"])
    assert bool(pt.loc["P3", "has_expression"])
    assert bool(pt.loc["P4", "has_slide"]) and bool(pt.loc["P4", "has_expression"])
    assert pt.loc["P4", "expression_path"] == str(data_dir / "expr" / "p4.tsv")


def test_relative_paths_resolve_against_sheet_folder_not_cwd(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sheet = write_sheet(data_dir / "samples.tsv", VALID_ROWS)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)

    df = load_sample_sheet(os.path.relpath(sheet, elsewhere))

    assert df.loc[0, "slide_path"] == str(data_dir / "slides" / "s1a.svs")
    assert df.loc[0, "annotation_path"] == str(data_dir / "ann" / "s1a.geojson")
    assert all(os.path.isabs(p) for col in ("slide_path", "expression_path") for p in df[col] if p)


def test_sheet_in_subfolder_with_parent_relative_paths(data_dir: Path) -> None:
    rows = [["P2", "S2", "../slides/s2.svs", "", "", "", ""]]
    df = load_sample_sheet(write_sheet(touch(data_dir / "config" / "x").parent / "samples.tsv", rows))
    assert df.loc[0, "slide_path"] == str(data_dir / "slides" / "s2.svs")


def test_absolute_paths_kept(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")
    rows = [["P2", "S2", str(data_dir / "slides" / "s2.svs"), "", "", "", ""]]
    df = load_sample_sheet(write_sheet(other / "samples.tsv", rows))
    assert df.loc[0, "slide_path"] == str(data_dir / "slides" / "s2.svs")


def test_csv_input(data_dir: Path) -> None:
    df = load_sample_sheet(write_sheet(data_dir / "samples.csv", VALID_ROWS, sep=","))
    assert len(df) == len(VALID_ROWS)
    assert slides(df).loc["S1a", "mpp"] == "0.25"


def test_optional_columns_may_be_absent_and_whitespace_is_stripped(data_dir: Path) -> None:
    sheet = data_dir / "samples.tsv"
    sheet.write_text("patient_id\tslide_id \tslide_path\n P2 \t S2 \t slides/s2.svs \n\n")
    df = load_sample_sheet(sheet)
    assert df.loc[0, "patient_id"] == "P2" and df.loc[0, "slide_id"] == "S2"
    assert df.loc[0, "label"] == "" and df.loc[0, "expression_path"] == ""
    assert len(df) == 1  # the trailing blank line is not a row


def test_row_numbers_skip_blank_lines_like_a_spreadsheet(data_dir: Path) -> None:
    sheet = data_dir / "samples.tsv"
    sheet.write_text("patient_id\tslide_id\tslide_path\n\nP2\tS2\tslides/s2.svs\n")
    assert list(load_sample_sheet(sheet)["row"]) == [3]


# --- errors ---------------------------------------------------------------------------------------


def test_missing_required_column(data_dir: Path) -> None:
    header = ["patient_id", "slide_path"]
    msg = errors_of(write_sheet(data_dir / "s.tsv", [["P2", "slides/s2.svs"]], header=header))
    assert "column 'slide_id'" in msg and "missing" in msg
    assert "row 1 (header)" in msg


def test_unknown_column_lists_allowed_names(data_dir: Path) -> None:
    header = ["patient_id", "slideid", "slide_path"]
    msg = errors_of(write_sheet(data_dir / "s.tsv", [["P2", "S2", "slides/s2.svs"]], header=header))
    assert "column 'slideid'" in msg and "unknown column" in msg
    assert "did you mean 'slide_id'" in msg
    for name in ALLOWED_COLUMNS:
        assert name in msg


def test_duplicate_slide_id(data_dir: Path) -> None:
    rows = [["P1", "S1", "slides/s1a.svs", "", "", "", ""], ["P1", "S1", "slides/s1b.svs", "", "", "", ""]]
    msg = errors_of(write_sheet(data_dir / "s.tsv", rows))
    assert "row 3, column 'slide_id'" in msg and "already used on row 2" in msg


@pytest.mark.parametrize("bad", ["S 1", "S/1", ".S1", "S1\\x", "-S1", "a" * 129, "S1;rm"])
def test_unsafe_slide_id(data_dir: Path, bad: str) -> None:
    msg = errors_of(write_sheet(data_dir / "s.tsv", [["P2", bad, "slides/s2.svs", "", "", "", ""]]))
    assert "row 2, column 'slide_id'" in msg and "not a safe name" in msg


def test_missing_slide_file(data_dir: Path) -> None:
    msg = errors_of(write_sheet(data_dir / "s.tsv", [["P2", "S2", "slides/nope.svs", "", "", "", ""]]))
    assert "row 2, column 'slide_path'" in msg and "'slides/nope.svs' does not exist" in msg
    assert str(data_dir) in msg  # says what it was resolved against


def test_missing_expression_file(data_dir: Path) -> None:
    msg = errors_of(write_sheet(data_dir / "s.tsv", [["P3", "", "", "", "", "", "expr/nope.tsv"]]))
    assert "row 2, column 'expression_path'" in msg and "does not exist" in msg


def test_missing_annotation_file_and_annotation_without_slide(data_dir: Path) -> None:
    rows = [
        ["P2", "S2", "slides/s2.svs", "", "", "ann/nope.geojson", ""],
        ["P3", "", "", "", "", "ann/s1a.geojson", "expr/p3.tsv"],
    ]
    msg = errors_of(write_sheet(data_dir / "s.tsv", rows))
    assert "row 2, column 'annotation_path'" in msg and "does not exist" in msg
    assert "row 3, column 'annotation_path'" in msg and "without a slide" in msg


@pytest.mark.parametrize("bad", ["abc", "0", "0.0", "-0.25", "100", "250", "nan", "inf", "1e-1", "0,25"])
def test_bad_mpp(data_dir: Path, bad: str) -> None:
    msg = errors_of(write_sheet(data_dir / "s.tsv", [["P2", "S2", "slides/s2.svs", "", bad, "", ""]]))
    assert "row 2, column 'mpp'" in msg


@pytest.mark.parametrize("good", ["0.25", ".5", "1", "99.99", "0.5000"])
def test_good_mpp(data_dir: Path, good: str) -> None:
    df = load_sample_sheet(write_sheet(data_dir / "s.tsv", [["P2", "S2", "slides/s2.svs", "", good, "", ""]]))
    assert slide_mpp_override(df.iloc[0]) == float(good)


def test_conflicting_labels(data_dir: Path) -> None:
    rows = [
        ["P1", "S1a", "slides/s1a.svs", "tumor", "", "", ""],
        ["P1", "S1b", "slides/s1b.svs", "normal", "", "", ""],
    ]
    msg = errors_of(write_sheet(data_dir / "s.tsv", rows))
    assert "rows 2, 3, column 'label'" in msg and "conflicting labels" in msg
    assert "'tumor' (row 2)" in msg and "'normal' (row 3)" in msg


def test_conflicting_expression_paths(data_dir: Path) -> None:
    rows = [
        ["P1", "S1a", "slides/s1a.svs", "", "", "", "expr/p1.tsv"],
        ["P1", "", "", "", "", "", "expr/p3.tsv"],
    ]
    msg = errors_of(write_sheet(data_dir / "s.tsv", rows))
    assert "rows 2, 3, column 'expression_path'" in msg and "conflicting expression files" in msg


def test_row_referencing_nothing(data_dir: Path) -> None:
    rows = [["P2", "S2", "slides/s2.svs", "", "", "", ""], ["P9", "", "", "tumor", "", "", ""]]
    msg = errors_of(write_sheet(data_dir / "s.tsv", rows))
    assert "row 3" in msg and "references nothing" in msg


def test_slide_path_without_slide_id_and_vice_versa(data_dir: Path) -> None:
    rows = [["P2", "", "slides/s2.svs", "", "", "", ""], ["P1", "S1a", "", "", "", "", ""]]
    msg = errors_of(write_sheet(data_dir / "s.tsv", rows))
    assert "row 2, column 'slide_id'" in msg and "slide_id is empty" in msg
    assert "row 3, column 'slide_path'" in msg and "has no slide_path" in msg


def test_empty_patient_id(data_dir: Path) -> None:
    msg = errors_of(write_sheet(data_dir / "s.tsv", [["", "S2", "slides/s2.svs", "", "", "", ""]]))
    assert "row 2, column 'patient_id'" in msg


def test_empty_sheet(data_dir: Path) -> None:
    assert "no data rows" in errors_of(write_sheet(data_dir / "s.tsv", []))
    (data_dir / "blank.tsv").write_text("")
    assert "empty" in errors_of(data_dir / "blank.tsv")


def test_missing_sheet_file(tmp_path: Path) -> None:
    assert "does not exist" in errors_of(tmp_path / "nope.tsv")


def test_space_separated_sheet_gets_a_hint(data_dir: Path) -> None:
    sheet = data_dir / "s.tsv"
    sheet.write_text("patient_id slide_id slide_path\nP2 S2 slides/s2.svs\n")
    assert "separate columns with tabs" in errors_of(sheet)


def test_three_problems_reported_together(data_dir: Path) -> None:
    rows = [
        ["P1", "S1a", "slides/s1a.svs", "", "", "", ""],
        ["P1", "S 1b", "slides/s1b.svs", "", "", "", ""],  # row 3: unsafe slide_id
        ["P2", "S2", "slides/missing.svs", "", "", "", ""],  # row 4: missing slide file
        ["P4", "S4", "slides/s4.svs", "", "fast", "", ""],  # row 5: bad mpp
    ]
    with pytest.raises(SampleSheetError) as info:
        load_sample_sheet(write_sheet(data_dir / "s.tsv", rows))
    err = info.value
    msg = str(err)
    assert len(err.problems) == 3
    assert "has 3 problems" in msg
    assert "row 3, column 'slide_id'" in msg
    assert "row 4, column 'slide_path'" in msg
    assert "row 5, column 'mpp'" in msg
    assert all(str(data_dir / "s.tsv") in p for p in err.problems)
    assert len(msg.splitlines()) == 4  # header line + one line per problem
    assert isinstance(err, ValueError)


# --- survival columns (time, event) ---------------------------------------------------------------

SURV_HEADER = [*HEADER, "time", "event"]
SURV_ROWS = [
    ["P1", "S1a", "slides/s1a.svs", "tumor", "", "", "expr/p1.tsv", "1234", "1"],
    ["P1", "S1b", "slides/s1b.svs", "tumor", "", "", "expr/p1.tsv", "1234.0", "1"],
    ["P2", "S2", "slides/s2.svs", "normal", "", "", "", "0", "0"],
    ["P3", "", "", "tumor", "", "", "expr/p3.tsv", "", ""],
]


def test_survival_columns_are_accepted_and_kept(data_dir: Path) -> None:
    df = load_sample_sheet(write_sheet(data_dir / "samples.tsv", SURV_ROWS, header=SURV_HEADER))
    assert list(df["time"]) == ["1234", "1234.0", "0", ""] and list(df["event"]) == ["1", "1", "0", ""]
    # a sheet without them still loads, with the columns empty
    df = load_sample_sheet(write_sheet(data_dir / "plain.tsv", VALID_ROWS))
    assert (df["time"] == "").all() and (df["event"] == "").all()


@pytest.mark.parametrize(
    ("time", "event", "expected"),
    [
        ("-3", "1", "column 'time': time '-3' is not a number >= 0"),
        ("abc", "0", "column 'time': time 'abc' is not a number >= 0"),
        ("12", "2", "column 'event': event '2' is not 0 or 1"),
        ("12", "yes", "column 'event': event 'yes' is not 0 or 1"),
        ("12", "", "time is given without event"),
        ("", "1", "event is given without time"),
    ],
)
def test_bad_survival_values(data_dir: Path, time: str, event: str, expected: str) -> None:
    rows = [["P2", "S2", "slides/s2.svs", "", "", "", "", time, event]]
    msg = errors_of(write_sheet(data_dir / "s.tsv", rows, header=SURV_HEADER))
    assert "row 2" in msg and expected in msg


def test_conflicting_survival_of_one_patient(data_dir: Path) -> None:
    rows = [SURV_ROWS[0], [*SURV_ROWS[1][:7], "99", "0"]]
    msg = errors_of(write_sheet(data_dir / "s.tsv", rows, header=SURV_HEADER))
    assert "patient 'P1' has conflicting survival times" in msg
    assert "patient 'P1' has conflicting survival events" in msg


def test_schema_accepts_and_rejects_survival_values(data_dir: Path) -> None:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    df = load_sample_sheet(write_sheet(data_dir / "samples.tsv", SURV_ROWS, header=SURV_HEADER))
    validate(df.drop(columns="row"), str(SCHEMA))
    for column, value in (("time", "-1"), ("time", "x"), ("event", "2")):
        bad = df.drop(columns="row")
        bad.loc[0, column] = value
        with pytest.raises(WorkflowError):
            validate(bad, str(SCHEMA))


# --- Snakemake schema ------------------------------------------------------------------------------


def test_schema_accepts_valid_frame(data_dir: Path) -> None:
    from snakemake.utils import validate

    df = load_sample_sheet(write_sheet(data_dir / "samples.tsv", VALID_ROWS))
    validate(df, str(SCHEMA))  # with the row column
    validate(df.drop(columns="row"), str(SCHEMA))
    raw = pd.read_csv(data_dir / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    validate(raw, str(SCHEMA))  # the sheet as Snakefile code would read it


@pytest.mark.parametrize(
    ("column", "value"),
    [("slide_id", "bad id"), ("slide_id", ".hidden"), ("mpp", "-1"), ("mpp", "0"), ("patient_id", "")],
)
def test_schema_rejects_bad_values(data_dir: Path, column: str, value: str) -> None:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    df = load_sample_sheet(write_sheet(data_dir / "samples.tsv", VALID_ROWS)).drop(columns="row")
    df.loc[2, column] = value
    with pytest.raises(WorkflowError):
        validate(df, str(SCHEMA))


def test_schema_rejects_unknown_column_and_row_referencing_nothing(data_dir: Path) -> None:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    df = load_sample_sheet(write_sheet(data_dir / "samples.tsv", VALID_ROWS)).drop(columns="row")
    with pytest.raises(WorkflowError):
        validate(df.assign(slideid="x"), str(SCHEMA))
    nothing = df.copy()
    nothing.loc[3, "expression_path"] = ""  # P3's expression-only row now references nothing
    with pytest.raises(WorkflowError):
        validate(nothing, str(SCHEMA))


# --- CLI -------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsiomics.samples", "check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_ok(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    sheet = write_sheet(data_dir / "samples.tsv", VALID_ROWS)
    proc = run_cli(str(sheet), cwd=tmp_path_factory.mktemp("cwd"))
    assert proc.returncode == 0, proc.stderr
    assert "4 patients, 4 slides, 3 patients with expression" in proc.stdout


def test_cli_error(data_dir: Path) -> None:
    rows = [["P2", "S 2", "slides/s2.svs", "", "", "", ""]]
    proc = run_cli(str(write_sheet(data_dir / "bad.tsv", rows)), cwd=data_dir)
    assert proc.returncode == 1
    assert "row 2, column 'slide_id'" in proc.stderr
    assert proc.stdout == ""


def test_main_in_process(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(write_sheet(data_dir / "samples.tsv", VALID_ROWS))]) == 0
    out = capsys.readouterr().out
    assert "4 patients" in out and "3 labelled patients (2 classes), 1 unlabelled (pretraining only)" in out
    unlabelled = [[*row[:3], "", *row[4:]] for row in VALID_ROWS]
    assert main(["check", str(write_sheet(data_dir / "nolabels.tsv", unlabelled))]) == 0
    assert "no labels (folds over every patient" in capsys.readouterr().out


# --- features_path: slides whose features are imported -------------------------------------------------

FEAT_HEADER = ["patient_id", "slide_id", "slide_path", "label", "mpp", "expression_path", "features_path"]


def feature_files(data_dir: Path) -> None:
    touch(data_dir / "feats" / "s5.h5")
    touch(data_dir / "feats" / "s6.zarr" / "zarr.json")


def test_features_path_rows_need_no_slide_path(data_dir: Path) -> None:
    feature_files(data_dir)
    rows = [["P1", "S1a", "slides/s1a.svs", "tumor", "", "expr/p1.tsv", ""],
            ["P5", "S5", "", "tumor", "", "", "feats/s5.h5"],
            ["P6", "S6", "slides/s2.svs", "normal", "", "", "feats/s6.zarr"]]
    df = load_sample_sheet(write_sheet(data_dir / "samples.tsv", rows, header=FEAT_HEADER))
    sl = slides(df)
    assert sl.loc["S5", "features_path"] == str(data_dir / "feats" / "s5.h5") and sl.loc["S5", "slide_path"] == ""
    assert sl.loc["S6", "features_path"] == str(data_dir / "feats" / "s6.zarr")
    assert [imported(r) for _, r in sl.iterrows()] == [False, True, True]
    # a sheet of imported features only may leave out slide_path altogether
    header = ["patient_id", "slide_id", "label", "features_path"]
    df = load_sample_sheet(write_sheet(data_dir / "only.tsv", [["P5", "S5", "tumor", "feats/s5.h5"]], header=header))
    assert df.loc[0, "slide_path"] == "" and df.loc[0, "features_path"].endswith("s5.h5")


def test_features_path_problems_are_reported_together(data_dir: Path) -> None:
    feature_files(data_dir)
    (data_dir / "feats" / "plain").mkdir()
    touch(data_dir / "feats" / "s7.pt")
    rows = [["P5", "S5", "", "", "", "", "feats/missing.h5"],
            ["P6", "S6", "", "", "", "", "feats/s7.pt"],
            ["P7", "S7", "", "", "", "", "feats/plain"],
            ["P8", "", "", "", "", "expr/p1.tsv", "feats/s5.h5"],
            ["P9", "S9", "", "", "0.25", "", "feats/s5.h5"],
            ["P10", "S10", "", "", "", "", ""]]
    msg = errors_of(write_sheet(data_dir / "samples.tsv", rows, header=FEAT_HEADER))
    assert "6 problems" in msg
    assert "row 2, column 'features_path': file 'feats/missing.h5' does not exist" in msg
    assert "row 3, column 'features_path': 'feats/s7.pt' is neither an h5 feature file" in msg and "pt_files" in msg
    assert "row 4, column 'features_path': 'feats/plain' is a folder but not a wsiomics feature store" in msg
    assert "row 5, column 'slide_id': features_path is given but slide_id is empty" in msg
    assert "row 6, column 'mpp': mpp is given for a slide whose features are imported" in msg
    assert "row 7, column 'slide_path': slide 'S10' has no slide_path" in msg and "features_path" in msg


def test_schema_accepts_features_rows_and_rejects_features_on_expression_rows(data_dir: Path) -> None:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    feature_files(data_dir)
    rows = [["P5", "S5", "", "tumor", "", "", "feats/s5.h5"], ["P1", "", "", "", "", "expr/p1.tsv", ""]]
    df = load_sample_sheet(write_sheet(data_dir / "samples.tsv", rows, header=FEAT_HEADER)).drop(columns="row")
    validate(df, str(SCHEMA))
    for bad in (df.assign(features_path=""), df.assign(features_path=["feats/s5.h5", "feats/s5.h5"])):
        with pytest.raises(WorkflowError):
            validate(bad, str(SCHEMA))
