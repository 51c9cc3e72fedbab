"""Readers for expression inputs, and the gene-ID and sample-barcode rules every reader shares.

Three inputs are understood:

* GDC STAR ``augmented_star_gene_counts`` TSVs, one per patient: a ``# gene-model`` comment, a 9-column
  header, four ``N_*`` STAR summary rows, then one row per gene;
* a cohort-wide matrix (TSV, or CSV by suffix, optionally gzipped) in either orientation, e.g. a UCSC
  Xena ``HiSeqV2`` file (genes x samples, log2(x+1)-normalised);
* an ``.h5ad`` file (samples x genes).

Every problem is an :class:`ExpressionInputError` that names the file and, where there is one, the line
(1-based, as an editor shows it), so a user can go straight to the bad cell.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

GDC_COLUMNS = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
               "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")
#: GDC value column -> what its numbers are.
GDC_VALUE_KINDS = {"unstranded": "counts", "stranded_first": "counts", "stranded_second": "counts",
                   "tpm_unstranded": "tpm", "fpkm_unstranded": "fpkm", "fpkm_uq_unstranded": "fpkm"}
#: What a matrix may hold: raw counts, length-normalised abundances, or values already log-normalised.
VALUE_KINDS = ("counts", "tpm", "fpkm", "log")
DUPLICATE_POLICIES = ("error", "sum", "mean", "first")
ORIENTATIONS = ("auto", "genes_by_samples", "samples_by_genes")

#: Ensembl gene ID with its version: ENSG00000141510.18 -> ENSG00000141510 (any species prefix).
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*G\d{11})\.\d+$")
#: TCGA barcode: TCGA-TSS-PART[-TYPE VIAL[-PORTION ANALYTE[-PLATE-CENTER]]]; patient = first 12 characters.
_TCGA = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?:-(\d{2})([A-Z])?(?:-.*)?)?$", re.IGNORECASE)


class ExpressionInputError(ValueError):
    """An expression input is unusable; the message names the file (and line) and the fix."""


def where(path: str | os.PathLike, line: int | None = None) -> str:
    return f"{os.fspath(path)}, line {line}" if line is not None else os.fspath(path)


def _line(first_line: int | None, i: int) -> int | None:
    return None if first_line is None else first_line + i


# ----------------------------------------------------------------------------------------------------
# Gene identifiers


def strip_version(ids: pd.Index | np.ndarray) -> np.ndarray:
    """Drop Ensembl version suffixes (``ENSG00000141510.18`` -> ``ENSG00000141510``); other IDs unchanged."""
    return pd.Index(ids).astype(str).str.replace(_ENSEMBL_VERSION, r"\1", regex=True).to_numpy(dtype=object)


@dataclass(frozen=True)
class GenePlan:
    """How raw rows of a file become the harmonised genes: which rows, and which of them are summed.

    Built once per distinct gene column and applied to every file that has the same one, so a cohort of
    GDC files from one release is harmonised once, not a thousand times.
    """

    genes: pd.DataFrame  # index: harmonised gene ID; columns gene_name, gene_type
    rows: np.ndarray  # raw row indices, in output order (duplicates adjacent)
    combine: sp.csr_matrix | None  # (len(rows) x n_genes) 0/1 (or 1/n for mean) matrix; None: one row each
    report: dict[str, int]

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Raw values (n_raw,) or (n_samples, n_raw) -> harmonised values (..., n_genes)."""
        taken = values[..., self.rows]
        if self.combine is None:
            return taken
        out = taken @ self.combine if taken.ndim == 2 else self.combine.T @ taken
        return np.asarray(out)


def plan_genes(path: str | os.PathLike, ids: np.ndarray, names: np.ndarray | None, types: np.ndarray | None, *,
               gene_types: tuple[str, ...] = (), duplicates: str = "error", first_line: int | None = 2) -> GenePlan:
    """Harmonise one file's gene column: drop ``N_*`` STAR rows and ``_PAR_Y`` copies, strip Ensembl
    versions, keep only ``gene_types`` (when given), and resolve duplicated IDs by ``duplicates``.

    ``first_line`` is the file line of raw row 0, for error messages (None: rows are not lines).
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_POLICIES}, not {duplicates!r}")
    raw = pd.Index(ids).astype(str)
    names = np.asarray(raw if names is None else names, dtype=object)
    types_known = types is not None
    types = np.asarray(types if types_known else np.full(len(raw), ""), dtype=object)
    report = {"raw_rows": len(raw)}

    keep = ~raw.str.startswith("N_")  # STAR summary rows (N_unmapped, N_multimapping, ...)
    report["star_summary_rows"] = int((~keep).sum())
    par_y = raw.str.endswith("_PAR_Y")  # GENCODE's Y copies of pseudo-autosomal genes (all zero in GDC)
    report["par_y_rows"] = int((par_y & keep).sum())
    keep &= ~par_y
    empty = raw.str.strip() == ""
    if (empty & keep).any():
        i = int(np.flatnonzero(empty & keep)[0])
        raise ExpressionInputError(
            f"{where(path, _line(first_line, i))}: empty gene ID (gene {i + 1}). Fix: give every row a gene ID.")
    if gene_types:
        if not types_known:
            raise ExpressionInputError(
                f"{where(path)}: expression.gene_types is set but this file has no gene_type column. Fix: give "
                "expression.gene_annotation (a TSV with gene_id and gene_type) or clear expression.gene_types.")
        wanted = np.isin(types, list(gene_types))
        report["gene_type_filtered"] = int((keep & ~wanted).sum())
        keep &= wanted
    rows = np.flatnonzero(keep)
    stripped = strip_version(raw[rows])

    codes, uniques = pd.factorize(stripped)
    n_genes = len(uniques)
    report["duplicate_rows"] = len(rows) - n_genes
    combine = None
    if n_genes < len(rows):
        counts = np.bincount(codes)
        if duplicates == "error":
            dup = np.flatnonzero(counts[codes] > 1)
            shown = ", ".join(f"'{stripped[i]}'" + (f" (line {first_line + rows[i]})" if first_line else "")
                              for i in dup[:6])
            more = f" and {len(dup) - 6} more" if len(dup) > 6 else ""
            raise ExpressionInputError(
                f"{where(path)}: {len(rows) - n_genes} duplicated gene IDs after removing versions: {shown}{more}. "
                "Fix: set expression.duplicates to sum, mean or first (or de-duplicate the file).")
        order = np.argsort(codes, kind="stable")  # group duplicates, output in first-appearance order
        rows, codes = rows[order], codes[order]
        if duplicates == "first":
            first = np.r_[True, codes[1:] != codes[:-1]]
            rows, codes = rows[first], codes[first]
        else:
            weight = 1.0 / counts[codes] if duplicates == "mean" else np.ones(len(codes))
            combine = sp.csr_matrix((weight, (np.arange(len(codes)), codes)), shape=(len(codes), n_genes))
    first_row = rows[np.r_[True, codes[1:] != codes[:-1]]] if len(rows) else rows
    genes = pd.DataFrame({"gene_name": names[first_row].astype(str), "gene_type": types[first_row].astype(str)},
                         index=pd.Index(np.asarray(uniques, dtype=str), name="gene_id"))
    return GenePlan(genes=genes, rows=rows, combine=combine, report=report)


# ----------------------------------------------------------------------------------------------------
# GDC STAR files


@dataclass
class GdcFile:
    """One GDC STAR file as read: raw gene column (one string, joined, for cheap comparison) and values."""

    path: str
    ids: str  # raw gene IDs joined with "\n": equal strings = identical gene columns
    values: np.ndarray  # float64 (n_raw,)
    first_line: int  # file line of raw row 0

    def id_array(self) -> np.ndarray:
        return np.asarray(self.ids.split("\n"), dtype=object)


def _comment_lines(path: Path) -> int:
    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith("#"):
                break
            n += 1
    return n


def _bad_numbers(path: Path, cells: pd.Series, first_line: int, column: str, *, counts: bool,
                 allow_negative: bool = False) -> None:
    """``cells``: one column (row i at file line first_line + i); ``column`` describes it for the message."""
    """Raise naming the first non-numeric, missing, negative or (for counts) fractional value."""
    numbers = pd.to_numeric(cells, errors="coerce")
    text = cells.astype(str).str.strip() if cells.dtype == object else None
    checks = []
    if text is not None:
        checks.append((numbers.isna() & text.ne("") & ~text.str.lower().isin(["nan", "na"]), "is not a number"))
    checks.append((numbers.isna(), "is missing (empty or NaN)"))
    if not allow_negative:
        checks.append((numbers < 0, "is negative"))
    checks.append((~np.isfinite(numbers.fillna(0)), "is infinite"))
    if counts:
        checks.append(((numbers % 1) != 0, "is not a whole number, but the column holds counts"))
    for bad, what in checks:
        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            value = cells.iloc[i]
            more = f" ({int(bad.sum()) - 1} more such values)" if bad.sum() > 1 else ""
            raise ExpressionInputError(
                f"{where(path, first_line + i)}: value '{value}' in {column} {what}{more}. "
                "Fix: re-download or correct the file.")


def gdc_first_line(path: str | os.PathLike) -> int:
    """File line of the first data row (after the comment lines and the header)."""
    return _comment_lines(Path(path)) + 2


def _all_valid(values: np.ndarray, *, counts: bool, allow_negative: bool) -> bool:
    if not np.isfinite(values).all():
        return False
    if not allow_negative and (values < 0).any():
        return False
    return not (counts and (values % 1 != 0).any())


def read_gdc_star(path: str | os.PathLike, column: str = "unstranded") -> GdcFile:
    """Read one GDC STAR ``augmented_star_gene_counts`` TSV: gene IDs and the ``column`` values.

    The header must be GDC's 9 columns in order. ``N_*`` summary rows stay in (``plan_genes`` drops
    them), so line numbers of raw rows are exact.
    """
    path = Path(path)
    if column not in GDC_VALUE_KINDS:
        raise ValueError(f"GDC column must be one of {', '.join(GDC_VALUE_KINDS)}, not {column!r}")
    if not path.is_file():
        raise ExpressionInputError(f"{where(path)}: no such file. Fix: correct expression_path in the sample sheet.")
    skip = _comment_lines(path)
    header_line = skip + 1
    with open(path, encoding="utf-8", errors="replace") as f:
        for _ in range(skip):
            f.readline()
        header = f.readline().rstrip("\r\n").split("\t")
    if tuple(header) != GDC_COLUMNS:
        raise ExpressionInputError(
            f"{where(path, header_line)}: header is {header[:10]!r}, expected the GDC STAR layout "
            f"{list(GDC_COLUMNS)!r}. Fix: give the augmented_star_gene_counts TSV as downloaded from GDC "
            "(for other layouts use expression.matrix).")
    first_line = header_line + 1
    try:
        df = pd.read_csv(path, sep="\t", skiprows=skip, usecols=["gene_id", column], engine="c",
                         dtype={"gene_id": str}, na_filter=True, keep_default_na=True)
    except (pd.errors.ParserError, ValueError) as exc:
        raise ExpressionInputError(f"{where(path)}: not a well-formed TSV ({str(exc).strip()}). "
                                   "Fix: re-download the file.") from None
    if df.empty:
        raise ExpressionInputError(f"{where(path, first_line)}: no gene rows. Fix: re-download the file.")
    ids = df["gene_id"].fillna("")
    values = df[column]
    counts = GDC_VALUE_KINDS[column] == "counts"
    arr = values.to_numpy(dtype=np.float64, na_value=np.nan) if pd.api.types.is_numeric_dtype(values) else None
    if arr is None or not _all_valid(arr, counts=counts, allow_negative=False):
        # Only now find the N_* rows (their TPM/FPKM cells are empty by design): a string scan of every
        # gene ID would cost a third of the read time of a valid file.
        bad = np.arange(len(ids)) if arr is None else np.flatnonzero(
            ~np.isfinite(arr) | (arr < 0) | ((arr % 1 != 0) if counts else False))
        summary = ids.iloc[bad].str.startswith("N_").to_numpy()
        if arr is None or not summary.all():
            cells = values.astype(object).copy()
            cells.iloc[bad[summary]] = 0
            _bad_numbers(path, cells, first_line, f"column '{column}'", counts=counts)
    return GdcFile(path=str(path), ids="\n".join(ids.tolist()), values=arr, first_line=first_line)


def read_gdc_meta(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gene_id, gene_name, gene_type columns of a GDC file (read once, from the reference file)."""
    skip = _comment_lines(Path(path))
    df = pd.read_csv(path, sep="\t", skiprows=skip, usecols=["gene_id", "gene_name", "gene_type"], dtype=str,
                     keep_default_na=False, engine="c")
    return df["gene_id"].to_numpy(object), df["gene_name"].to_numpy(object), df["gene_type"].to_numpy(object)


# ----------------------------------------------------------------------------------------------------
# Cohort-wide matrices


@dataclass
class Matrix:
    """A cohort matrix as read: samples x raw genes, with the file line of every gene and sample."""

    path: str
    samples: pd.Index
    ids: np.ndarray
    names: np.ndarray | None
    types: np.ndarray | None
    values: np.ndarray  # float64 (n_samples, n_raw)
    gene_lines: np.ndarray | None  # file line of each gene (genes x samples layout), else None
    first_line: int | None  # file line of gene 0 when genes are rows


def _separator(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    return "," if ".csv" in suffixes else "\t"


def read_matrix_table(path: str | os.PathLike, orientation: str, sample_ids: set[str] | None, *,
                      value_kind: str) -> Matrix:
    """Read a wide TSV/CSV matrix; ``orientation`` ``auto`` picks the axis whose labels map to patients.

    The first column holds row labels; the header holds column labels (its first cell is ignored, e.g.
    Xena's ``sample``). Values must be numeric and never NaN; negative values are refused unless the
    values are already log-normalised (``value_kind == "log"``).
    """
    path = Path(path)
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}")
    if not path.is_file():
        raise ExpressionInputError(f"{where(path)}: no such file. Fix: correct expression.matrix.")
    sep = _separator(path)
    try:
        df = pd.read_csv(path, sep=sep, index_col=0, engine="c", comment=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, UnicodeDecodeError) as exc:
        raise ExpressionInputError(f"{where(path)}: not a well-formed {'CSV' if sep == ',' else 'TSV'} matrix "
                                   f"({str(exc).strip()}). Fix: one header line, row labels in column 1.") from None
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise ExpressionInputError(f"{where(path, 1)}: the matrix has no data rows or no data columns. "
                                   "Fix: one header line of column labels, then one row per gene or sample.")
    with open(path, encoding="utf-8", errors="replace") as f:  # pandas renames repeated names: read them
        header = next(csv.reader(f, delimiter=sep))
    if len(header) == df.shape[1] + 1:
        df.columns = [h.strip() for h in header[1:]]
    rows, cols = df.index.astype(str).str.strip(), df.columns.astype(str)
    df.index = rows
    if orientation == "auto":
        orientation = _guess_orientation(path, rows, cols, sample_ids)
    dup = pd.Index(cols).duplicated()
    if dup.any():
        j = int(np.flatnonzero(dup)[0])
        raise ExpressionInputError(f"{where(path, 1)}: column label '{cols[j]}' appears twice (column {j + 2}). "
                                   "Fix: keep one column per sample (or gene).")
    for j, col in enumerate(df.columns):
        cells = df.iloc[:, j]
        if not pd.api.types.is_numeric_dtype(cells) or not _all_valid(
                cells.to_numpy(np.float64, na_value=np.nan), counts=False, allow_negative=value_kind == "log"):
            _bad_numbers(path, cells.astype(object), 2, f"column '{col}' (column {j + 2})", counts=False,
                         allow_negative=value_kind == "log")
    values = df.to_numpy(dtype=np.float64)
    if orientation == "genes_by_samples":
        samples, gene_ids, values, gene_lines = cols, rows, values.T, np.arange(len(rows)) + 2
    else:
        samples, gene_ids, gene_lines = rows, cols, None
    _check_unique(path, pd.Index(samples), "sample", rows_are_samples=orientation == "samples_by_genes")
    if value_kind == "counts" and (values % 1 != 0).any():
        s, g = map(int, np.argwhere(values % 1 != 0)[0])
        line = int(gene_lines[g]) if gene_lines is not None else s + 2
        raise ExpressionInputError(
            f"{where(path, line)}: value {values[s, g]!r} (gene '{gene_ids[g]}', sample '{samples[s]}') is not a "
            "whole number, but expression.matrix_values is counts. Fix: set matrix_values to tpm, fpkm or log.")
    return Matrix(path=str(path), samples=pd.Index(samples), ids=np.asarray(gene_ids, dtype=object), names=None,
                  types=None, values=values, gene_lines=gene_lines,
                  first_line=2 if orientation == "genes_by_samples" else None)


def _check_unique(path: Path, samples: pd.Index, what: str, *, rows_are_samples: bool | None) -> None:
    dup = samples.duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        at = None if rows_are_samples is None else (i + 2 if rows_are_samples else 1)
        raise ExpressionInputError(f"{where(path, at)}: {what} '{samples[i]}' appears twice. "
                                   "Fix: keep one column/row per sample.")


def _guess_orientation(path: Path, rows: pd.Index, cols: pd.Index, sample_ids: set[str] | None) -> str:
    """Samples are on the axis whose labels map to sheet patients (or look like TCGA barcodes)."""
    def hits(labels: pd.Index) -> int:
        pats = {patient_of(x)[0] for x in labels}
        return len(pats & sample_ids) if sample_ids is not None else sum(bool(_TCGA.match(x)) for x in labels)

    r, c = hits(rows), hits(cols)
    if r == c == 0:
        raise ExpressionInputError(
            f"{where(path)}: neither the row labels (e.g. {list(rows[:2])}) nor the column labels (e.g. "
            f"{list(cols[:2])}) match any patient of the sample sheet. Fix: label samples with TCGA barcodes or "
            "the sheet's patient_id, or set expression.matrix_orientation.")
    return "genes_by_samples" if c >= r else "samples_by_genes"


def read_h5ad(path: str | os.PathLike, layer: str = "", *, value_kind: str) -> Matrix:
    """An ``.h5ad`` (samples x genes): values from ``layer`` (empty: X); gene_name/gene_type from var if there."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise ExpressionInputError(f"{where(path)}: no such file. Fix: correct expression.matrix.")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a damaged file
        raise ExpressionInputError(f"{where(path)}: cannot be read as .h5ad ({exc}).") from None
    if layer and layer not in adata.layers:
        raise ExpressionInputError(f"{where(path)}: no layer '{layer}' (layers: {list(adata.layers)}). "
                                   "Fix: set expression.h5ad_layer to one of them, or empty for X.")
    x = adata.layers[layer] if layer else adata.X
    if x is None:
        raise ExpressionInputError(f"{where(path)}: X is empty. Fix: set expression.h5ad_layer.")
    values = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    label = f"layer '{layer}'" if layer else "X"
    bad = ~np.isfinite(values)
    if value_kind != "log":
        bad |= values < 0
    if value_kind == "counts":
        bad |= (values % 1) != 0
    if bad.any():
        s, g = map(int, np.argwhere(bad)[0])
        raise ExpressionInputError(
            f"{where(path)}: {label}[{s}, {g}] (sample '{adata.obs_names[s]}', gene '{adata.var_names[g]}') = "
            f"{values[s, g]!r} is NaN, infinite, negative or not a whole count ({int(bad.sum())} such values). "
            "Fix: correct the file or expression.matrix_values.")
    _check_unique(path, pd.Index(adata.obs_names), "sample (obs name)", rows_are_samples=None)
    var = adata.var
    names = var["gene_name"].astype(str).to_numpy(object) if "gene_name" in var else None
    types = var["gene_type"].astype(str).to_numpy(object) if "gene_type" in var else None
    return Matrix(path=str(path), samples=pd.Index(adata.obs_names.astype(str)),
                  ids=np.asarray(adata.var_names.astype(str), dtype=object), names=names, types=types, values=values,
                  gene_lines=None, first_line=None)


# ----------------------------------------------------------------------------------------------------
# Sample barcodes -> patients


def patient_of(sample: str) -> tuple[str, str, str]:
    """(patient, sample type code, vial) of a sample label.

    TCGA barcodes map to their first 12 characters (``TCGA-A1-A0SB-01A-11R-A144-07`` -> ``TCGA-A1-A0SB``,
    type ``01``, vial ``A``); any other label is taken as a patient ID as it is (type and vial empty).
    """
    m = _TCGA.match(sample.strip())
    if not m:
        return sample.strip(), "", ""
    return m.group(1).upper(), m.group(2) or "", (m.group(3) or "").upper()


def choose_samples(samples: pd.Index, patients: set[str], sample_types: tuple[str, ...]) -> pd.DataFrame:
    """One sample per patient, by a fixed rule.

    Rule: a label equal to a patient ID is that patient's sample. Otherwise a TCGA barcode belongs to the
    patient named by its first 12 characters; among a patient's samples the one whose type code comes
    first in ``sample_types`` wins (default ``01`` primary solid tumour, then ``03``, ``02``, ``05``,
    ``06``), then vial A before B, then the lexicographically smallest barcode. Samples of a type not
    listed (e.g. ``11`` solid tissue normal) are never used.

    Returns one row per sample label: patient_id ('' when unmatched), sample_type, chosen, reason.
    """
    rank = {t: i for i, t in enumerate(sample_types)}
    records = []
    for label in samples:
        label = str(label)
        if label in patients:
            records.append((label, label, "", "", 0))
            continue
        pid, stype, vial = patient_of(label)
        if pid not in patients or not stype:
            records.append((label, "", stype, vial, 0))
        else:
            records.append((label, pid, stype, vial, rank.get(stype, -1)))
    df = pd.DataFrame.from_records(records, columns=["sample", "patient_id", "sample_type", "vial", "rank"])
    df["chosen"] = False
    df["reason"] = np.where(df["patient_id"] == "", "no patient of the sample sheet", "")
    usable = (df["patient_id"] != "") & (df["rank"] >= 0)
    df.loc[(df["patient_id"] != "") & (df["rank"] < 0), "reason"] = "sample type not in expression.sample_types"
    ordered = df[usable].sort_values(["patient_id", "rank", "vial", "sample"], kind="stable")
    winners = ordered.drop_duplicates("patient_id", keep="first").index
    df.loc[winners, "chosen"] = True
    losers = usable & ~df["chosen"]
    df.loc[losers, "reason"] = "another sample of the patient ranks first"
    return df.drop(columns="rank")
