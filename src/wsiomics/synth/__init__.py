"""Synthetic cohorts with known ground truth: the demo data and the test fixtures."""

from wsiomics.synth.cohort import CohortConfig, plan_cohort, slide_geometry, write_cohort

__all__ = ["CohortConfig", "plan_cohort", "slide_geometry", "write_cohort"]
