"""MGI: image-gene contrastive pre-training (Zhou et al. 2024), as read in ../shared/METHODS.md.

Image encoder: the :class:`SlideTransformer` (a ViT over the patient's patch-feature tokens), pooled
by its [CLS] token (``image_pooling: cls``), or by [CLS] plus the masked mean of the embedded tile tokens
(``image_pooling: cls_mean``; see :meth:`MGI.encode_image`). Gene encoder: :func:`build_gene_encoder`
(``mamba`` by default; ``transformer`` and ``mlp`` are the ablations), whose pooled output is its
projection-head output. A projection head per modality maps both into one ``embed_dim`` space.

Pre-training (:meth:`MGI.pretrain_loss`): symmetric InfoNCE (CLIP) between the L2-normalised
projections of the patients of a batch that have **both** modalities (:func:`info_nce`); a patient
missing one is neither an anchor nor anyone's negative. The temperature is learned as CLIP's
``logit_scale = log(1 / T)`` (T initialised at 0.07); the scale used is ``exp(logit_scale)`` clamped to
``max_logit_scale`` (100, CLIP's bound).

Input standardisation: patch features from a frozen encoder vary far less between tiles than the
slide transformer's 2-D positional encoding does (random-weight ResNet-50 features: per-dimension
std ~0.005 around means ~0.05), so unnormalised tokens are dominated by position and every patient's
[CLS] starts out alike, a start from which InfoNCE collapses (all embeddings equal, loss = log N).
:class:`FeatureStandardizer` z-scores each feature dimension with the mean and std of the fold's
*training* patients' tiles (set by the builder, stored as buffers, so checkpoints carry them).

Per-gene scale (``gene_scale``): a learned scale per gene (initialised at 1) in front of the gene encoder. It
was added for the tokenizer's ``shared`` value projection, which cannot weight a gene apart from the others
in its slot (with it the Mamba encoder learned the demo's expression programme from 21 patients: 0.98 vs
0.94 mean accuracy at 32 genes per token). With the default ``per_token`` projections it is a
reparametrisation of their weights, kept on because the demo's reported numbers were measured with it; it
still matters for ``token_projection: shared`` and the MLP encoder (whose first layer is a LayerNorm).

Fine-tuning: ``forward`` gives logits from a head on ``fused = [[CLS] ; pooled genes]``, the encoders' outputs
before the projection heads (``head_input: encoder``; as SimCLR found, a contrastive projection discards what
the other modality does not share, here the tissue type the image alone shows: on the demo the head on the
projections classified less well), or on the two projections (``head_input: projection``); a patient missing a
modality gets that modality's learned missing token in place of its encoder output (as in GiMP), so everyone
is classified. ``image`` / ``gene`` of the output are the projections (not normalised), which is what
retrieval compares after normalisation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsiomics.models.batch import Batch, ModelOutput
from wsiomics.models.blocks import FeatureStandardizer, HeadSplit, init_weights, trunc_normal_
from wsiomics.models.gene_mamba import GENE_ENCODERS, build_gene_encoder
from wsiomics.models.gimp import HEADS, build_head
from wsiomics.models.slide_transformer import SlideTransformer, SlideTransformerConfig

PROJECTIONS = ("linear", "mlp")
HEAD_INPUTS = ("encoder", "projection")
IMAGE_POOLINGS = ("cls", "cls_mean")


def info_nce(image: torch.Tensor, gene: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of paired rows: ``(CE(s I G^T, diag) + CE(s G I^T, diag)) / 2``.

    image, gene: (N, E) embeddings, row i of one paired with row i of the other (normalised here);
    logit_scale: the multiplier s = 1 / temperature (already exponentiated and clamped). N = 0 gives 0.
    Computed in fp32 with autocast off, whatever the caller's autocast.
    """
    if image.shape != gene.shape:
        raise ValueError(f"paired embeddings need equal shapes, got {tuple(image.shape)} and {tuple(gene.shape)}")
    if image.shape[0] == 0:
        return image.sum() * 0.0 + gene.sum() * 0.0
    with torch.autocast(image.device.type, enabled=False):  # bf16 logits at scale 100 would step by 0.5
        i = F.normalize(image.float(), dim=-1)
        g = F.normalize(gene.float(), dim=-1)
        logits = logit_scale * (i @ g.T)  # (N, N): image rows, gene columns
        target = torch.arange(i.shape[0], device=i.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


@dataclass
class MGIConfig:
    """``image`` may be a dict; ``gene`` holds :func:`build_gene_encoder` options for ``gene_encoder``."""

    image: SlideTransformerConfig
    n_genes: int
    n_classes: int
    gene_encoder: str = "mamba"  # mamba | transformer | mlp
    gene: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 64  # the shared contrastive space
    projection: str = "mlp"  # projection heads: linear | mlp
    temperature: float = 0.07  # initial InfoNCE temperature
    learn_temperature: bool = True
    max_logit_scale: float = 100.0  # clamp of 1 / temperature
    gene_scale: bool = True  # a learned per-gene scale in front of the gene encoder
    head: str = "linear"  # classification head on the fused embedding: linear | mlp
    head_input: str = "encoder"  # what the head reads: encoder ([CLS] ; pooled genes) | projection (the shared space)
    dropout: float = 0.1  # classification head (mlp)
    # pretraining views and augmentation (TANGLE / THREADS style); the defaults keep plain CLIP on the whole crop
    views: int = 1  # image views per slide and step: 1 = every token of the crop; 2 = two random tile subsets
    view_fraction: float = 0.5  # share of a patient's tokens in each view (views: 2)
    intra_weight: float = 0.0  # weight of an image-image InfoNCE between the two views (TANGLE's intra term)
    gene_dropout: float = 0.0  # share of genes zeroed (set to the training mean) per patient in pretraining
    image_pooling: str = "cls"  # slide vector: cls ([CLS] output) | cls_mean ([CLS] + mean of the embedded tiles)

    def __post_init__(self) -> None:
        self.image = SlideTransformerConfig(**self.image) if isinstance(self.image, dict) else self.image
        self.gene = dict(self.gene)
        if self.gene_encoder not in GENE_ENCODERS:
            raise ValueError(f"gene_encoder must be one of {tuple(GENE_ENCODERS)}, got {self.gene_encoder!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.embed_dim < 1 or self.n_classes < 1 or self.n_genes < 1:
            raise ValueError(f"need embed_dim, n_classes, n_genes >= 1; got {self.embed_dim}, {self.n_classes}, "
                             f"{self.n_genes}")
        if self.image_pooling not in IMAGE_POOLINGS:
            raise ValueError(f"image_pooling must be one of {IMAGE_POOLINGS}, got {self.image_pooling!r}")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views}")
        if not 0.0 < self.view_fraction <= 1.0 or not 0.0 <= self.gene_dropout < 1.0 or self.intra_weight < 0:
            raise ValueError(f"need 0 < view_fraction <= 1, 0 <= gene_dropout < 1, intra_weight >= 0; got "
                             f"{self.view_fraction}, {self.gene_dropout}, {self.intra_weight}")
        if self.intra_weight > 0 and self.views != 2:
            raise ValueError("intra_weight contrasts two image views of a slide: set views: 2")
        if not (self.temperature > 0 and 1.0 / self.temperature <= self.max_logit_scale):
            raise ValueError(f"need 0 < temperature with 1 / temperature <= max_logit_scale; got {self.temperature}, "
                             f"{self.max_logit_scale}")


class MGI(HeadSplit):
    """Slide transformer + gene encoder, projection heads to a shared space, InfoNCE, classification head."""

    contrastive = True  # image and gene embeddings live in one space: retrieval is meaningful

    def __init__(self, cfg: MGIConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_norm = FeatureStandardizer(cfg.image.in_dim)
        self.image_encoder = SlideTransformer(cfg.image)
        self.gene_scale = nn.Parameter(torch.ones(cfg.n_genes), requires_grad=cfg.gene_scale)
        self.gene_encoder = build_gene_encoder(cfg.gene_encoder, cfg.n_genes, **cfg.gene)
        di, dg, e = cfg.image.dim, self.gene_encoder.out_dim, cfg.embed_dim
        self.image_missing = nn.Parameter(torch.zeros(di))
        self.gene_missing = nn.Parameter(torch.zeros(dg))
        self.image_proj = _projection(cfg.projection, di, e)
        self.gene_proj = _projection(cfg.projection, dg, e)
        scale = torch.tensor(math.log(1.0 / cfg.temperature))
        if cfg.learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        if cfg.head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {HEAD_INPUTS}; got {cfg.head_input!r}")
        fused_dim = di + dg if cfg.head_input == "encoder" else 2 * e
        self.head = build_head(fused_dim, cfg.n_classes, cfg.head, cfg.dropout)
        for module in (self.image_proj, self.gene_proj, self.head):
            init_weights(module)
        for p in (self.image_missing, self.gene_missing):
            trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        learned = {"logit_scale"} if isinstance(self.logit_scale, nn.Parameter) else set()
        return {"image_missing", "gene_missing", "gene_scale"} | learned

    # -------------------------------------------------- encoders

    def scale(self) -> torch.Tensor:
        """The InfoNCE logit multiplier, exp(logit_scale) clamped to max_logit_scale."""
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def encode_image(self, batch: Batch, attention: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(projected image (B, E), per-token outputs (B, L, Di), [CLS] attention (B, L) or None, slide (B, Di)).

        The slide vector (what the projection head and, with ``head_input: encoder``, the classification head
        read) is the [CLS] output (``image_pooling: cls``), or with ``cls_mean`` the [CLS] output plus the mean
        over the patient's valid tiles (``token_mask``) of the embedded tile tokens, the slide transformer's
        input projection before positions are added: a position- and attention-free path that reads a
        slide-wide shift of every tile's features as mean pooling does, beside what attention finds. A patient
        without image gets the learned ``image_missing`` vector either way."""
        enc = self.image_encoder
        tokens = enc.embed(self.feature_norm(batch.features))  # (B, L, Di)
        if attention:
            cls, out, att = enc.encode_with_attention(tokens, batch.positions, batch.token_mask)
        else:
            (cls, out), att = enc.encode(tokens, batch.positions, batch.token_mask), None
        slide = cls
        if self.cfg.image_pooling == "cls_mean":
            slide = cls + masked_mean(tokens, batch.token_mask).to(cls.dtype)  # (B, Di)
        slide = torch.where(batch.has_image[:, None], slide, self.image_missing.to(slide.dtype))  # (B, Di)
        return self.image_proj(slide), out, att, slide

    def encode_gene(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(projected gene (B, E), gene tokens (B, T, Dg_tok), pooled gene encoding (B, Dg))."""
        pooled, tokens = self.gene_encoder(batch.genes * self.gene_scale)  # (B, Dg), (B, T, D)
        pooled = torch.where(batch.has_gene[:, None], pooled, self.gene_missing.to(pooled.dtype))
        return self.gene_proj(pooled), tokens, pooled

    def forward(self, batch: Batch) -> ModelOutput:
        image, _, attention, slide = self.encode_image(batch, attention=True)  # (B, E), (B, L), (B, Di)
        gene, _, pooled = self.encode_gene(batch)  # (B, E), (B, Dg)
        if self.cfg.head_input == "encoder":
            fused = torch.cat([slide, pooled], dim=-1)  # (B, Di + Dg)
        else:
            fused = torch.cat([image, gene], dim=-1)  # (B, 2E)
        return ModelOutput(logits=self.head(fused), image=image, gene=gene, fused=fused, attention=attention)

    # -------------------------------------------------- pre-training

    def pretrain_loss(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over the batch's patients with both modalities.

        ``views: 2``: each slide is seen as two random tile subsets (``view_fraction`` of its tokens each),
        each view contrasted with the genes (the mean of the two InfoNCEs), plus ``intra_weight`` x an InfoNCE
        between the two views; ``gene_dropout`` zeroes a random share of each patient's genes. Both draw from
        ``generator`` (the training loop's, checkpointed), so a run is reproducible from its seed."""
        paired = batch.has_image & batch.has_gene  # (B,)
        gene = self.encode_gene(self._gene_dropout(batch, generator))[0]
        if self.cfg.views == 2:
            images = [self.encode_image(tile_view(batch, self.cfg.view_fraction, generator))[0] for _ in range(2)]
        else:
            images = [self.encode_image(batch)[0]]
        scale = self.scale()
        if int(paired.sum()) < 2:  # no negatives: nothing to contrast (no grad: the training loop skips the batch)
            loss = gene.new_zeros((), dtype=torch.float32)
            return {"loss": loss, "infonce": loss.detach(), "logit_scale": scale.detach()}
        loss = sum(info_nce(image[paired], gene[paired], scale) for image in images) / len(images)
        out = {"loss": loss, "infonce": loss.detach(), "logit_scale": scale.detach()}
        if self.cfg.intra_weight > 0:
            intra = info_nce(images[0][batch.has_image], images[1][batch.has_image], scale)
            out.update(loss=loss + self.cfg.intra_weight * intra, intra=intra.detach())
        return out

    def _gene_dropout(self, batch: Batch, generator: torch.Generator | None) -> Batch:
        rate = self.cfg.gene_dropout
        if rate <= 0:
            return batch
        keep = torch.rand(batch.genes.shape, generator=generator, device=_device(generator)) >= rate  # (B, G)
        return dataclasses.replace(batch, genes=batch.genes * keep.to(batch.genes.device, batch.genes.dtype))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each row's valid tokens: tokens (B, L, D), mask (B, L) bool -> (B, D); 0 for a row with none.
    Padding is selected away (not multiplied by 0), so whatever padded tokens hold cannot leak in."""
    kept = torch.where(mask[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
    count = mask.sum(1, keepdim=True).clamp(min=1).to(tokens.dtype)  # (B, 1)
    return kept.sum(1) / count


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def tile_view(batch: Batch, fraction: float, generator: torch.Generator | None = None) -> Batch:
    """A random subset of each patient's tokens: ``ceil(fraction x n)`` of its n real tokens, in their raster
    order, gathered into a batch ``ceil(fraction x L)`` tokens long (so a view costs ``fraction`` of a pass).

    TANGLE and THREADS sample random patch subsets of a slide as its views; two of them are two views of one
    patient for the intra-modality term. Tile targets are dropped (pretraining does not read them)."""
    mask = batch.token_mask  # (B, L)
    b, length = mask.shape
    keep = max(1, math.ceil(fraction * length))
    scores = torch.rand(b, length, generator=generator, device=_device(generator)).to(mask.device)
    scores = torch.where(mask, scores, torch.full_like(scores, -1.0))  # real tokens first, padding last
    chosen = scores.topk(keep, dim=1).indices.sort(dim=1).values  # (B, keep): raster order kept
    count = torch.ceil(fraction * mask.sum(1).float()).long().clamp(min=1)  # (B,) tokens each patient keeps
    rank = scores.gather(1, chosen).argsort(dim=1, descending=True).argsort(dim=1)  # (B, keep) rank among chosen
    view_mask = mask.gather(1, chosen) & (rank < count[:, None])  # (B, keep)

    def take(x: torch.Tensor) -> torch.Tensor:
        index = chosen.view(b, keep, *([1] * (x.dim() - 2))).expand(b, keep, *x.shape[2:])
        return x.gather(1, index)

    return dataclasses.replace(batch, features=take(batch.features), positions=take(batch.positions),
                               slide_index=torch.where(view_mask, take(batch.slide_index), -1), token_mask=view_mask,
                               tile_targets=None)
