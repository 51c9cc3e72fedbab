"""Model builders: a method's resolved configuration + the fold's shapes -> an ``nn.Module``.

Each component's dataclass config takes, from the shared ``train.model`` section, exactly the keys it
has fields for; shapes (feature width, gene count, classes, gene groups) come from the fold's data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from wsiomics.datasets import FoldData
from wsiomics.train.methods import MODEL_BUILDERS, Method, model_builder


def fill(cls, values: dict[str, Any], **fixed: Any):
    """``cls`` built from the keys of ``values`` it has fields for, plus ``fixed`` (which win)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in values.items() if k in names}, **fixed})


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
def _gimp(cfg: dict[str, Any], data: FoldData, n_outputs: int) -> torch.nn.Module:
    from wsiomics.models.gimp import GiMP, GiMPConfig

    gimp_cfg = fill(GiMPConfig, cfg["model"], image=_image_cfg(cfg, data), gene=_gene_cfg(cfg, data),
                    n_classes=n_outputs)
    return _standardize_inputs(GiMP(gimp_cfg), cfg, data)


@model_builder("late_fusion")
def _late_fusion(cfg: dict[str, Any], data: FoldData, n_outputs: int) -> torch.nn.Module:
    from wsiomics.models.baselines import LateFusion, LateFusionConfig

    model = LateFusion(fill(LateFusionConfig, cfg["model"], image=_image_cfg(cfg, data), gene=_gene_cfg(cfg, data),
                            n_classes=n_outputs))
    return _standardize_inputs(model, cfg, data)


@model_builder("gene_only")
def _gene_only(cfg: dict[str, Any], data: FoldData, n_outputs: int) -> torch.nn.Module:
    from wsiomics.models.baselines import GeneOnly, GeneOnlyConfig

    return GeneOnly(fill(GeneOnlyConfig, cfg["model"], gene=_gene_cfg(cfg, data), n_classes=n_outputs))


@model_builder("image_only")
def _image_only(cfg: dict[str, Any], data: FoldData, n_outputs: int) -> torch.nn.Module:
    from wsiomics.models.abmil import ABMILConfig
    from wsiomics.models.baselines import ImageOnlyMIL, ImageOnlyMILConfig

    mil = fill(ABMILConfig, cfg["model"], in_dim=max(1, data.feature_dim))
    model = ImageOnlyMIL(fill(ImageOnlyMILConfig, cfg["model"], mil=mil, n_classes=n_outputs))
    return _standardize_inputs(model, cfg, data)


# train.model keys that shape MGI's encoders and projections; a segmenter initialised from an MGI checkpoint
# takes these from the checkpoint's configuration, so its encoders fit the pretrained weights.
MGI_ENCODER_KEYS = ("standardize_features", "dim", "depth", "heads", "mlp_ratio", "dropout", "drop_path",
                    "pos_encoding", "gene_encoder", "genes_per_token", "token_projection", "d_state", "d_conv",
                    "expand", "bidirectional", "gene_norm", "gene_hidden", "gene_scale", "embed_dim", "projection")


def gene_encoder_options(model_cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """:func:`build_gene_encoder` options for ``kind`` from the shared ``train.model`` keys (the encoder's own
    projection head stays linear at width ``dim``; MGI's projection heads map it to ``embed_dim``)."""
    from wsiomics.models.gene_mamba import GENE_ENCODERS

    _, config_cls = GENE_ENCODERS[kind]
    names = {f.name for f in dataclasses.fields(config_cls)} - {"n_genes", "head", "out_dim", "hidden", "norm"}
    options = {k: model_cfg[k] for k in names if k in model_cfg}
    if kind == "mamba" and "gene_norm" in model_cfg:
        options["norm"] = model_cfg["gene_norm"]
    if kind == "mlp" and "gene_hidden" in model_cfg:
        options["hidden"] = (int(model_cfg["gene_hidden"]),)
    return options


def feature_moments(data: FoldData, roles: tuple[str, ...] = ("train",), max_rows: int = 512
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of patch features over the tiles of ``roles`` patients (at most
    ``max_rows`` evenly spaced tiles per slide, float64 sums); zeros / ones without any tile."""
    from wsiomics.datasets import FeatureCache

    dim = max(1, data.feature_dim)
    total, squares, n = np.zeros(dim), np.zeros(dim), 0
    reader = FeatureCache(0)  # no caching: one pass
    for patient in data.role(*roles):
        for slide in patient.slides:
            rows = np.unique(np.linspace(0, slide.n_tokens - 1, min(slide.n_tokens, max_rows)).astype(np.int64))
            x = np.asarray(reader.read(slide, rows), dtype=np.float64)
            total += x.sum(0)
            squares += (x * x).sum(0)
            n += len(x)
    if n == 0:
        return np.zeros(dim), np.ones(dim)
    mean = total / n
    return mean, np.sqrt(np.maximum(squares / n - mean * mean, 0.0))


def _standardize_inputs(model: torch.nn.Module, cfg: dict[str, Any], data: FoldData) -> torch.nn.Module:
    if cfg["model"].get("standardize_features", True) and data.feature_dim:
        model.feature_norm.set_statistics(*feature_moments(data))
    return model


@model_builder("mgi")
def _mgi(cfg: dict[str, Any], data: FoldData, n_outputs: int) -> torch.nn.Module:
    from wsiomics.models.mgi import MGI, MGIConfig

    m = cfg["model"]
    kind = str(m.get("gene_encoder", "mamba"))
    model = MGI(fill(MGIConfig, m, image=_image_cfg(cfg, data), n_genes=max(1, len(data.genes)),
                     n_classes=n_outputs, gene_encoder=kind, gene=gene_encoder_options(m, kind)))
    return _standardize_inputs(model, cfg, data)


@model_builder("segmenter")
def _segmenter(cfg: dict[str, Any], data: FoldData, n_outputs: int) -> torch.nn.Module:
    from wsiomics.models.segmentation import SegmenterConfig, TumourSegmenter

    m = cfg["model"]
    kind = str(m.get("gene_encoder", "mamba"))
    conditioning = str(m.get("seg_conditioning", "film"))
    use_genes = conditioning != "none" and bool(data.genes)
    seg = fill(SegmenterConfig, m, image=_image_cfg(cfg, data), n_genes=max(1, len(data.genes)), use_genes=use_genes,
               conditioning=conditioning if use_genes else "film", gene_encoder=kind,
               gene=gene_encoder_options(m, kind), decoder_depth=int(m.get("seg_decoder_depth", 1)))
    return _standardize_inputs(TumourSegmenter(seg), cfg, data)


def build_model(method: Method, cfg: dict[str, Any], data: FoldData) -> torch.nn.Module:
    """The method's network for the fold, its output head sized by the method's task."""
    from wsiomics.train.tasks import get_task

    if method.model not in MODEL_BUILDERS:
        raise KeyError(f"method {method.name}: no model builder {method.model!r} (known: {sorted(MODEL_BUILDERS)})")
    return MODEL_BUILDERS[method.model](cfg, data, get_task(method.task).head_outputs(data, cfg))
