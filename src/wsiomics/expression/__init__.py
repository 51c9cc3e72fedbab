"""Gene-expression ingestion and leakage-free per-fold normalisation (AnnData zarr); folds are wsiomics.splits."""

from wsiomics.expression.cohort import CohortParams, build_cohort, write_anndata
from wsiomics.expression.normalize import NormalizeParams, apply_fitted, fit, normalize_fold
from wsiomics.expression.readers import ExpressionInputError, choose_samples, patient_of, read_gdc_star

__all__ = [
    "CohortParams",
    "ExpressionInputError",
    "NormalizeParams",
    "apply_fitted",
    "build_cohort",
    "choose_samples",
    "fit",
    "normalize_fold",
    "patient_of",
    "read_gdc_star",
    "write_anndata",
]
