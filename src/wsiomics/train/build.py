"""Model builders: a method's resolved configuration + the fold's shapes -> an ``nn.Module``.

Each component's dataclass config takes, from the shared ``train.model`` section, exactly the keys it
has fields for; shapes (feature width, gene count, classes, gene groups) come from the fold's data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from wsiomics.datasets import FoldData
from wsiomics.train.methods import MODEL_BUILDERS, Method, model_builder


def fill(cls, values: dict[str, Any], **fixed: Any):
    """``cls`` built from the keys of ``values`` it has fields for, plus ``fixed`` (which win)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}, **fixed)


def gene_groups(data: FoldData, model_cfg: dict[str, Any]) -> tuple[tuple[int, ...] | None, int]:
    """GMSA grouping: contiguous ``n_groups``, or one group per gene set (a gene's first set; -1 = none)."""
    if model_cfg.get("gene_grouping", "contiguous") != "gene_sets":
        return None, int(model_cfg.get("n_groups", 16))
    if not data.gene_groups:
        raise ValueError("train.model.gene_grouping is gene_sets but the fold's expression has no gene_groups; "
                         "set expression.gene_sets to a gene -> group table")
    first = [g.split(";")[0] if g else "" for g in data.gene_groups]
    names = sorted({g for g in first if g})
    index = {g: i for i, g in enumerate(names)}
    return tuple(index.get(g, -1) for g in first), len(names)


def _image_cfg(cfg: dict[str, Any], data: FoldData):
    from wsiomics.models.slide_transformer import SlideTransformerConfig

    return fill(SlideTransformerConfig, cfg["model"], in_dim=max(1, data.feature_dim))


def _gene_cfg(cfg: dict[str, Any], data: FoldData):
    from wsiomics.models.gene_gmsa import GeneGMSAConfig

    groups, n_groups = gene_groups(data, cfg["model"])
    model = {k: v for k, v in cfg["model"].items() if k != "n_groups"}
    return fill(GeneGMSAConfig, model, n_genes=max(1, len(data.genes)), n_groups=n_groups, group_of_gene=groups)


@model_builder("gimp")
def _gimp(cfg: dict[str, Any], data: FoldData) -> torch.nn.Module:
    from wsiomics.models.gimp import GiMP, GiMPConfig

    gimp_cfg = fill(GiMPConfig, cfg["model"], image=_image_cfg(cfg, data), gene=_gene_cfg(cfg, data),
                    n_classes=max(2, len(data.classes)))
    return GiMP(gimp_cfg)


@model_builder("late_fusion")
def _late_fusion(cfg: dict[str, Any], data: FoldData) -> torch.nn.Module:
    from wsiomics.models.baselines import LateFusion, LateFusionConfig

    return LateFusion(fill(LateFusionConfig, cfg["model"], image=_image_cfg(cfg, data), gene=_gene_cfg(cfg, data),
                           n_classes=max(2, len(data.classes))))


@model_builder("gene_only")
def _gene_only(cfg: dict[str, Any], data: FoldData) -> torch.nn.Module:
    from wsiomics.models.baselines import GeneOnly, GeneOnlyConfig

    return GeneOnly(fill(GeneOnlyConfig, cfg["model"], gene=_gene_cfg(cfg, data), n_classes=max(2, len(data.classes))))


@model_builder("image_only")
def _image_only(cfg: dict[str, Any], data: FoldData) -> torch.nn.Module:
    from wsiomics.models.abmil import ABMILConfig
    from wsiomics.models.baselines import ImageOnlyMIL, ImageOnlyMILConfig

    mil = fill(ABMILConfig, cfg["model"], in_dim=max(1, data.feature_dim))
    return ImageOnlyMIL(fill(ImageOnlyMILConfig, cfg["model"], mil=mil, n_classes=max(2, len(data.classes))))


def build_model(method: Method, cfg: dict[str, Any], data: FoldData) -> torch.nn.Module:
    if method.model not in MODEL_BUILDERS:
        raise KeyError(f"method {method.name}: no model builder {method.model!r} (known: {sorted(MODEL_BUILDERS)})")
    return MODEL_BUILDERS[method.model](cfg, data)
