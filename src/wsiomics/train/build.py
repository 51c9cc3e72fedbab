"""Model builders: a method's resolved configuration + the fold's shapes -> an ``nn.Module``.

Each component's dataclass config takes, from the shared ``train.model`` section, exactly the keys it
has fields for; shapes (feature width, gene count, classes, gene groups) come from the fold's data.
:func:`model_keys` lists the keys a method's model reads (its configs' fields less those the data fixes,
plus the few the builder reads itself); a key no model reads is an error (:func:`check_model_keys`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from wsiomics.datasets import FoldData
from wsiomics.train.methods import MODEL_BUILDERS, Method, deep_merge, model_builder
from wsiomics.train.roles import pretrain_roles

log = logging.getLogger(__name__)


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


def _gene_option_keys(kind: str) -> dict[str, str]:
    """``train.model`` key -> :func:`build_gene_encoder` option, for gene encoder ``kind``."""
    from wsiomics.models.gene_mamba import GENE_ENCODERS

    _, config_cls = GENE_ENCODERS[kind]
    names = {f.name for f in dataclasses.fields(config_cls)} - {"n_genes", "head", "out_dim", "hidden", "norm"}
    keys = {k: k for k in names}
    if kind == "mamba":
        keys["gene_norm"] = "norm"
    if kind == "mlp":
        keys["gene_hidden"] = "hidden"
    return keys


def gene_encoder_options(model_cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """:func:`build_gene_encoder` options for ``kind`` from the shared ``train.model`` keys (the encoder's own
    projection head stays linear at width ``dim``; MGI's projection heads map it to ``embed_dim``)."""
    options = {option: model_cfg[key] for key, option in _gene_option_keys(kind).items() if key in model_cfg}
    if "hidden" in options:
        options["hidden"] = (int(options["hidden"]),)
    return options


def feature_moments(data: FoldData, roles: tuple[str, ...] | None = None, max_rows: int = 512
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of patch features over the tiles of ``roles`` patients (default: the
    stage's ``data.fit_roles``; at most ``max_rows`` evenly spaced tiles per slide, float64 sums); zeros /
    ones without any tile."""
    from wsiomics.datasets import FeatureCache

    dim = max(1, data.feature_dim)
    total, squares, n = np.zeros(dim), np.zeros(dim), 0
    reader = FeatureCache(0)  # no caching: one pass
    for patient in data.role(*(roles or data.fit_roles)):
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


#: ``image_pooling: auto`` picks ``cls_mean`` from this many paired patients (slides and expression) in the
#: fold's pretraining pool, ``cls`` below. Measured with bench/pretraining.py (recall@5 over 50 candidates,
#: bench/README "MGI slide pooling"): at 500 pairs ``cls_mean`` is at or above CCA on every run and above
#: ``cls`` on average; at 300 both are below CCA; at 50-200 the two are level and ``cls_mean`` costs MGI's
#: classification on demo-sized cohorts (~30-40 pairs).
CLS_MEAN_FROM_PAIRS = 400


def pretraining_pairs(cfg: dict[str, Any], data: FoldData) -> int:
    """Paired patients (slides and expression) of the fold's pretraining pool (``train.pretrain.pool``)."""
    pool = pretrain_roles(str((cfg.get("pretrain") or {}).get("pool", "all")))
    return sum(1 for p in data.role(*pool) if p.slides and p.genes is not None)


def resolve_fold_settings(cfg: dict[str, Any], data: FoldData) -> dict[str, Any]:
    """``cfg`` with the model settings that depend on the fold's size made concrete (``image_pooling: auto``).

    Counted on the fold's pretraining pool whatever the stage, so pretraining, the fine-tune that starts from
    its checkpoint, the untrained ``_no_pretrain`` twin and the few-shot probes all build the same network;
    the resolved value is what the checkpoints' configuration records (deployment rebuilds from it)."""
    if (cfg.get("model") or {}).get("image_pooling") != "auto":
        return cfg
    pairs = pretraining_pairs(cfg, data)
    pooling = "cls_mean" if pairs >= CLS_MEAN_FROM_PAIRS else "cls"
    log.info("image_pooling auto -> %s (%d paired patients in the pretraining pool; cls_mean from %d)", pooling,
             pairs, CLS_MEAN_FROM_PAIRS)
    return deep_merge(cfg, {"model": {"image_pooling": pooling}})


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


# ---------------------------------------------------------------- the train.model keys each model reads


def _fields(cls, *fixed: str) -> set[str]:
    """``cls``'s fields less those the builder fixes from the data or from other keys."""
    return {f.name for f in dataclasses.fields(cls)} - set(fixed)


def _image_keys() -> set[str]:
    from wsiomics.models.slide_transformer import SlideTransformerConfig

    return _fields(SlideTransformerConfig, "in_dim") | {"standardize_features"}


def _gmsa_keys() -> set[str]:
    from wsiomics.models.gene_gmsa import GeneGMSAConfig

    return _fields(GeneGMSAConfig, "n_genes", "group_of_gene") | {"gene_grouping"}


def _gene_encoder_keys(model_cfg: dict[str, Any]) -> set[str]:
    return set(_gene_option_keys(str(model_cfg.get("gene_encoder", "mamba")))) | {"gene_encoder"}


def _keys_gimp(m: dict[str, Any]) -> set[str]:
    from wsiomics.models.gimp import GiMPConfig

    return _fields(GiMPConfig, "image", "gene", "n_classes") | _image_keys() | _gmsa_keys()


def _keys_late_fusion(m: dict[str, Any]) -> set[str]:
    from wsiomics.models.baselines import LateFusionConfig

    return _fields(LateFusionConfig, "image", "gene", "n_classes") | _image_keys() | _gmsa_keys()


def _keys_gene_only(m: dict[str, Any]) -> set[str]:
    from wsiomics.models.baselines import GeneOnlyConfig

    return _fields(GeneOnlyConfig, "gene", "n_classes") | _gmsa_keys()


def _keys_image_only(m: dict[str, Any]) -> set[str]:
    from wsiomics.models.abmil import ABMILConfig
    from wsiomics.models.baselines import ImageOnlyMILConfig

    return _fields(ABMILConfig, "in_dim") | _fields(ImageOnlyMILConfig, "mil", "n_classes") | {"standardize_features"}


def _keys_mgi(m: dict[str, Any]) -> set[str]:
    from wsiomics.models.mgi import MGIConfig

    return _fields(MGIConfig, "image", "n_genes", "n_classes", "gene") | _image_keys() | _gene_encoder_keys(m)


def _keys_segmenter(m: dict[str, Any]) -> set[str]:
    from wsiomics.models.segmentation import SegmenterConfig

    fixed = ("image", "n_genes", "use_genes", "conditioning", "gene", "decoder_depth")
    return (_fields(SegmenterConfig, *fixed) | _image_keys() | _gene_encoder_keys(m)
            | {"seg_conditioning", "seg_decoder_depth"})


MODEL_KEYS = {"gimp": _keys_gimp, "late_fusion": _keys_late_fusion, "gene_only": _keys_gene_only,
              "image_only": _keys_image_only, "mgi": _keys_mgi, "segmenter": _keys_segmenter}


def model_keys(method: Method, model_cfg: dict[str, Any]) -> set[str]:
    """The ``train.model`` keys ``method``'s model reads (given its resolved ``model_cfg``: MGI's depend on
    ``gene_encoder``); none for the scikit-learn baselines."""
    if method.is_sklearn:
        return set()
    return MODEL_KEYS[method.model](model_cfg)


def all_model_keys() -> set[str]:
    """Every key some model reads, whatever its gene encoder: what the shared ``train.model`` may hold."""
    from wsiomics.models.gene_mamba import GENE_ENCODERS

    return set().union(*(keys({"gene_encoder": kind}) for keys in MODEL_KEYS.values() for kind in GENE_ENCODERS))


def check_model_keys(method: Method, settings: dict[str, Any], where: str = "train.model",
                     allowed: set[str] | None = None) -> None:
    """Raise naming the keys of ``settings`` (found at ``where``) outside ``allowed`` (default: every key
    some model reads), the method and the allowed keys."""
    allowed = all_model_keys() if allowed is None else allowed
    unknown = sorted(set(settings) - allowed)
    if unknown:
        reads = f"allowed: {', '.join(sorted(allowed))}" if allowed else "allowed: none (it has no model settings)"
        raise ValueError(f"{where}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a setting of "
                         f"method {method.name}'s model ({method.model}); {reads}")


def check_overrides(train_config: dict[str, Any], method: Method, resolved: dict[str, Any]) -> None:
    """The user's model settings for ``method``: ``train.methods.<m>.model`` (and its stages' ``model``) may hold
    only keys this method's model reads; ``train.{pretrain,finetune}.model``, shared, only keys some model reads."""
    own = (train_config.get("methods") or {}).get(method.name) or {}
    reads = model_keys(method, resolved.get("model") or {})
    check_model_keys(method, own.get("model") or {}, f"train.methods.{method.name}.model", reads)
    for stage in ("pretrain", "finetune"):
        stage_model = (own.get(stage) or {}).get("model") or {}
        check_model_keys(method, stage_model, f"train.methods.{method.name}.{stage}.model", reads)
        check_model_keys(method, (train_config.get(stage) or {}).get("model") or {}, f"train.{stage}.model")


def build_model(method: Method, cfg: dict[str, Any], data: FoldData) -> torch.nn.Module:
    """The method's network for the fold, its output head sized by the method's task."""
    from wsiomics.train.tasks import get_task

    if method.model not in MODEL_BUILDERS:
        raise KeyError(f"method {method.name}: no model builder {method.model!r} (known: {sorted(MODEL_BUILDERS)})")
    check_model_keys(method, cfg["model"], f"method {method.name}'s model settings")
    cfg = resolve_fold_settings(cfg, data)  # already concrete when it comes through a stage's context
    return MODEL_BUILDERS[method.model](cfg, data, get_task(method.task).head_outputs(data, cfg))
