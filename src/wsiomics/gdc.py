"""GDC downloads -> the pipeline's sample sheet (``samples.tsv``) and a table of every file left out.

``python -m wsiomics.gdc sheet --sample-sheet S.tsv [S2.tsv ...] --downloads DIR [DIR2 ...] --out samples.tsv
[--label project | --label column:NAME --clinical C.tsv [C2.tsv ...]] [--slides diagnostic|frozen|all]``

Inputs, as the GDC portal and ``gdc-client`` give them:

* listings: portal sample sheets in either layout users meet (classic: ``File ID, File Name, Data Category,
  Data Type, Project ID, Case ID, Sample ID, Sample Type``; newer: the same first seven columns, then
  ``Tissue Type, Tumor Descriptor, Specimen Type, Preservation Method``), or a gdc-client manifest (``id
  filename md5 size state``). A manifest says nothing about cases: its slides are placed by the TCGA
  barcode in their file names, its expression files only when a sample sheet also lists them.
* download folders in gdc-client's layout ``<file id>/<file name>``.
* optionally clinical tables: GDC's ``clinical.tsv`` (``case_submitter_id`` or ``cases.submitter_id``), the
  TCGA pan-cancer clinical table (``bcr_patient_barcode``), cBioPortal's patient table (``PATIENT_ID``, its
  ``#`` header lines skipped), or any TSV whose patient column ``--clinical-id`` names.

What is placed: slide images (diagnostic FFPE ``-DX`` by default; frozen ``-TS``/``-BS``/``-MS`` with
``--slides frozen``; ``all``), every slide of a patient's best-ranked sample type kept; and STAR
``augmented_star_gene_counts`` files, one per patient, chosen exactly as the expression stage chooses
among TCGA samples (:func:`wsiomics.expression.readers.choose_samples`: the type listed first in
``--sample-types`` = ``expression.sample_types``, then vial, then barcode). Labels come from the project
(``--label project``) or a clinical column (``--label column:NAME``); survival (``time`` in days, ``event``
1 dead / 0 alive) is carried through when the clinical table has it (pan-cancer ``OS``/``OS.time``, or
GDC's ``vital_status`` with ``days_to_death`` / ``days_to_last_follow_up``).

Nothing is dropped silently: every listed or downloaded file that is not in the sheet is a row of
``<out stem>.unplaced.tsv`` with the reason (slide without a case, RNA of a normal sample, missing or
incomplete download, duplicate, a sample not chosen, a patient without a label, ...).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from wsiomics.expression.cohort import DEFAULT_SAMPLE_TYPES
from wsiomics.expression.readers import choose_samples, patient_of
from wsiomics.io import write_text
from wsiomics.samples import SLIDE_ID_RE, SampleSheetError, load_sample_sheet

SHEET_COLUMNS = ("File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID")
CLASSIC_COLUMNS = (*SHEET_COLUMNS, "Sample Type")
NEW_COLUMNS = (*SHEET_COLUMNS, "Tissue Type", "Tumor Descriptor", "Specimen Type", "Preservation Method")
MANIFEST_COLUMNS = ("id", "filename", "md5", "size", "state")
RNA_SUFFIX = "augmented_star_gene_counts.tsv"
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".svslide", ".bif")
SLIDE_CHOICES = ("diagnostic", "frozen", "all")
#: Slide barcode section -> kind: DX diagnostic (FFPE); TS/BS/MS top/bottom/middle section of the frozen block.
SLIDE_KINDS = {"DX": "diagnostic", "TS": "frozen", "BS": "frozen", "MS": "frozen"}
#: TCGA slide barcode at the start of a slide's file name: TCGA-05-4244-01Z-00-DX1.<uuid>.svs
SLIDE_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-\d{2}[A-Z]-[0-9A-Z]{2,3}-(DX|TS|BS|MS)[0-9A-Z]*)(?=\.|$)",
                           re.IGNORECASE)
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
#: TCGA sample-type codes 10-14 are normal tissue or blood.
NORMAL_TYPES = frozenset({"10", "11", "12", "13", "14"})
#: Sample-type names (classic sheet's "Sample Type") -> TCGA code, for samples without a TCGA barcode.
SAMPLE_TYPE_CODES = {
    "primary tumor": "01", "primary solid tumor": "01", "recurrent tumor": "02", "recurrent solid tumor": "02",
    "primary blood derived cancer - peripheral blood": "03", "recurrent blood derived cancer - bone marrow": "04",
    "additional - new primary": "05", "metastatic": "06", "additional metastatic": "07",
    "primary blood derived cancer - bone marrow": "09", "blood derived normal": "10", "solid tissue normal": "11",
    "buccal cell normal": "12", "bone marrow normal": "14",
}
#: Newer sheet's "Tumor Descriptor" of a tumour sample -> TCGA code.
DESCRIPTOR_CODES = {"primary": "01", "recurrence": "02", "new primary": "05", "metastatic": "06"}
#: Patient column of GDC clinical.tsv (older, newer), the TCGA pan-cancer table, and cBioPortal's patient table.
CLINICAL_ID_COLUMNS = ("case_submitter_id", "cases.submitter_id", "bcr_patient_barcode", "PATIENT_ID")
#: Cells that mean "no value" in GDC and TCGA clinical tables.
MISSING = frozenset({"", "'--", "--", "na", "n/a", "nan", "none", "null", "#n/a", "not reported", "unknown"})
UNPLACED_COLUMNS = ("file_id", "file_name", "kind", "case_id", "sample_id", "listed_in", "path", "reason")

__all__ = ["GdcError", "build_sheet", "main"]


class GdcError(ValueError):
    """An input cannot be used; the message names the file and the fix."""


@dataclass
class GdcFile:
    """One file as the listings describe it, and where it was found."""

    file_id: str
    file_name: str
    listed_in: str  # "sheet.tsv:12" (line as an editor shows it); "downloads" for unlisted files
    project: str = ""
    cases: tuple[str, ...] = ()
    samples: tuple[str, ...] = ()
    sample_type: str = ""  # classic "Sample Type"
    tissue_type: str = ""
    tumor_descriptor: str = ""
    preservation: str = ""
    data_type: str = ""
    size: int | None = None  # from a manifest
    path: str = ""
    # decided while placing
    kind: str = ""
    case: str = ""
    sample: str = ""
    type_code: str = ""
    slide_id: str = ""
    slide_kind: str = ""
    reason: str = ""  # why it is not in the sheet ("" = placed)


def _split(cell: str) -> tuple[str, ...]:
    """A sheet cell may list several values ("TCGA-05-4244, TCGA-05-4244"): distinct, in order."""
    return tuple(dict.fromkeys(v.strip() for v in str(cell).split(",") if v.strip()))


def _missing(value: object) -> bool:
    text = str(value).strip()
    return text.lower() in MISSING or (text.startswith("[") and text.endswith("]"))  # [Not Available] etc.


def _read_table(path: Path, skip_comments: bool = False) -> pd.DataFrame:
    if not path.is_file():
        raise GdcError(f"{path}: file not found. Fix: check the path.")
    skip = 0
    if skip_comments:  # cBioPortal tables start with '#' description lines ("#N/A" cells stay cells)
        with open(path, encoding="utf-8-sig") as f:
            while f.readline().startswith("#"):
                skip += 1
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8-sig", skiprows=skip)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise GdcError(f"{path}: not a readable tab-separated table ({exc}). Fix: give the file as the GDC "
                       "portal or gdc-client wrote it.") from None


def read_listing(path: str | os.PathLike) -> list[GdcFile]:
    """A portal sample sheet (either layout) or a gdc-client manifest -> one GdcFile per row."""
    path = Path(path)
    df = _read_table(path)
    cols = set(df.columns)
    records = []
    if set(MANIFEST_COLUMNS[:2]) <= cols and "File ID" not in cols:
        for i, row in enumerate(df.to_dict("records")):
            size = str(row.get("size", "")).strip()
            records.append(GdcFile(file_id=row["id"].strip(), file_name=row["filename"].strip(),
                                   listed_in=f"{path}:{i + 2}", size=int(size) if size.isdigit() else None))
        return records
    missing = [c for c in SHEET_COLUMNS if c not in cols]
    if missing:
        raise GdcError(
            f"{path}: neither a GDC sample sheet nor a gdc-client manifest (missing columns: {', '.join(missing)}). "
            f"Fix: give the portal's sample sheet (columns {', '.join(CLASSIC_COLUMNS)}, or the newer "
            f"{', '.join(NEW_COLUMNS[-4:])} in place of Sample Type) or a manifest ({' '.join(MANIFEST_COLUMNS)}).")
    for i, row in enumerate(df.to_dict("records")):
        records.append(GdcFile(
            file_id=row["File ID"].strip(), file_name=row["File Name"].strip(), listed_in=f"{path}:{i + 2}",
            project=row["Project ID"].strip(), cases=_split(row["Case ID"]), samples=_split(row["Sample ID"]),
            sample_type=row.get("Sample Type", "").strip(), tissue_type=row.get("Tissue Type", "").strip(),
            tumor_descriptor=row.get("Tumor Descriptor", "").strip(),
            preservation=row.get("Preservation Method", "").strip(), data_type=row["Data Type"].strip()))
    return records


def _merge(listings: Sequence[GdcFile]) -> tuple[list[GdcFile], list[GdcFile]]:
    """One record per file ID (a sheet's case information completes a manifest's size); a file ID listed
    with conflicting names or cases is kept once and its other listings are returned as unplaced."""
    by_id: dict[str, GdcFile] = {}
    conflicts = []
    for rec in listings:
        first = by_id.get(rec.file_id)
        if first is None:
            by_id[rec.file_id] = rec
            continue
        if rec.file_name != first.file_name or (rec.cases and first.cases and rec.cases != first.cases):
            rec.reason = (f"duplicate: file ID also listed in {first.listed_in} with name '{first.file_name}' and "
                          f"case {', '.join(first.cases) or '?'}; that listing is used")
            conflicts.append(rec)
            continue
        for name in ("project", "cases", "samples", "sample_type", "tissue_type", "tumor_descriptor",
                     "preservation", "data_type", "size"):
            if not getattr(first, name) and getattr(rec, name):
                setattr(first, name, getattr(rec, name))
    return list(by_id.values()), conflicts


def _locate(rec: GdcFile, downloads: Sequence[Path]) -> None:
    """Set rec.path to ``<dir>/<file id>/<file name>`` in the first download folder that has it, else a reason."""
    partial = ""
    for root in downloads:
        candidate = root / rec.file_id / rec.file_name
        if candidate.is_file():
            rec.path = str(candidate.resolve())
            if rec.size is not None and candidate.stat().st_size != rec.size:
                rec.reason = (f"incomplete download: {candidate.stat().st_size} bytes, the manifest says {rec.size}; "
                              "re-run gdc-client download")
            return
        for name in (rec.file_name + ".partial", rec.file_name + ".part"):
            if (root / rec.file_id / name).is_file():
                partial = str(root / rec.file_id / name)
    if partial:
        rec.path = partial
        rec.reason = "incomplete download (only a partial file); re-run gdc-client download"
    else:
        where = ", ".join(str(d / rec.file_id / rec.file_name) for d in downloads)
        rec.reason = f"missing download: not found at {where}"


def _unlisted(downloads: Sequence[Path], listed: set[str]) -> list[GdcFile]:
    """Files in gdc-client folders (``<uuid>/<name>``) that no listing mentions."""
    found = []
    for root in downloads:
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and UUID_RE.fullmatch(p.name)):
            if folder.name in listed:
                continue
            for f in sorted(p for p in folder.iterdir() if p.is_file() and p.name != "annotations.txt"):
                found.append(GdcFile(file_id=folder.name, file_name=f.name, listed_in="", path=str(f.resolve()),
                                     reason="downloaded but listed in none of the sample sheets or manifests given"))
    return found


def _kind(rec: GdcFile) -> str:
    name = rec.file_name.lower()
    if name.endswith(RNA_SUFFIX):
        return "rna"
    if rec.data_type.lower() == "slide image" or name.endswith(SLIDE_SUFFIXES):
        return "slide"
    return "other"


def _type_code(rec: GdcFile, barcode: str) -> str:
    """TCGA sample-type code: from the barcode, else from the sheet's sample-type words."""
    code = patient_of(barcode)[1] if barcode else ""
    if code:
        return code
    if rec.sample_type:
        return SAMPLE_TYPE_CODES.get(rec.sample_type.split(",")[0].strip().lower(), "")
    if rec.tissue_type.lower().startswith("normal"):
        return "11"
    if rec.tissue_type.lower().startswith("tumor"):
        return DESCRIPTOR_CODES.get(rec.tumor_descriptor.split(",")[0].strip().lower(), "")
    return ""


def _safe_slide_id(name: str) -> str:
    stem = name.split(".")[0] if not name.startswith(".") else name
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")[:128]
    return safe if SLIDE_ID_RE.fullmatch(safe) else ""


def _identify(rec: GdcFile) -> None:
    """Case, sample, sample-type code and (slides) slide kind and slide_id of a located file; or a reason."""
    rec.kind = _kind(rec)
    if rec.kind == "other":
        rec.reason = f"not a slide image or STAR gene counts file (data type: {rec.data_type or 'unknown'})"
        return
    barcode = ""
    if rec.kind == "slide":
        m = SLIDE_BARCODE.match(rec.file_name)
        if m:
            barcode = m.group(1).upper()
            rec.slide_kind = SLIDE_KINDS[m.group(2).upper()]
        elif rec.preservation:
            rec.slide_kind = "diagnostic" if rec.preservation.upper() == "FFPE" else "frozen"
        rec.slide_id = barcode or _safe_slide_id(rec.file_name)
        if not rec.slide_id:
            rec.reason = "slide file name gives no usable slide_id"
            return
    if len(rec.samples) > 1:
        rec.reason = f"one file of several samples ({', '.join(rec.samples)}); cannot say whose it is"
        return
    rec.sample = rec.samples[0] if rec.samples else barcode[:16]  # TCGA-05-4244-01Z of TCGA-05-4244-01Z-00-DX1
    tcga = barcode or rec.sample
    from_barcode = patient_of(tcga)[0] if tcga.upper().startswith("TCGA-") else ""
    if len(rec.cases) > 1:
        rec.reason = f"one file of several cases ({', '.join(rec.cases)})"
        return
    rec.case = rec.cases[0] if rec.cases else from_barcode
    if not rec.case:
        what = "slide" if rec.kind == "slide" else "RNA file"
        rec.reason = (f"{what} without a case: no Case ID listed and no TCGA barcode in its name; "
                      "give the portal's sample sheet for this file")
        return
    if from_barcode and from_barcode != rec.case.upper():
        rec.reason = f"the barcode says patient {from_barcode}, the sheet says case {rec.case}"
        return
    rec.type_code = _type_code(rec, barcode or rec.sample)


def _by_rank(recs: list[GdcFile], sample_types: Sequence[str], what: str) -> list[GdcFile]:
    """Unplace files whose sample type is normal or not listed; return the rest."""
    keep = []
    for rec in recs:
        if rec.type_code in NORMAL_TYPES:
            rec.reason = f"{what} of a normal sample (type {rec.type_code})"
        elif rec.type_code not in sample_types:
            code = rec.type_code or "unknown"
            rec.reason = f"{what} of sample type {code}, not in --sample-types {' '.join(sample_types)}"
        else:
            keep.append(rec)
    return keep


def _choose_rna(recs: list[GdcFile], sample_types: Sequence[str]) -> dict[str, GdcFile]:
    """One expression file per case, by the expression stage's rule for TCGA samples."""
    usable = _by_rank(recs, sample_types, "RNA")
    chosen: dict[str, GdcFile] = {}
    by_case: dict[str, list[GdcFile]] = defaultdict(list)
    for rec in usable:
        by_case[rec.case].append(rec)
    for case, group in by_case.items():
        group.sort(key=lambda r: (r.file_name, r.file_id))
        tcga = [r.sample for r in group if patient_of(r.sample)[0].upper() == case.upper() and patient_of(r.sample)[1]]
        if tcga and len(tcga) == len(group):
            table = choose_samples(pd.Index(sorted(set(tcga))), {case.upper()}, tuple(sample_types))
            best_sample = table.loc[table["chosen"], "sample"].iloc[0]
        else:  # non-TCGA sample IDs: the same order on the sheet's sample types
            rank = {t: i for i, t in enumerate(sample_types)}
            best_sample = min(group, key=lambda r: (rank[r.type_code], r.sample)).sample
        winner = next(r for r in group if r.sample == best_sample)
        chosen[case] = winner
        for rec in group:
            if rec is winner:
                continue
            if rec.sample == best_sample:
                rec.reason = f"duplicate: another file of sample {best_sample} is used ({winner.file_id})"
            else:
                rec.reason = (f"another sample of the patient ranks first by --sample-types: {best_sample} "
                              f"(type {winner.type_code}) is used")
    return chosen


def _choose_slides(recs: list[GdcFile], slides: str, sample_types: Sequence[str]) -> dict[str, list[GdcFile]]:
    """Slides of the requested kind; per case those of its best-ranked sample type (several slides kept)."""
    wanted = []
    for rec in recs:
        if slides != "all" and rec.slide_kind != slides:
            kind = rec.slide_kind or "unknown (no TCGA slide barcode, no Preservation Method)"
            rec.reason = f"slide kind {kind}; --slides {slides} takes {slides} slides only"
        else:
            wanted.append(rec)
    usable = _by_rank(wanted, sample_types, "slide")
    rank = {t: i for i, t in enumerate(sample_types)}
    by_case: dict[str, list[GdcFile]] = defaultdict(list)
    for rec in usable:
        by_case[rec.case].append(rec)
    chosen: dict[str, list[GdcFile]] = {}
    seen: dict[str, GdcFile] = {}
    for case, group in by_case.items():
        best = min(rank[r.type_code] for r in group)
        keep = []
        for rec in sorted(group, key=lambda r: (r.slide_id, r.file_name, r.file_id)):
            if rank[rec.type_code] != best:
                rec.reason = (f"slide of sample type {rec.type_code}; the patient's type-{sample_types[best]} "
                              "slides are used")
            elif rec.slide_id.casefold() in seen:
                other = seen[rec.slide_id.casefold()]
                rec.reason = f"duplicate: slide {rec.slide_id} is also file {other.file_id}, which is used"
            else:
                seen[rec.slide_id.casefold()] = rec
                keep.append(rec)
        chosen[case] = keep
    return chosen


# ----------------------------------------------------------------------------------------------------
# Clinical tables: labels and survival


def _id_column(df: pd.DataFrame, path: Path, given: str | None) -> str:
    if given:
        if given not in df.columns:
            raise GdcError(f"{path}: no column '{given}' (--clinical-id). Fix: name the table's patient column.")
        return given
    for name in CLINICAL_ID_COLUMNS:
        if name in df.columns:
            return name
    raise GdcError(f"{path}: no patient column ({', '.join(CLINICAL_ID_COLUMNS)}). Fix: give GDC's clinical.tsv "
                   "or the TCGA pan-cancer clinical table, or name the column with --clinical-id.")


def read_clinical(paths: Sequence[str | os.PathLike], id_column: str | None = None) -> pd.DataFrame:
    """All clinical tables stacked, one column ``case`` with the patient (a TCGA sample barcode counts for its
    patient, the first 12 characters); missing markers become ''."""
    frames = []
    for p in paths:
        df = _read_table(Path(p), skip_comments=True)
        ids = df[_id_column(df, Path(p), id_column)].map(lambda v: patient_of(v)[0].upper())
        df = df.assign(case=ids)
        frames.append(df.map(lambda v: "" if _missing(v) else str(v).strip()))
    return pd.concat(frames, ignore_index=True, sort=False).fillna("") if frames else pd.DataFrame({"case": []})


def _one_value(values: pd.Series) -> tuple[str, str]:
    """(value, problem) of one patient's rows: the single distinct non-empty value, or why there is none."""
    distinct = list(dict.fromkeys(v for v in values if v))
    if len(distinct) > 1:
        return "", "conflicting values " + ", ".join(repr(v) for v in distinct)
    return (distinct[0], "") if distinct else ("", "empty")


def clinical_labels(clinical: pd.DataFrame, column: str, paths: Sequence[str]) -> dict[str, tuple[str, str]]:
    """case -> (label, problem) from one clinical column."""
    if column not in clinical.columns:
        close = difflib.get_close_matches(column, [c for c in clinical.columns if c != "case"], n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise GdcError(f"--label column:{column}: no such column in {', '.join(paths)}{hint}. Fix: name a column "
                       "of the clinical table.")
    return {case: _one_value(group[column]) for case, group in clinical.groupby("case", sort=False)}


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if x == x and x >= 0 else None


def _days(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def clinical_survival(clinical: pd.DataFrame) -> dict[str, tuple[str, str]] | None:
    """case -> (time in days, event) from OS/OS.time or GDC's vital status; None when the table has neither."""
    cols = set(clinical.columns)

    def pick(*names: str) -> str:
        return next((n for n in names if n in cols), "")

    vital = pick("vital_status", "demographic.vital_status")
    if not ({"OS", "OS.time"} <= cols or vital):
        return None
    death = pick("days_to_death", "demographic.days_to_death")
    follow = pick("days_to_last_follow_up", "diagnoses.days_to_last_follow_up")
    out: dict[str, tuple[str, str]] = {}
    for case, group in clinical.groupby("case", sort=False):
        time = event = None
        if {"OS", "OS.time"} <= cols:
            os_event, _ = _one_value(group["OS"])
            times = [t for t in map(_number, group["OS.time"]) if t is not None]
            if os_event in ("0", "1", "0.0", "1.0") and times:
                event, time = int(float(os_event)), max(times)
        elif vital:
            status, _ = _one_value(group[vital].str.lower())
            source = death if status == "dead" else follow if status == "alive" else ""
            times = [t for t in map(_number, group[source])] if source else []
            times = [t for t in times if t is not None]
            if times:
                event, time = int(status == "dead"), max(times)
        out[case] = (_days(time), str(event)) if time is not None else ("", "")
    return out


# ----------------------------------------------------------------------------------------------------
# The sheet


@dataclass
class Result:
    """The sheet (absolute paths; ``label`` only with a label, ``time``/``event`` only with survival data) and
    the unplaced files (UNPLACED_COLUMNS), one row per file."""

    sheet: pd.DataFrame
    unplaced: pd.DataFrame


def build_sheet(listings: Sequence[str | os.PathLike], downloads: Sequence[str | os.PathLike], *,
                label: str | None = None, clinical: Sequence[str | os.PathLike] = (), slides: str = "diagnostic",
                sample_types: Sequence[str] = DEFAULT_SAMPLE_TYPES, clinical_id: str | None = None) -> Result:
    """The sample sheet (absolute paths) and the unplaced files; see the module docstring for the rules."""
    if slides not in SLIDE_CHOICES:
        raise GdcError(f"--slides {slides}: choose one of {', '.join(SLIDE_CHOICES)}")
    bad_types = [t for t in sample_types if not re.fullmatch(r"\d{2}", t)]
    if bad_types or not sample_types:
        raise GdcError(f"--sample-types {' '.join(sample_types)}: give two-digit TCGA codes such as 01 03 02 05 06")
    column = None
    if label is not None:
        if label == "project":
            pass
        elif label.startswith("column:") and label[len("column:"):]:
            column = label[len("column:"):]
            if not clinical:
                raise GdcError(f"--label {label} needs --clinical TABLE.tsv (GDC clinical.tsv or the pan-cancer table)")
        else:
            raise GdcError(f"--label {label}: use 'project' or 'column:NAME'")
    roots = [Path(d) for d in downloads]
    for root in roots:
        if not root.is_dir():
            raise GdcError(f"--downloads {root}: not a folder. Fix: give the folder gdc-client downloaded into.")

    records, unplaced = _merge([rec for path in listings for rec in read_listing(path)])
    placeable = []
    for rec in records:
        _locate(rec, roots)
        if not rec.reason:
            _identify(rec)
        (unplaced if rec.reason else placeable).append(rec)
    unplaced += _unlisted(roots, {r.file_id for r in records} | {r.file_id for r in unplaced})

    rna = _choose_rna([r for r in placeable if r.kind == "rna"], sample_types)
    slide_sets = _choose_slides([r for r in placeable if r.kind == "slide"], slides, sample_types)
    unplaced += [r for r in placeable if r.reason]
    cases = sorted(set(rna) | {c for c, v in slide_sets.items() if v})

    table = read_clinical(clinical, clinical_id) if clinical else None
    survival = clinical_survival(table) if table is not None else None
    labels: dict[str, tuple[str, str]] = {}
    if label == "project":
        for case in cases:
            files = [*slide_sets.get(case, []), *([rna[case]] if case in rna else [])]
            labels[case] = _one_value(pd.Series([f.project for f in files]))
    elif column is not None:
        from_table = clinical_labels(table, column, [str(p) for p in clinical])
        labels = {case: from_table.get(case.upper(), ("", "not in the clinical table")) for case in cases}

    rows = []
    for case in cases:
        files = [*slide_sets.get(case, []), *([rna[case]] if case in rna else [])]
        value = ""
        if label is not None:
            value, problem = labels[case]
            if not value:
                what = "project" if label == "project" else f"clinical column {column}"
                for f in files:
                    f.reason = f"no label for case {case}: {what} is {problem}"
                unplaced += files
                continue
        time, event = survival.get(case.upper(), ("", "")) if survival is not None else ("", "")
        expression = rna[case].path if case in rna else ""
        base = {"patient_id": case, "label": value, "expression_path": expression, "time": time, "event": event}
        for s in slide_sets.get(case, []):
            rows.append({**base, "slide_id": s.slide_id, "slide_path": s.path})
        if not slide_sets.get(case):
            rows.append({**base, "slide_id": "", "slide_path": ""})
    columns = ["patient_id", "slide_id", "slide_path", "label", "expression_path", "time", "event"]
    sheet = pd.DataFrame(rows, columns=columns)
    if label is None:
        sheet = sheet.drop(columns="label")
    if survival is None:
        sheet = sheet.drop(columns=["time", "event"])

    out = pd.DataFrame([{"file_id": r.file_id, "file_name": r.file_name, "kind": r.kind or _kind(r),
                         "case_id": r.case or ", ".join(r.cases), "sample_id": r.sample or ", ".join(r.samples),
                         "listed_in": r.listed_in, "path": r.path, "reason": r.reason} for r in unplaced],
                       columns=list(UNPLACED_COLUMNS))
    out = out.sort_values(["case_id", "file_name", "file_id"], kind="stable").reset_index(drop=True)
    return Result(sheet=sheet, unplaced=out)


def unplaced_path(out: str | os.PathLike) -> Path:
    """``samples.tsv`` -> ``samples.unplaced.tsv`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.unplaced.tsv")


def write_result(result: Result, out: str | os.PathLike, relative: bool = False) -> pd.DataFrame:
    """Write the sheet and the unplaced table atomically, then load the sheet as the pipeline will."""
    out = Path(out)
    sheet = result.sheet.copy()
    if relative:
        base = out.resolve().parent
        for col in ("slide_path", "expression_path"):
            sheet[col] = sheet[col].map(lambda p: os.path.relpath(p, base) if p else "")
    sep = "," if out.suffix.lower() == ".csv" else "\t"
    write_text(out, sheet.to_csv(sep=sep, index=False))
    write_text(unplaced_path(out), result.unplaced.to_csv(sep="\t", index=False))
    return load_sample_sheet(out)


def _summary(result: Result, loaded: pd.DataFrame, out: Path) -> str:
    n_pat = loaded["patient_id"].nunique()
    n_slides = int((loaded["slide_id"] != "").sum())
    n_rna = loaded.loc[loaded["expression_path"] != "", "patient_id"].nunique()
    lines = [f"{out}: {n_pat} patients, {n_slides} slides, {n_rna} patients with RNA"]
    if "label" in result.sheet.columns:
        counts = result.sheet.drop_duplicates("patient_id")["label"].value_counts().sort_index()
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if "time" in result.sheet.columns:
        n_surv = result.sheet.loc[result.sheet["time"] != "", "patient_id"].nunique()
        lines.append(f"survival (time, event): {n_surv} of {n_pat} patients")
    lines.append(f"{unplaced_path(out)}: {len(result.unplaced)} files not placed")
    short = result.unplaced["reason"].str.replace(r"[:(;].*", "", regex=True).str.strip()
    lines += [f"  {v:5d}  {k}" for k, v in short.value_counts().items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wsiomics.gdc sheet ...``: GDC portal sample sheets + gdc-client downloads -> samples.tsv."""
    parser = argparse.ArgumentParser(prog="python -m wsiomics.gdc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sheet", help="write samples.tsv and samples.unplaced.tsv from GDC downloads")
    p.add_argument("--sample-sheet", nargs="+", required=True, metavar="TSV",
                   help="GDC portal sample sheets (classic or newer layout) and/or gdc-client manifests")
    p.add_argument("--downloads", nargs="+", required=True, metavar="DIR",
                   help="folders gdc-client downloaded into (<file id>/<file name>)")
    p.add_argument("--out", required=True, help="the sample sheet to write (unplaced files go beside it)")
    p.add_argument("--label", help="'project' (e.g. TCGA-LUAD vs TCGA-LUSC) or 'column:NAME' of --clinical")
    p.add_argument("--clinical", nargs="+", default=[], metavar="TSV",
                   help="GDC clinical.tsv or the TCGA pan-cancer clinical table: labels and survival")
    p.add_argument("--clinical-id", metavar="COLUMN",
                   help=f"patient column of --clinical (default: the first of {', '.join(CLINICAL_ID_COLUMNS)})")
    p.add_argument("--slides", choices=SLIDE_CHOICES, default="diagnostic",
                   help="diagnostic FFPE (-DX, default), frozen (-TS/-BS/-MS) or all")
    p.add_argument("--sample-types", nargs="+", default=list(DEFAULT_SAMPLE_TYPES), metavar="CODE",
                   help="TCGA sample types by preference; keep equal to the config's expression.sample_types "
                        f"(default: {' '.join(DEFAULT_SAMPLE_TYPES)})")
    p.add_argument("--relative", action="store_true", help="write paths relative to the sheet's folder")
    args = parser.parse_args(argv)
    try:
        result = build_sheet(args.sample_sheet, args.downloads, label=args.label, clinical=args.clinical,
                             slides=args.slides, sample_types=args.sample_types, clinical_id=args.clinical_id)
        if result.sheet.empty:  # an empty sheet would only fail later: say why, and leave just the reasons
            write_text(unplaced_path(args.out), result.unplaced.to_csv(sep="\t", index=False))
            raise GdcError(f"no file could be placed, so {args.out} was not written; every file and its reason is "
                           f"in {unplaced_path(args.out)}")
        loaded = write_result(result, args.out, relative=args.relative)
    except (GdcError, SampleSheetError) as exc:
        print(f"wsiomics.gdc: {exc}", file=sys.stderr)
        return 1
    print(_summary(result, loaded, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
