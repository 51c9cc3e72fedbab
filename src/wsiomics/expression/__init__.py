"""Gene-expression ingestion, patient-level splits and leakage-free per-fold normalisation (AnnData zarr)."""

from wsiomics.expression.cohort import CohortParams, build_cohort, write_anndata
from wsiomics.expression.normalize import NormalizeParams, apply_fitted, fit, normalize_fold
from wsiomics.expression.readers import ExpressionInputError, choose_samples, patient_of, read_gdc_star
from wsiomics.expression.splits import SplitError, SplitParams, make_splits, read_splits

__all__ = [
    "CohortParams",
    "ExpressionInputError",
    "NormalizeParams",
    "SplitError",
    "SplitParams",
    "apply_fitted",
    "build_cohort",
    "choose_samples",
    "fit",
    "make_splits",
    "normalize_fold",
    "patient_of",
    "read_gdc_star",
    "read_splits",
    "write_anndata",
]
