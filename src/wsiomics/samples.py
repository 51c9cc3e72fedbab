"""The sample sheet: which slides and expression files belong to which patient.

One sheet (TSV; ``.csv`` is read comma-separated) drives the whole pipeline. Each data row is either

* a **slide row**: ``slide_id`` + ``slide_path`` (optionally ``mpp``, ``annotation_path``, ``label``,
  ``expression_path``), or ``slide_id`` + ``features_path``: the slide's patch features already extracted
  (a TRIDENT or CLAM h5 file, or a wsiomics feature store ``.zarr``), imported instead of tiling and
  extracting the slide (``slide_path`` may then be empty), or
* an **expression-only row**: ``slide_id`` and ``slide_path`` empty, ``expression_path`` given.

Columns: ``patient_id``, ``slide_id``, ``slide_path`` are required (``slide_path`` may be left out of a
sheet that has ``features_path``); ``label``, ``mpp``, ``annotation_path``, ``expression_path``, ``time``,
``event``, ``features_path`` are optional; any other column is an error
(it is almost always a typo that would otherwise be silently ignored). ``time`` (days, a number >= 0) and
``event`` (1 = the event, e.g. death, was observed; 0 = censored) carry a patient's survival; tasks that do
not use them ignore them.

Rules: ``patient_id`` is never empty; ``slide_id`` is unique and file-name safe
(``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``) because it names output files; every path must exist,
relative paths resolve against the sheet's own folder (not the working directory); ``mpp`` is a
decimal in (0, 100) and overrides the slide's metadata; a patient has at most one distinct label
and at most one distinct expression file, survival time and event across its rows; ``time`` and
``event`` are given together or not at all.

A patient may have no label (empty ``label`` cells): in a sheet whose labelled patients have two classes or
more it is an **unlabelled** patient, role ``unlabelled`` in every fold (:mod:`wsiomics.splits`), used by pretraining
(``train.pretrain.pool: all``) and never fine-tuned on or evaluated; a sheet without any label runs the
methods that need none (retrieval, segmentation, survival), and so does a sheet with a single class.

All problems are collected and raised together as one :class:`SampleSheetError`, so a user fixes
the sheet in one pass instead of one error per run. ``workflow/schemas/samples.schema.yaml``
describes the same row shape for ``snakemake.utils.validate``; this module is the stricter check
(file existence and the cross-row rules cannot be expressed there).

CLI: ``python -m wsiomics.samples check SHEET``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

REQUIRED_COLUMNS: tuple[str, ...] = ("patient_id", "slide_id", "slide_path")
OPTIONAL_COLUMNS: tuple[str, ...] = ("label", "mpp", "annotation_path", "expression_path", "time", "event",
                                     "features_path")
ALLOWED_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
PATH_COLUMNS: tuple[str, ...] = ("slide_path", "annotation_path", "expression_path", "features_path")
#: What ``features_path`` may name: an h5 feature file (TRIDENT, CLAM) or a wsiomics feature store (a folder).
FEATURE_FILE_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5")
FEATURE_STORE_SUFFIX = ".zarr"

#: slide_id names output files, so it must be safe on every filesystem and in shell commands.
SLIDE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: A plain positive decimal (no sign, no exponent); kept identical to the schema's mpp pattern.
MPP_RE = re.compile(r"0*[1-9][0-9]*(\.[0-9]*)?|0*\.[0-9]*[1-9][0-9]*")
MPP_MAX = 100.0
#: Survival time: a plain non-negative decimal (days); kept identical to the schema's time pattern.
TIME_RE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")
EVENTS = ("0", "1")

__all__ = [
    "ALLOWED_COLUMNS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SampleSheetError",
    "imported",
    "load_sample_sheet",
    "patients",
    "slide_mpp_override",
    "slides",
]


class SampleSheetError(ValueError):
    """The sample sheet is invalid; ``problems`` holds one line per problem, all of them."""

    def __init__(self, path: str | os.PathLike[str], problems: Sequence[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        n = len(self.problems)
        header = f"sample sheet {self.path} has {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


class _Problems:
    """Collects problems with a uniform 'where: what; fix' wording."""

    def __init__(self, sheet: str) -> None:
        self.sheet = sheet
        self.items: list[str] = []

    def add(self, where: str, column: str | None, what: str, fix: str) -> None:
        col = f", column '{column}'" if column else ""
        self.items.append(f"{self.sheet}, {where}{col}: {what}. Fix: {fix}.")

    def row(self, line: int, column: str | None, what: str, fix: str) -> None:
        self.add(f"row {line}", column, what, fix)

    def rows(self, lines: Sequence[int], column: str | None, what: str, fix: str) -> None:
        self.add("rows " + ", ".join(str(n) for n in lines), column, what, fix)

    def header(self, column: str | None, what: str, fix: str) -> None:
        self.add("row 1 (header)", column, what, fix)


def _separator(path: Path) -> str:
    return "," if path.suffix.lower() == ".csv" else "\t"


def _read_raw(path: Path, problems: _Problems) -> pd.DataFrame | None:
    """Read every cell as a string, header as row 0, so line numbers and duplicate names survive."""
    try:
        raw = pd.read_csv(
            path,
            sep=_separator(path),
            header=None,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",  # spreadsheet exports often start with a BOM
        )
    except pd.errors.EmptyDataError:
        problems.header(
            None, "the file is empty", f"add a header line with at least {', '.join(REQUIRED_COLUMNS)}"
        )
        return None
    except pd.errors.ParserError as exc:
        problems.add(
            "parsing",
            None,
            f"the file is not a well-formed {'CSV' if _separator(path) == ',' else 'TSV'} "
            f"({str(exc).strip()})",
            "give every row the same number of cells as the header and check quoting",
        )
        return None
    except UnicodeDecodeError as exc:
        problems.add("parsing", None, f"the file is not UTF-8 text ({exc})", "save the sheet as UTF-8")
        return None
    return raw.fillna("").map(str.strip)


def _resolve(value: str, base: Path) -> str:
    """Absolute, normalised path; relative paths are relative to the sheet's folder, not the cwd."""
    if not value:
        return ""
    p = os.path.expanduser(value)
    if not os.path.isabs(p):
        p = os.path.join(base, p)
    return os.path.normpath(p)


def _check_header(names: list[str], raw: pd.DataFrame, problems: _Problems) -> list[int]:
    """Validate column names; return the positions of the columns to keep."""
    keep: list[int] = []
    seen: dict[str, int] = {}
    allowed = ", ".join(ALLOWED_COLUMNS)
    for pos, name in enumerate(names):
        if name == "":
            # A trailing separator from a spreadsheet export gives an empty, unnamed column: harmless.
            if (raw.iloc[1:, pos] == "").all():
                continue
            problems.header(
                None,
                f"column {pos + 1} has no name but contains values",
                f"name it (allowed: {allowed}) or delete it",
            )
            continue
        if name in seen:
            problems.header(
                name,
                f"column name appears twice (columns {seen[name] + 1} and {pos + 1})",
                "keep one of them",
            )
            continue
        seen[name] = pos
        if name not in ALLOWED_COLUMNS:
            close = difflib.get_close_matches(name.lower(), ALLOWED_COLUMNS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.header(
                name, f"unknown column{hint}", f"rename or delete it; allowed columns are: {allowed}"
            )
            continue
        keep.append(pos)
    missing = [c for c in REQUIRED_COLUMNS if c not in seen and not (c == "slide_path" and "features_path" in seen)]
    for name in missing:
        problems.header(name, "required column is missing", f"add a '{name}' column")
    if missing and len(names) == 1 and re.search(r"[,;\s]", names[0]):
        problems.header(
            None,
            "the header was read as a single column",
            "separate columns with tabs (or use a .csv file with commas)",
        )
    return keep


def _check_rows(df: pd.DataFrame, base: Path, problems: _Problems) -> None:
    """Per-row checks, then cross-row checks; only columns that exist are checked."""
    cols = set(df.columns)
    has_id_cols = "slide_id" in cols and bool({"slide_path", "features_path"} & cols)
    first_slide_row: dict[str, int] = {}
    first_folded: dict[str, tuple[str, int]] = {}

    for rec in df.to_dict("records"):
        line = int(rec["row"])
        slide_id = rec.get("slide_id", "")
        has_slide = bool(slide_id)

        if "patient_id" in cols and not rec["patient_id"]:
            problems.row(line, "patient_id", "patient_id is empty", "fill in the patient this row belongs to")

        if slide_id:
            if not SLIDE_ID_RE.fullmatch(slide_id):
                problems.row(
                    line,
                    "slide_id",
                    f"slide_id '{slide_id}' is not a safe name (it is used in file names)",
                    "use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit "
                    "(no spaces, slashes or leading dot)",
                )
            if slide_id in first_slide_row:
                problems.row(
                    line,
                    "slide_id",
                    f"slide_id '{slide_id}' already used on row {first_slide_row[slide_id]}",
                    "give every slide a unique slide_id",
                )
            else:
                first_slide_row[slide_id] = line
                folded = slide_id.casefold()
                if folded in first_folded:
                    other, other_line = first_folded[folded]
                    problems.row(
                        line,
                        "slide_id",
                        f"slide_id '{slide_id}' differs from '{other}' on row {other_line} only by case, "
                        "so their output files collide on case-insensitive filesystems",
                        "make the slide_ids differ by more than letter case",
                    )
                else:
                    first_folded[folded] = (slide_id, line)

        slide_path, features_path = rec.get("slide_path", ""), rec.get("features_path", "")
        if has_id_cols:
            if slide_id and not slide_path and not features_path:
                problems.row(
                    line, "slide_path", f"slide '{slide_id}' has no slide_path",
                    "give the slide's file path" + (", or its features in features_path" if "features_path" in cols
                                                    else ""),
                )
            elif (slide_path or features_path) and not slide_id:
                col = "slide_path" if slide_path else "features_path"
                problems.row(
                    line,
                    "slide_id",
                    f"{col} is given but slide_id is empty",
                    f"give the slide a slide_id, or clear {col} on an expression-only row",
                )
            elif not slide_id and not rec.get("expression_path", ""):
                problems.row(
                    line,
                    None,
                    "row references nothing (no slide_id/slide_path and no expression_path)",
                    "add a slide or an expression_path, or delete the row",
                )

        for col in PATH_COLUMNS:
            value = rec.get(col, "")
            if not value:
                continue
            resolved = _resolve(value, base)
            note = "" if os.path.isabs(os.path.expanduser(value)) else f" (resolved against {base})"
            if not os.path.exists(resolved):
                problems.row(
                    line,
                    col,
                    f"file '{value}' does not exist{note}",
                    "correct the path; relative paths are relative to the sheet's folder",
                )
            elif col == "features_path":
                _check_features_path(value, resolved, note, line, problems)
            elif not os.path.isfile(resolved):
                problems.row(line, col, f"'{value}' is not a file{note}", "point to a file")

        if rec.get("annotation_path", "") and has_id_cols and not has_slide:
            problems.row(
                line,
                "annotation_path",
                "annotation_path is given on a row without a slide",
                "move the annotation to the row of the slide it annotates",
            )

        mpp = rec.get("mpp", "")
        if mpp and not (MPP_RE.fullmatch(mpp) and 0 < float(mpp) < MPP_MAX):
            problems.row(
                line,
                "mpp",
                f"mpp '{mpp}' is not a number in (0, {MPP_MAX:g})",
                "give microns per pixel as a plain decimal such as 0.25, or leave it empty "
                "to use the slide's metadata",
            )
        elif mpp and has_id_cols and not has_slide:
            problems.row(
                line, "mpp", "mpp is given on a row without a slide", "clear it or move it to the slide's row"
            )
        elif mpp and features_path:
            problems.row(
                line, "mpp", "mpp is given for a slide whose features are imported from features_path, so it is "
                "never tiled and the mpp would be ignored", "clear mpp (the feature file carries its own geometry)"
            )

        time, event = rec.get("time", ""), rec.get("event", "")
        if time and not TIME_RE.fullmatch(time):
            problems.row(line, "time", f"time '{time}' is not a number >= 0",
                         "give the survival time in days as a plain decimal such as 1234, or leave it empty")
        if event and event not in EVENTS:
            problems.row(line, "event", f"event '{event}' is not 0 or 1",
                         "give 1 when the event (e.g. death) was observed, 0 when censored, or leave it empty")
        if bool(time) != bool(event):
            given, missing = ("time", "event") if time else ("event", "time")
            problems.row(line, missing, f"{given} is given without {missing}",
                         "give both time and event, or neither")

    if "patient_id" not in cols:
        return
    # Per-patient consistency: label and expression file must not conflict across rows.
    for col, what in (("label", "labels"), ("expression_path", "expression files"), ("time", "survival times"),
                      ("event", "survival events")):
        if col not in cols:
            continue
        given = df[(df[col] != "") & (df["patient_id"] != "")]
        for patient, group in given.groupby("patient_id", sort=False):
            if col == "expression_path":
                keys = group[col].map(lambda v: _resolve(v, base))
            elif col == "time":
                keys = group[col].map(lambda v: float(v) if TIME_RE.fullmatch(v) else v)  # 1234 == 1234.0
            else:
                keys = group[col]
            if keys.nunique() > 1:
                detail = ", ".join(f"'{v}' (row {r})" for v, r in zip(group[col], group["row"], strict=True))
                problems.rows(
                    list(group["row"]),
                    col,
                    f"patient '{patient}' has conflicting {what}: {detail}",
                    f"use one {col} for all rows of a patient (or leave it empty on all but one)",
                )


def _check_features_path(value: str, resolved: str, note: str, line: int, problems: _Problems) -> None:
    """An h5 feature file or a wsiomics feature store (a zarr v3 folder); what is inside is the import's check."""
    suffix = Path(resolved).suffix.lower()
    if os.path.isdir(resolved):
        if suffix != FEATURE_STORE_SUFFIX or not os.path.isfile(os.path.join(resolved, "zarr.json")):
            problems.row(line, "features_path", f"'{value}' is a folder but not a wsiomics feature store (a .zarr "
                         f"folder with zarr.json){note}", "point to a TRIDENT/CLAM .h5 file or a feature store")
    elif suffix not in FEATURE_FILE_SUFFIXES:
        problems.row(line, "features_path", f"'{value}' is neither an h5 feature file (.h5, .hdf5) nor a feature "
                     f"store (.zarr folder){note}", "point to the slide's TRIDENT/CLAM .h5 file (CLAM: h5_files/, "
                     "not pt_files/) or to a wsiomics feature store")


def load_sample_sheet(path: str | os.PathLike[str], check: bool = True) -> pd.DataFrame:
    """Read and validate a sample sheet; raise one :class:`SampleSheetError` listing every problem.

    Returns one row per data row with all allowed columns (absent optional ones filled with ""),
    path columns made absolute and normalised, and ``row`` = the line number a spreadsheet shows.
    ``check=False`` skips the row checks (file existence included): for a sheet already checked by the
    process that started this one, e.g. a cluster job step re-reading it (10,000 slides: ~10 s of checks).
    """
    sheet = Path(path)
    problems = _Problems(str(sheet))
    if not sheet.is_file():
        problems.add(
            "file", None, "the sample sheet does not exist or is not a file", "check the path to the sheet"
        )
        raise SampleSheetError(sheet, problems.items)
    raw = _read_raw(sheet, problems)
    if raw is None:
        raise SampleSheetError(sheet, problems.items)

    names = list(raw.iloc[0])
    keep = _check_header(names, raw, problems)
    body = raw.iloc[1:, keep].copy()
    body.columns = [names[i] for i in keep]
    body.insert(0, "row", body.index.to_numpy() + 1)  # raw index 0 is the header = line 1
    # Fully blank rows (typically trailing lines of a spreadsheet export) carry no information.
    body = body[(raw.iloc[1:] != "").any(axis=1)]
    if body.empty:
        problems.add("row 2", None, "the sheet has no data rows", "add one row per slide below the header")

    base = sheet.resolve().parent
    if not body.empty and check:
        _check_rows(body, base, problems)
    if problems.items:
        raise SampleSheetError(sheet, problems.items)

    for col in ("slide_path", *OPTIONAL_COLUMNS):  # slide_path may be absent from a features_path sheet
        if col not in body.columns:
            body[col] = ""
    for col in PATH_COLUMNS:
        body[col] = body[col].map(lambda v: _resolve(v, base))
    body["row"] = body["row"].astype(int)
    return body[[*ALLOWED_COLUMNS, "row"]].reset_index(drop=True)


def slide_mpp_override(row: Mapping[str, Any] | pd.Series) -> float | None:
    """The sheet's mpp for this slide, or None to use the slide's own metadata."""
    value = str(row.get("mpp", "") or "").strip()
    return float(value) if value else None


def imported(row: Mapping[str, Any] | pd.Series) -> bool:
    """The slide's features come from its ``features_path`` (imported), not from tiling its ``slide_path``."""
    return bool(str(row.get("features_path", "") or "").strip())


def slides(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that have a slide, indexed by slide_id (what per-slide Snakemake rules look up)."""
    return df[df["slide_id"] != ""].set_index("slide_id")


def patients(df: pd.DataFrame) -> pd.DataFrame:
    """One row per patient_id (first-appearance order): label, expression_path, n_slides, flags, survival event."""
    records = []
    for patient, group in df.groupby("patient_id", sort=False):
        labels = [v for v in group["label"] if v]
        expressions = [v for v in group["expression_path"] if v]
        events = [v for v in group["event"] if v] if "event" in group else []
        n_slides = int((group["slide_id"] != "").sum())
        records.append(
            {
                "patient_id": patient,
                "label": labels[0] if labels else "",
                "expression_path": expressions[0] if expressions else "",
                "n_slides": n_slides,
                "has_slide": n_slides > 0,
                "has_expression": bool(expressions),
                "event": events[0] if events else "",
            }
        )
    columns = ["patient_id", "label", "expression_path", "n_slides", "has_slide", "has_expression", "event"]
    return pd.DataFrame.from_records(records, columns=columns).set_index("patient_id")


def _summary(df: pd.DataFrame) -> str:
    pts = patients(df)
    n_imported = int((df["features_path"] != "").sum())
    return (
        f"{len(pts)} patients, {int(pts['n_slides'].sum())} slides"
        f"{f' ({n_imported} with imported features)' if n_imported else ''}, "
        f"{int(pts['has_expression'].sum())} patients with expression "
        f"({int((~pts['has_slide']).sum())} expression-only, "
        f"{int((~pts['has_expression']).sum())} slide-only), {_labels_summary(pts['label'])}"
    )


def _labels_summary(labels: pd.Series) -> str:
    """Labelled and unlabelled patients, as the folds will treat them."""
    labelled = labels[labels != ""]
    if labelled.nunique() < 2:
        return (f"{'no labels' if labelled.empty else 'a single class'} (folds over every patient; only the "
                "methods that need no label run)")
    text = f"{len(labelled)} labelled patients ({labelled.nunique()} classes)"
    n_unlabelled = int((labels == "").sum())
    return f"{text}, {n_unlabelled} unlabelled (pretraining only)" if n_unlabelled else text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wsiomics.samples check SHEET``: validate a sheet before launching the pipeline."""
    parser = argparse.ArgumentParser(prog="python -m wsiomics.samples", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a sample sheet and print a summary")
    check.add_argument("sheet", help="path to the sample sheet (.tsv, or .csv)")
    args = parser.parse_args(argv)

    try:
        df = load_sample_sheet(args.sheet)
    except SampleSheetError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.sheet}: OK: {_summary(df)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
