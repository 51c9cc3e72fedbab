"""Tumour segmentation on the tile grid: a light fusion decoder over the slide transformer's tile tokens.

MGI's segmentation fine-tune in the WSI setting (../shared/METHODS.md): the image encoder's per-tile
output tokens go through ``decoder_depth`` fusion blocks conditioned on the patient's gene embedding,
then a linear layer gives one tumour logit per tile. Conditioning (``conditioning``):

- ``film``: per-channel scale and shift from the projected gene embedding, ``LN(x) (1 + gamma) + beta``,
  then a residual MLP (gamma, beta start at zero: the block starts as a plain residual MLP);
- ``cross_attention``: every tile token attends to the gene encoder's tokens (pre-norm SDPA block);
- with ``use_genes=False`` (method ``image_seg``) the blocks are residual MLPs and no gene module exists.

Submodule names equal :class:`~wsiomics.models.mgi.MGI`'s (``feature_norm``, ``image_encoder``,
``gene_scale``, ``gene_encoder``, ``gene_proj``, ``gene_missing``), so
:meth:`TumourSegmenter.load_pretrained` initialises them from a pretrained MGI checkpoint. Loss: BCE over
the tiles that have a target plus ``dice_weight`` x soft Dice (:func:`soft_dice_loss`) per patient.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsiomics.models.batch import Batch, ModelOutput
from wsiomics.models.blocks import CrossAttentionBlock, FeatureStandardizer, Mlp, init_weights, trunc_normal_
from wsiomics.models.gene_mamba import GENE_ENCODERS, build_gene_encoder
from wsiomics.models.mgi import PROJECTIONS, _projection
from wsiomics.models.slide_transformer import SlideTransformer, SlideTransformerConfig

CONDITIONINGS = ("film", "cross_attention")
ENCODER_MODULES = ("feature_norm", "image_encoder", "gene_scale", "gene_encoder", "gene_proj", "gene_missing")


def soft_dice_loss(probs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
                   eps: float = 1.0) -> torch.Tensor:
    """Mean over rows of ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)``, over each row's valid entries.

    probs, targets: (B, L) in [0, 1]; valid: (B, L) bool or None (all). Rows without a valid entry are
    left out; 0 (attached to the graph) when no row has one. ``eps`` smooths empty rows (no tumour,
    none predicted: loss 0).
    """
    valid = torch.ones_like(probs, dtype=torch.bool) if valid is None else valid
    p = torch.where(valid, probs.float(), 0.0)
    t = torch.where(valid, targets.float(), 0.0)
    rows = valid.any(dim=1)  # (B,)
    if not bool(rows.any()):
        return probs.sum() * 0.0
    inter = (p * t).sum(dim=1)
    dice = (2 * inter + eps) / (p.sum(dim=1) + t.sum(dim=1) + eps)  # (B,)
    return (1 - dice)[rows].mean()


@dataclass
class SegmenterConfig:
    """``image`` may be a dict; ``gene`` holds :func:`build_gene_encoder` options (as in MGI)."""

    image: SlideTransformerConfig
    n_genes: int = 1
    use_genes: bool = True
    conditioning: str = "film"  # film | cross_attention
    gene_encoder: str = "mamba"
    gene: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 64  # projected gene embedding (FiLM's input), as MGI's shared space
    gene_scale: bool = True  # MGI's learned per-gene scale
    projection: str = "mlp"
    decoder_depth: int = 1
    heads: int = 4  # cross-attention heads
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    dice_weight: float = 1.0  # loss = BCE + dice_weight x soft Dice

    def __post_init__(self) -> None:
        self.image = SlideTransformerConfig(**self.image) if isinstance(self.image, dict) else self.image
        self.gene = dict(self.gene)
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        if self.use_genes and self.gene_encoder not in GENE_ENCODERS:
            raise ValueError(f"gene_encoder must be one of {tuple(GENE_ENCODERS)}, got {self.gene_encoder!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.decoder_depth < 1 or self.dice_weight < 0:
            raise ValueError(f"need decoder_depth >= 1 and dice_weight >= 0; got {self.decoder_depth}, "
                             f"{self.dice_weight}")


class FusionBlock(nn.Module):
    """One decoder block over tile tokens: FiLM + residual MLP, cross-attention to gene tokens, or a plain MLP."""

    def __init__(self, dim: int, kind: str | None, cond_dim: int, heads: int, mlp_ratio: float,
                 dropout: float) -> None:
        super().__init__()
        self.kind = kind
        if kind == "cross_attention":
            self.cross = CrossAttentionBlock(dim, heads, context_dim=cond_dim, mlp_ratio=mlp_ratio, dropout=dropout)
            init_weights(self.cross)
            return
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)
        init_weights(self)
        if kind == "film":
            self.film = nn.Linear(cond_dim, 2 * dim)
            nn.init.zeros_(self.film.weight)  # gamma = beta = 0 at start: identity conditioning
            nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, gene: torch.Tensor | None, gene_tokens: torch.Tensor | None,
                gene_mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, L, D); gene: (B, E); gene_tokens: (B, T, Dt); gene_mask: (B, T) bool
        if self.kind == "cross_attention":
            return self.cross(x, gene_tokens, gene_mask)
        h = self.norm(x)
        if self.kind == "film":
            gamma, beta = self.film(gene).chunk(2, dim=-1)  # (B, D) each
            h = h * (1 + gamma[:, None]) + beta[:, None]
        return x + self.mlp(h)  # (B, L, D)


class TumourSegmenter(nn.Module):
    """Slide transformer tile tokens (+ gene embedding) -> per-tile tumour logits."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_norm = FeatureStandardizer(cfg.image.in_dim)  # as MGI's (see wsiomics.models.mgi)
        self.image_encoder = SlideTransformer(cfg.image)
        di = cfg.image.dim
        kind, cond_dim = None, 0
        if cfg.use_genes:
            self.gene_scale = nn.Parameter(torch.ones(cfg.n_genes), requires_grad=cfg.gene_scale)
            self.gene_encoder = build_gene_encoder(cfg.gene_encoder, cfg.n_genes, **cfg.gene)
            dg = self.gene_encoder.out_dim
            self.gene_missing = nn.Parameter(torch.zeros(dg))
            trunc_normal_(self.gene_missing, std=0.02)
            self.gene_proj = _projection(cfg.projection, dg, cfg.embed_dim)
            init_weights(self.gene_proj)
            kind = cfg.conditioning
            cond_dim = cfg.embed_dim if kind == "film" else self.gene_encoder.dim
        self.decoder = nn.ModuleList(FusionBlock(di, kind, cond_dim, cfg.heads, cfg.mlp_ratio, cfg.dropout)
                                     for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(di)
        self.out = nn.Linear(di, 1)
        init_weights(self.decoder_norm)
        init_weights(self.out)

    # -------------------------------------------------- parameters

    def no_weight_decay(self) -> set[str]:
        return {"gene_scale", "gene_missing"} if self.cfg.use_genes else set()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for module in (self.decoder, self.decoder_norm, self.out):
            yield from module.parameters()

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return (p for p in self.parameters() if id(p) not in head)

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Copy the encoder weights (``image_encoder``, and the gene modules when used) from an MGI state dict.

        Every such key of this model must be in ``state`` with the same shape; returns the keys loaded.
        """
        own = self.state_dict()
        wanted = [k for k in own if k.split(".")[0] in ENCODER_MODULES]
        missing = [k for k in wanted if k not in state]
        wrong = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            raise ValueError(f"pretrained weights do not fit the segmentation encoders: missing {missing[:5]}, "
                             f"shape mismatch {wrong[:5]}; pretrain MGI with the same train.model settings")
        self.load_state_dict({k: state[k] for k in wanted}, strict=False)
        return wanted

    # -------------------------------------------------- forward and loss

    def forward(self, batch: Batch) -> ModelOutput:
        enc = self.image_encoder
        tokens = enc.embed(self.feature_norm(batch.features))  # (B, L, Di)
        _, x = enc.encode(tokens, batch.positions, batch.token_mask)  # (B, L, Di)
        gene = gene_tokens = gene_mask = None
        if self.cfg.use_genes:
            pooled, gene_tokens = self.gene_encoder(batch.genes * self.gene_scale)  # (B, Dg), (B, T, Dt)
            pooled = torch.where(batch.has_gene[:, None], pooled, self.gene_missing.to(pooled.dtype))
            gene = self.gene_proj(pooled)  # (B, E)
            gene_mask = batch.has_gene[:, None].expand(-1, gene_tokens.shape[1])  # (B, T)
        for block in self.decoder:
            x = block(x, gene, gene_tokens, gene_mask)
        logits = self.out(self.decoder_norm(x))[..., 0]  # (B, L)
        logits = logits.masked_fill(~batch.token_mask, 0.0)
        return ModelOutput(tile_logits=logits, gene=gene)

    def segmentation_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """BCE over tiles with a target + dice_weight x soft Dice per patient; tiles without a target ignored."""
        if batch.tile_targets is None:
            raise ValueError("segmentation needs per-tile targets in the batch (slides with tumour annotations)")
        logits = self(batch).tile_logits.float()  # (B, L)
        valid = batch.token_mask & ~torch.isnan(batch.tile_targets)
        target = torch.nan_to_num(batch.tile_targets, nan=0.0)
        if not bool(valid.any()):
            zero = logits.new_zeros(())  # no grad: the training loop skips the batch
            return {"loss": zero, "bce": zero.detach(), "dice": zero.detach()}
        bce = F.binary_cross_entropy_with_logits(logits[valid], target[valid])
        dice = soft_dice_loss(torch.sigmoid(logits), target, valid)
        return {"loss": bce + self.cfg.dice_weight * dice, "bce": bce.detach(), "dice": dice.detach()}
