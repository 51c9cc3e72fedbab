"""The cohort expression table: one AnnData (patients x genes) of raw values, written as zarr.

Inputs are either the sample sheet's per-patient ``expression_path`` files (GDC STAR) or one cohort-wide
``expression.matrix`` (TSV/CSV or .h5ad), never both. Raw values go to ``layers['counts']`` (counts) or
``layers['raw']`` (TPM, FPKM, log values); X is left empty, because the cohort table is never modelled
directly: every fold normalises it with parameters fitted on its own training patients.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from wsiomics.expression.readers import (
    DUPLICATE_POLICIES,
    GDC_VALUE_KINDS,
    ORIENTATIONS,
    VALUE_KINDS,
    ExpressionInputError,
    GdcFile,
    choose_samples,
    gdc_first_line,
    plan_genes,
    read_gdc_meta,
    read_gdc_star,
    read_h5ad,
    read_matrix_table,
    strip_version,
)
from wsiomics.io import atomic_path, json_safe, provenance
from wsiomics.samples import patients as patient_table

log = logging.getLogger("wsiomics.expression")

#: Default sample-type preference: primary solid tumour, primary blood cancer, recurrent, new primary, metastatic.
DEFAULT_SAMPLE_TYPES = ("01", "03", "02", "05", "06")
ANNOTATION_COLUMNS = ("gene_name", "gene_type", "chromosome", "start")


@dataclass(frozen=True)
class CohortParams:
    """What to read and how; field names are the ``expression:`` config keys of the cohort rule."""

    matrix: str = ""  # cohort-wide TSV/CSV/.h5ad instead of the sheet's expression_path files
    matrix_orientation: str = "auto"  # auto | genes_by_samples | samples_by_genes
    matrix_values: str = "counts"  # counts | tpm | fpkm | log: what the matrix numbers are
    h5ad_layer: str = ""  # .h5ad layer with the values ("" = X)
    gdc_column: str = "unstranded"  # GDC STAR value column
    gene_types: tuple[str, ...] = ()  # keep only these gene types (empty: all)
    duplicates: str = "error"  # error | sum | mean | first, for gene IDs repeated after version stripping
    sample_types: tuple[str, ...] = DEFAULT_SAMPLE_TYPES  # TCGA sample-type codes, most preferred first
    gene_annotation: str = ""  # TSV: gene_id + any of gene_name, gene_type, chromosome, start
    strict: bool = False  # gene sets differing between files, or unmatched samples, are errors

    def __post_init__(self) -> None:
        checks = [("matrix_orientation", ORIENTATIONS), ("matrix_values", VALUE_KINDS),
                  ("gdc_column", tuple(GDC_VALUE_KINDS)), ("duplicates", DUPLICATE_POLICIES)]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"expression.{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")

    @property
    def value_kind(self) -> str:
        return self.matrix_values if self.matrix else GDC_VALUE_KINDS[self.gdc_column]


# ----------------------------------------------------------------------------------------------------
# GDC files


def _read_one(args: tuple[str, str]) -> GdcFile:
    return read_gdc_star(*args)


def read_gdc_files(paths: list[str], column: str, threads: int = 1) -> Iterable[GdcFile]:
    """Read files in order, in ``threads`` processes (parsing is CPU-bound, so threads would not help)."""
    from tqdm import tqdm

    jobs = [(p, column) for p in paths]
    bar = dict(total=len(jobs), desc="expression files", unit="file", mininterval=5, disable=None)
    if threads <= 1 or len(jobs) < 8:
        yield from tqdm(map(_read_one, jobs), **bar)
        return
    with ProcessPoolExecutor(threads) as pool:
        yield from tqdm(pool.map(_read_one, jobs, chunksize=max(1, min(32, len(jobs) // (4 * threads)))), **bar)


def _annotation_types(annotation: pd.DataFrame | None, ids: np.ndarray) -> np.ndarray | None:
    if annotation is None or "gene_type" not in annotation:
        return None
    return annotation["gene_type"].reindex(strip_version(ids)).fillna("").to_numpy(object)


def gdc_cohort(pts: pd.DataFrame, params: CohortParams, annotation: pd.DataFrame | None,
               threads: int) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, dict]:
    """Read every patient's GDC file; returns (obs, values patients x genes, var, report)."""
    with_expr = pts[pts["has_expression"]]
    paths = with_expr["expression_path"].tolist()
    read_gdc_star(paths[0], params.gdc_column)  # header and values checked before its gene columns are trusted
    ids_meta = read_gdc_meta(paths[0])
    ref_plan = plan_genes(paths[0], *ids_meta, gene_types=params.gene_types, duplicates=params.duplicates,
                          first_line=gdc_first_line(paths[0]))
    genes = ref_plan.genes.index
    # Filled in place (one row per file): the cohort matrix is held once, not once more as a list of rows.
    values = np.empty((len(paths), len(genes)), dtype=np.float64)
    ref_ids: str | None = None
    other: dict[str, pd.Index] = {}  # files whose gene column differs from the first file's: their genes
    for i, f in enumerate(read_gdc_files(paths, params.gdc_column, threads)):
        if ref_ids is None:
            ref_ids = f.ids
        if f.ids == ref_ids:  # identical gene column (the usual case): the reference plan applies
            values[i] = ref_plan.apply(f.values)
            continue
        ids, names, types = read_gdc_meta(f.path)
        plan = plan_genes(f.path, ids, names, types, gene_types=params.gene_types, duplicates=params.duplicates,
                          first_line=f.first_line)
        values[i] = pd.Series(plan.apply(f.values), index=plan.genes.index).reindex(genes).to_numpy()
        other[f.path] = plan.genes.index
    common = genes
    for own in other.values():
        common = common[common.isin(own)]
    report: dict = {"files": len(paths), "gene_plan": ref_plan.report}
    if other:
        details = [f"{path}: {len(genes.difference(own))} genes of the first file missing, "
                   f"{len(own.difference(genes))} extra" for path, own in other.items()]
        msg = (f"{len(other)} of {len(paths)} expression files have a different gene set from the first "
               f"({paths[0]}); {len(genes) - len(common)} genes not in every file")
        if params.strict:
            raise ExpressionInputError(f"{msg}:\n  " + "\n  ".join(details) +
                                       "\nFix: use files of one GENCODE release, or set strict: false to keep "
                                       "the genes every file has.")
        log.warning("%s are dropped:\n  %s", msg, "\n  ".join(details))
        report["genes_dropped_not_in_every_file"] = int(len(genes) - len(common))
        report["files_with_other_genes"] = sorted(other)
        values = values[:, genes.get_indexer(common)]
    obs = pd.DataFrame({"sample": [Path(p).name for p in paths], "sample_type": "", "source": paths},
                       index=with_expr.index)
    return obs, values, ref_plan.genes.loc[common], report


# ----------------------------------------------------------------------------------------------------
# Cohort-wide matrix


def matrix_cohort(pts: pd.DataFrame, params: CohortParams,
                  annotation: pd.DataFrame | None) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, dict]:
    """Read the matrix, map its samples to sheet patients (one sample each), harmonise its genes."""
    path = params.matrix
    patients = set(pts.index)
    if path.lower().endswith(".h5ad"):
        m = read_h5ad(path, params.h5ad_layer, value_kind=params.matrix_values)
    else:
        m = read_matrix_table(path, params.matrix_orientation, patients, value_kind=params.matrix_values)
    chosen = choose_samples(m.samples, patients, params.sample_types)
    unmatched = chosen[chosen["patient_id"] == ""]["sample"].tolist()
    report: dict = {"samples_in_file": len(m.samples), "samples_without_patient": len(unmatched)}
    if chosen["chosen"].sum() == 0:
        raise ExpressionInputError(
            f"{path}: none of its {len(m.samples)} samples (e.g. {list(m.samples[:3])}) matches a patient of the "
            "sample sheet. Fix: label samples with TCGA barcodes (patient = first 12 characters) or exactly the "
            "sheet's patient_id, and check matrix_orientation and sample_types.")
    if unmatched:
        msg = (f"{path}: {len(unmatched)} of {len(m.samples)} samples match no patient of the sample sheet "
               f"(e.g. {unmatched[:5]})")
        if params.strict:
            raise ExpressionInputError(msg + ". Fix: remove them from the matrix, add the patients to the sheet, "
                                       "or set strict: false to ignore them.")
        log.warning("%s; they are ignored", msg)
    skipped = chosen[(chosen["patient_id"] != "") & ~chosen["chosen"]]
    for row in skipped.itertuples():
        log.info("%s: sample %s of %s not used: %s", path, row.sample, row.patient_id, row.reason)
    win = chosen[chosen["chosen"]]
    order = [p for p in pts.index if p in set(win["patient_id"])]  # sheet order
    win = win.set_index("patient_id").loc[order]
    rows = m.samples.get_indexer(win["sample"])
    types = m.types if m.types is not None else _annotation_types(annotation, m.ids)
    plan = plan_genes(path, m.ids, m.names, types, gene_types=params.gene_types, duplicates=params.duplicates,
                      first_line=m.first_line)
    values = plan.apply(m.values[rows])
    report.update({"gene_plan": plan.report, "samples_not_used": skipped[["sample", "patient_id", "reason"]]
                   .to_dict("list"), "samples_without_patient_list": unmatched[:1000]})
    obs = pd.DataFrame({"sample": win["sample"].to_numpy(), "sample_type": win["sample_type"].to_numpy(),
                        "source": path}, index=pd.Index(order))
    return obs, values, plan.genes, report


# ----------------------------------------------------------------------------------------------------
# The table


def read_annotation(path: str) -> pd.DataFrame | None:
    """Optional gene annotation TSV (gene_id + gene_name/gene_type/chromosome/start), keyed by unversioned ID."""
    if not path:
        return None
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ExpressionInputError(f"{path}: cannot read the gene annotation ({exc}).") from None
    if "gene_id" not in df.columns or not set(df.columns) & set(ANNOTATION_COLUMNS):
        raise ExpressionInputError(f"{path}, line 1: header {list(df.columns)} needs gene_id and at least one of "
                                   f"{', '.join(ANNOTATION_COLUMNS)}. Fix: tab-separated with a header line.")
    if "start" in df:
        bad = pd.to_numeric(df["start"].replace("", np.nan), errors="coerce").isna() & df["start"].ne("")
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ExpressionInputError(f"{path}, line {i + 2}: start {df['start'].iloc[i]!r} is not a number.")
    df["gene_id"] = strip_version(df["gene_id"])
    return df.drop_duplicates("gene_id").set_index("gene_id")[[c for c in ANNOTATION_COLUMNS if c in df.columns]]


def build_cohort(sheet: pd.DataFrame, params: CohortParams, threads: int = 1) -> ad.AnnData:
    """The patients x genes AnnData of raw values for every sheet patient with expression."""
    pts = patient_table(sheet)
    from_sheet = bool(pts["has_expression"].any())
    if params.matrix and from_sheet:
        rows = sheet.loc[sheet["expression_path"] != "", "row"].tolist()
        raise ExpressionInputError(
            f"two expression sources: expression.matrix ({params.matrix}) and expression_path in the sample sheet "
            f"(rows {', '.join(map(str, rows[:8]))}{' ...' if len(rows) > 8 else ''}). Fix: use one of them.")
    if not params.matrix and not from_sheet:
        raise ExpressionInputError("no expression input: the sample sheet has no expression_path and "
                                   "expression.matrix is empty. Fix: give one of them.")
    annotation = read_annotation(params.gene_annotation)
    if params.matrix:
        obs, values, var, report = matrix_cohort(pts, params, annotation)
    else:
        obs, values, var, report = gdc_cohort(pts, params, annotation, threads)
    if values.shape[1] == 0:
        raise ExpressionInputError(f"no genes left after harmonisation ({report['gene_plan']}). Fix: check "
                                   "expression.gene_types and the files' gene columns.")
    if annotation is not None:
        for col in annotation.columns:
            filled = annotation[col].reindex(var.index).fillna("")
            var[col] = filled if col not in var or col == "chromosome" or col == "start" else \
                var[col].where(var[col] != "", filled)
        if "start" in var:
            var["start"] = pd.to_numeric(var["start"].replace("", np.nan), errors="coerce").fillna(-1).astype(np.int64)
    kind = params.value_kind
    totals = values.sum(axis=1)
    empty = np.flatnonzero(totals <= 0) if kind != "log" else np.array([], dtype=int)
    if len(empty):
        i = int(empty[0])
        raise ExpressionInputError(f"{obs['source'].iloc[i]}: patient {obs.index[i]} has no expression at all "
                                   "(every kept gene is 0). Fix: check the file, or leave the patient's "
                                   "expression_path empty.")
    layer = "counts" if kind == "counts" else "raw"
    if kind == "counts":
        data = values.astype(np.int32 if values.max(initial=0) < 2**31 else np.int64)
    else:
        data = values.astype(np.float32)
    obs = obs.join(pts[["label", "n_slides", "has_slide"]])
    obs["has_expression"] = True
    obs["total"] = totals
    obs.index.name = "patient_id"
    var.index.name = "gene_id"
    adata = ad.AnnData(X=None, obs=obs, var=var, layers={layer: data})
    missing = [p for p in pts.index if p not in obs.index]
    adata.uns["expression"] = json_safe({
        "source": "matrix" if params.matrix else "gdc_star",
        "values": kind,
        "layer": layer,
        "params": asdict(params),
        "report": report,
        "patients_without_expression": missing,
        "n_patients_in_sheet": len(pts),
    })
    adata.uns["provenance"] = json_safe(provenance())
    log.info("cohort: %d patients x %d genes (%s in layers['%s']); %d sheet patients without expression",
             adata.n_obs, adata.n_vars, kind, layer, len(missing))
    return adata


def write_anndata(adata: ad.AnnData, out: str | os.PathLike) -> None:
    """Write as zarr v3 under a temporary name, renamed into place when complete."""
    with atomic_path(out) as tmp, ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
        # anndata announces future zarr v3 defaults (sharding, consolidated metadata) on every write
        warnings.filterwarnings("ignore", message=".*(autosharding|Consolidated metadata).*")
        adata.write_zarr(tmp, convert_strings_to_categoricals=False)
