"""Methods: a name plus a configuration, never a copy of the training code.

Each method names a model builder, whether it has a pretraining stage (``model.pretrain_loss``), what it
is fine-tuned for, and fixed overrides of the shared ``train:`` configuration (``gimp_no_mpm`` is
``gimp`` with ``use_mpm: false``). The user's ``train.methods`` overrides merge on top, so any choice of
any method is configurable without code.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    model: str  # key of MODEL_BUILDERS, or "sklearn_*" for the scikit-learn baselines
    pretrain: bool = False  # has a pretraining stage before fine-tuning
    task: str = "classify"  # a registered task: classify | segment | survival (wsiomics.train.tasks)
    modalities: tuple[str, ...] = ("image", "gene")
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    pretrained_from: str = ""  # fine-tunes from another method's pretraining checkpoint (mgi_seg: mgi)
    retrieval: bool = False  # image and gene embeddings share a space: report image<->gene retrieval

    @property
    def is_sklearn(self) -> bool:
        return self.model.startswith("sklearn_")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _mgi_overrides(gene_encoder: str) -> dict[str, Any]:
    """MGI's fixed choices. InfoNCE over a few val pairs is too noisy to pick a checkpoint by: pretraining
    keeps its last epoch, with batches of 16 patients (InfoNCE's negatives are the rest of the batch).
    Fine-tuning uses the shared head and dropout (train.model, as every other deep method). An MLP head
    with dropout 0.3, chosen earlier on the demo's own test folds, did not hold on other cohorts
    (synth.seed 1: 1.000 vs 0.972 with the shared linear head; seed 2: 0.854 vs 0.896; README, MGI)."""
    return {"model": {"gene_encoder": gene_encoder}, "pretrain": {"select": "last", "batch_size": 16}}


# GiMP's pretraining batches: 2 classes x 4 patients. The batch-hard triplet with label positives learns only
# from anchors with a same-class and an other-class patient in the batch, which random batches of 4 often
# lack (with 4 classes: 4 patients of 4 classes have no positive at all); 4 per class gives each anchor 3
# positives to pick the hardest from. The MPM-only ablation (gimp_no_triplet) keeps the same batches, so the
# ablations differ in their loss alone. positives: instance ignores classes_per_batch (random batches).
GIMP_PRETRAIN = {"pretrain": {"batch_size": 8, "classes_per_batch": 2}}

# The survival networks' fine-tune keeps its last epoch: a fold's val patients (3 to 5 in the demo cohorts, ~3
# comparable pairs) cannot pick an epoch by their NLL, which kept epoch 1-3 in 18 of 30 fine-tunes on seeds 1
# and 2, nearly untrained. The val patients then train too (wsiomics.train.tasks.survival.fit_roles_of), as coxph's.
# Each step sees every training patient (batch_size: all, as DeepSurv at this size): the Cox partial likelihood
# ranks each event against its whole risk set, and a batch of 4 patients with 1-2 events (train.data.batch_size)
# turns it into a noisy ranking of a few pairs (README, Survival: the numbers).
SURVIVAL_FINETUNE = {"finetune": {"select": "last", "batch_size": "all"}}


for _m in (
    Method("gimp", "gimp", pretrain=True, overrides=GIMP_PRETRAIN, description="GiMP: GMSA genes + slide "
           "transformer, MPM + triplet pretraining, classification fine-tune"),
    Method("gimp_no_mpm", "gimp", pretrain=True, overrides={"model": {"use_mpm": False}, **GIMP_PRETRAIN},
           description="GiMP pretrained with the triplet loss only"),
    Method("gimp_no_triplet", "gimp", pretrain=True, overrides={"model": {"use_triplet": False}, **GIMP_PRETRAIN},
           description="GiMP pretrained with masked patch modelling only"),
    Method("gimp_no_pretrain", "gimp", description="the GiMP network fine-tuned from random initialisation"),
    Method("late_fusion", "late_fusion", description="slide transformer and GMSA, one head each, class "
           "log-probabilities added; no pretraining"),
    Method("gene_only", "gene_only", modalities=("gene",), description="GMSA gene encoder + head"),
    Method("image_only", "image_only", modalities=("image",), description="gated attention MIL (ABMIL) + head"),
    Method("linear", "sklearn_logistic", description="logistic regression on mean-pooled patch features + genes"),
    Method("mgi", "mgi", pretrain=True, retrieval=True, overrides=_mgi_overrides("mamba"),
           description="MGI: Mamba genes + slide transformer, image-gene InfoNCE pretraining, classification "
           "fine-tune"),
    Method("mgi_transformer_genes", "mgi", pretrain=True, retrieval=True, overrides=_mgi_overrides("transformer"),
           description="MGI with a transformer gene encoder"),
    Method("mgi_mlp_genes", "mgi", pretrain=True, retrieval=True, overrides=_mgi_overrides("mlp"),
           description="MGI with an MLP gene encoder"),
    Method("mgi_no_pretrain", "mgi", retrieval=True,
           overrides={"model": {"gene_encoder": "mamba"}},
           description="the MGI network fine-tuned from random initialisation (retrieval: the initial model)"),
    Method("cca", "sklearn_cca", retrieval=True, description="PCA + CCA between mean-pooled patch features and "
           "genes (retrieval); logistic regression on the CCA scores"),
    # mgi_seg fine-tunes its pretrained encoders at the shared finetune.encoder_lr_scale: the full rate, chosen
    # earlier on the demo's test folds, did not hold on other cohorts (mean Dice, seed 1: 0.905 at 1x vs
    # 0.911 at 0.3x; seed 2: 0.921 vs 0.930).
    Method("mgi_seg", "segmenter", task="segment", pretrained_from="mgi",
           overrides={"model": {"gene_encoder": "mamba"}},
           description="tumour segmentation: pretrained MGI encoders + gene-conditioned fusion decoder"),
    Method("mgi_seg_no_pretrain", "segmenter", task="segment", overrides={"model": {"gene_encoder": "mamba"}},
           description="mgi_seg from random initialisation"),
    Method("image_seg", "segmenter", task="segment", modalities=("image",),
           overrides={"model": {"seg_conditioning": "none"}},
           description="tumour segmentation from the slide transformer alone (the same decoder, no genes)"),
    # Survival (task "survival"): the survival heads of the same networks; the pretrained ones start from their
    # method's pretraining checkpoint (encoders; the head is new). coxph is the linear baseline.
    Method("gimp_survival", "gimp", task="survival", pretrained_from="gimp", overrides=SURVIVAL_FINETUNE,
           description="GiMP's pretrained encoders + a survival head (discrete-time hazards or Cox)"),
    Method("mgi_survival", "mgi", task="survival", pretrained_from="mgi",
           overrides={**_mgi_overrides("mamba"), **SURVIVAL_FINETUNE},
           description="MGI's pretrained encoders + a survival head"),
    Method("late_fusion_survival", "late_fusion", task="survival",
           overrides={"model": {"fusion_rule": "sum"}, **SURVIVAL_FINETUNE},
           description="slide transformer and GMSA, one survival head each, outputs added; no pretraining"),
    Method("image_only_survival", "image_only", task="survival", modalities=("image",), overrides=SURVIVAL_FINETUNE,
           description="gated attention MIL (ABMIL) + survival head"),
    Method("gene_only_survival", "gene_only", task="survival", modalities=("gene",), overrides=SURVIVAL_FINETUNE,
           description="GMSA gene encoder + survival head"),
    Method("coxph", "sklearn_coxph", task="survival", description="penalised linear Cox model on PCA scores of "
           "mean-pooled patch features and genes (scikit-survival)"),
):
    register(_m)


def pretrained_source(method: Method) -> str:
    """The method whose pretraining checkpoint this one fine-tunes from ("" = none)."""
    return method.name if method.pretrain else method.pretrained_from


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# train: keys that are no method's setting: which methods run, the per-method overrides, and the few-shot
# protocol's settings (rule fewshot reads them itself; in the resolved configuration they would rerun every
# training job whenever they change).
NOT_METHOD_SETTINGS = ("methods", "run", "fewshot")


def method_config(train_config: dict[str, Any], name: str) -> dict[str, Any]:
    """The resolved configuration of one method: shared ``train:`` settings, then the method's fixed
    overrides, then the user's ``train.methods.<name>`` overrides. A model setting the user gives for this
    method that its model does not read is an error (:func:`wsiomics.train.build.check_overrides`)."""
    method = get_method(name)
    shared = {k: v for k, v in train_config.items() if k not in NOT_METHOD_SETTINGS}
    resolved = deep_merge(shared, method.overrides)
    own = (train_config.get("methods") or {}).get(name) or {}
    resolved = deep_merge(resolved, own)
    resolved["method"] = name
    stages = [(section.get(stage) or {}).get("model") for section in (train_config, own)
              for stage in ("pretrain", "finetune")]
    if own.get("model") or any(stages):
        from wsiomics.train.build import check_overrides  # imports torch: only when there is something to check

        check_overrides(train_config, method, resolved)
    return resolved


ModelBuilder = Callable[..., Any]
MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def model_builder(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(fn: ModelBuilder) -> ModelBuilder:
        MODEL_BUILDERS[name] = fn
        return fn

    return wrap
