"""Models: tensors in, tensors out (no file I/O). One file per component, a dataclass config each.

Every patient-level model takes a :class:`~wsiomics.models.batch.Batch` and returns a
:class:`~wsiomics.models.batch.ModelOutput`.
"""

from wsiomics.models.abmil import ABMIL, ABMILConfig
from wsiomics.models.baselines import (
    GeneOnly,
    GeneOnlyConfig,
    ImageOnlyMIL,
    ImageOnlyMILConfig,
    LateFusion,
    LateFusionConfig,
)
from wsiomics.models.batch import Batch, ModelOutput
from wsiomics.models.blocks import CrossAttentionBlock, SelfAttentionBlock
from wsiomics.models.gene_gmsa import GeneGMSA, GeneGMSAConfig
from wsiomics.models.gimp import GiMP, GiMPConfig, batch_hard_triplet_loss, mpm_loss, span_mask
from wsiomics.models.slide_transformer import SlideTransformer, SlideTransformerConfig, sincos_2d

__all__ = [
    "ABMIL",
    "ABMILConfig",
    "Batch",
    "CrossAttentionBlock",
    "GeneGMSA",
    "GeneGMSAConfig",
    "GeneOnly",
    "GeneOnlyConfig",
    "GiMP",
    "GiMPConfig",
    "ImageOnlyMIL",
    "ImageOnlyMILConfig",
    "LateFusion",
    "LateFusionConfig",
    "ModelOutput",
    "SelfAttentionBlock",
    "SlideTransformer",
    "SlideTransformerConfig",
    "batch_hard_triplet_loss",
    "mpm_loss",
    "sincos_2d",
    "span_mask",
]
