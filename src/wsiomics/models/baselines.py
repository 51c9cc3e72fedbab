"""Baselines in the same interface as GiMP: ``forward(batch) -> ModelOutput``, encoder / head parameter split.

- :class:`ImageOnlyMIL`: gated-attention MIL (ABMIL) on the patch features + linear head.
- :class:`GeneOnly`: GMSA gene encoder + head.
- :class:`LateFusion`: slide transformer and GMSA branches, each with its own linear head, trained
  jointly without pre-training, joined only at their class scores over the modalities the patient has
  (``fusion_rule``): ``sum_logits`` (default) adds the branches' class log-probabilities and renormalises
  (a product of experts: each branch can rule classes out, so a class defined by tissue *and* programme
  is reachable when each modality sees one of them); ``mean_prob`` averages their probabilities (the
  returned ``logits`` are the log of the mean), which trained jointly lets one branch dominate and on
  the demo's 4-class mode stayed at single-modality accuracy (0.53 against 0.86). A patient with neither
  modality gets both branches on their missing-modality tokens.

A missing modality is a learned token in place of that branch's embedding, as in GiMP, so every
patient gets logits. (The linear baseline on mean-pooled features + genes is scikit-learn's logistic
regression in the training code, not a torch model.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wsiomics.models.abmil import ABMIL, ABMILConfig
from wsiomics.models.batch import Batch, ModelOutput
from wsiomics.models.blocks import FeatureStandardizer, HeadSplit, init_weights, trunc_normal_
from wsiomics.models.gene_gmsa import GeneGMSA, GeneGMSAConfig
from wsiomics.models.gimp import HEADS, build_head
from wsiomics.models.slide_transformer import SlideTransformer, SlideTransformerConfig


def _check_head(n_classes: int, head: str) -> None:
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")


@dataclass
class ImageOnlyMILConfig:
    """``mil`` may be a dict."""

    mil: ABMILConfig
    n_classes: int
    head: str = "linear"
    dropout: float = 0.1  # head (mlp only)

    def __post_init__(self) -> None:
        self.mil = ABMILConfig(**self.mil) if isinstance(self.mil, dict) else self.mil
        _check_head(self.n_classes, self.head)


class ImageOnlyMIL(HeadSplit):
    """ABMIL pooled embedding -> head; attention = ABMIL's attention weights."""

    def __init__(self, cfg: ImageOnlyMILConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mil = ABMIL(cfg.mil)
        self.feature_norm = FeatureStandardizer(cfg.mil.in_dim)  # training-tile z-scores (set by the builder)
        self.image_missing = nn.Parameter(torch.zeros(cfg.mil.dim))
        self.head = build_head(cfg.mil.dim, cfg.n_classes, cfg.head, cfg.dropout)
        init_weights(self.head)
        trunc_normal_(self.image_missing, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"image_missing"}

    def forward(self, batch: Batch) -> ModelOutput:
        pooled, attention = self.mil(self.feature_norm(batch.features), batch.token_mask)  # (B, D), (B, L)
        image = torch.where(batch.has_image[:, None], pooled, self.image_missing.to(pooled.dtype))
        return ModelOutput(logits=self.head(image), image=image, attention=attention)


@dataclass
class GeneOnlyConfig:
    """``gene`` may be a dict."""

    gene: GeneGMSAConfig
    n_classes: int
    head: str = "linear"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.gene = GeneGMSAConfig(**self.gene) if isinstance(self.gene, dict) else self.gene
        _check_head(self.n_classes, self.head)


class GeneOnly(HeadSplit):
    """GMSA gene [CLS] -> head."""

    def __init__(self, cfg: GeneOnlyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gene_encoder = GeneGMSA(cfg.gene)
        self.gene_missing = nn.Parameter(torch.zeros(cfg.gene.dim))
        self.head = build_head(cfg.gene.dim, cfg.n_classes, cfg.head, cfg.dropout)
        init_weights(self.head)
        trunc_normal_(self.gene_missing, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"gene_missing"}

    def forward(self, batch: Batch) -> ModelOutput:
        cls, _ = self.gene_encoder(batch.genes)  # (B, D)
        gene = torch.where(batch.has_gene[:, None], cls, self.gene_missing.to(cls.dtype))
        return ModelOutput(logits=self.head(gene), gene=gene)


FUSION_RULES = ("sum_logits", "mean_prob", "sum")


@dataclass
class LateFusionConfig:
    """``image`` / ``gene`` may be dicts."""

    image: SlideTransformerConfig
    gene: GeneGMSAConfig
    n_classes: int
    head: str = "linear"
    dropout: float = 0.1
    fusion_rule: str = "sum_logits"

    def __post_init__(self) -> None:
        if self.fusion_rule not in FUSION_RULES:
            raise ValueError(f"fusion_rule must be one of {FUSION_RULES}; got {self.fusion_rule!r}")
        self.image = SlideTransformerConfig(**self.image) if isinstance(self.image, dict) else self.image
        self.gene = GeneGMSAConfig(**self.gene) if isinstance(self.gene, dict) else self.gene
        _check_head(self.n_classes, self.head)


class LateFusion(HeadSplit):
    """Two unimodal classifiers joined at their class scores (``fusion_rule``), no pre-training."""

    _heads = ("image_head", "gene_head")

    def __init__(self, cfg: LateFusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = SlideTransformer(cfg.image)
        self.gene_encoder = GeneGMSA(cfg.gene)
        self.feature_norm = FeatureStandardizer(cfg.image.in_dim)  # training-tile z-scores (set by the builder)
        self.image_missing = nn.Parameter(torch.zeros(cfg.image.dim))
        self.gene_missing = nn.Parameter(torch.zeros(cfg.gene.dim))
        self.image_head = build_head(cfg.image.dim, cfg.n_classes, cfg.head, cfg.dropout)
        self.gene_head = build_head(cfg.gene.dim, cfg.n_classes, cfg.head, cfg.dropout)
        init_weights(self.image_head)
        init_weights(self.gene_head)
        trunc_normal_(self.image_missing, std=0.02)
        trunc_normal_(self.gene_missing, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"image_missing", "gene_missing"}

    def forward(self, batch: Batch) -> ModelOutput:
        enc = self.image_encoder
        tokens = enc.embed(self.feature_norm(batch.features))  # (B, L, Di)
        cls, _, attention = enc.encode_with_attention(tokens, batch.positions, batch.token_mask)
        image = torch.where(batch.has_image[:, None], cls, self.image_missing.to(cls.dtype))  # (B, Di)
        gcls, _ = self.gene_encoder(batch.genes)
        gene = torch.where(batch.has_gene[:, None], gcls, self.gene_missing.to(gcls.dtype))  # (B, Dg)
        raw = torch.stack([self.image_head(image).float(), self.gene_head(gene).float()], dim=1)  # (B, 2, C)
        present = torch.stack([batch.has_image, batch.has_gene], dim=1)  # (B, 2)
        present = present | ~present.any(dim=1, keepdim=True)  # neither: both missing-token branches
        if self.cfg.fusion_rule == "sum":  # outputs that are not class scores (survival hazards, log-risk): added
            return ModelOutput(logits=(raw * present[..., None].float()).sum(1), image=image, gene=gene,
                               attention=attention)
        logp = raw.log_softmax(-1)  # (B, 2, C)
        if self.cfg.fusion_rule == "sum_logits":  # product of the present branches' probabilities, renormalised
            logits = (logp * present[..., None].float()).sum(1)  # (B, C)
            return ModelOutput(logits=logits.log_softmax(-1), image=image, gene=gene, attention=attention)
        weight = present.float().log() - present.float().sum(1, keepdim=True).log()  # log(1/k) or -inf
        logits = torch.logsumexp(logp + weight[..., None], dim=1)  # (B, C): log mean of the present branches
        return ModelOutput(logits=logits, image=image, gene=gene, attention=attention)
