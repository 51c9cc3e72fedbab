"""Gene encoders for MGI: Mamba over the gene sequence, and the transformer and MLP it is compared with.

All three take ``genes: (B, G)`` (z-scored expression in the fold's stable gene order) and return a
:class:`GeneEncoding` ``(pooled, tokens)``: ``pooled (B, out_dim)`` is the projection-head output (what a
contrastive loss compares), ``tokens (B, T, dim)`` the final-normed token features before pooling (what a
fusion decoder can attend to). A patient without expression is handled outside the encoder.

Tokenisation (Mamba and transformer): ``genes_per_token`` consecutive genes form one token (the last token
zero-padded; 1 = one token per gene), a value projection ``Linear(genes_per_token, dim)`` (one per token by
default, see :class:`GeneTokenizer`) plus a learned gene-position embedding ``(T, dim)``. The Mamba encoder
stacks pre-norm residual blocks ``x + Mamba(norm(x))`` (optionally bidirectional), then a final norm, mean
pooling over tokens and the head.
The transformer uses the project's pre-norm SDPA blocks (:mod:`wsiomics.models.blocks`) in the same frame.
The MLP reads the whole vector at once and has a single token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from wsiomics.models.blocks import DropPath, SelfAttentionBlock, init_weights, trunc_normal_
from wsiomics.models.mamba import BiMamba, Mamba, init_mamba_weights

HeadKind = Literal["linear", "mlp"]
ProjectionKind = Literal["per_token", "shared"]
NormKind = Literal["layernorm", "rmsnorm"]


class GeneEncoding(NamedTuple):
    pooled: Tensor  # (B, out_dim)
    tokens: Tensor  # (B, T, dim)


def _check_common(n_genes: int, dim: int, head: str, out_dim: int | None, dropout: float) -> None:
    if n_genes < 1 or dim < 1:
        raise ValueError(f"n_genes and dim must be >= 1; got n_genes={n_genes}, dim={dim}")
    if head not in ("linear", "mlp"):
        raise ValueError(f"head must be 'linear' or 'mlp'; got {head!r}")
    if out_dim is not None and out_dim < 1:
        raise ValueError(f"out_dim must be >= 1 or None (= dim); got {out_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")


@dataclass
class GeneMambaConfig:
    n_genes: int
    genes_per_token: int = 1
    token_projection: ProjectionKind = "per_token"
    dim: int = 128
    depth: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    bidirectional: bool = False
    norm: NormKind = "rmsnorm"  # the reference Mamba stacks use RMSNorm
    dropout: float = 0.0
    drop_path: float = 0.0
    head: HeadKind = "linear"
    out_dim: int | None = None  # None = dim
    # recompute each block in the backward: ~1/3 more time, activations of one block only; not applied where
    # the sequence is longer than recompute_length, whose stretch recompute already keeps less
    checkpoint: bool = False
    recompute_length: int | None = 2048  # longer sequences: each Mamba block in stretches, recomputed (see Mamba)

    def __post_init__(self) -> None:
        _check_common(self.n_genes, self.dim, self.head, self.out_dim, self.dropout)
        if self.genes_per_token < 1 or self.depth < 1:
            raise ValueError(f"genes_per_token and depth must be >= 1; got {self.genes_per_token}, {self.depth}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm'; got {self.norm!r}")


@dataclass
class GeneTransformerConfig:
    n_genes: int
    genes_per_token: int = 1
    token_projection: ProjectionKind = "per_token"
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    drop_path: float = 0.0
    head: HeadKind = "linear"
    out_dim: int | None = None

    def __post_init__(self) -> None:
        _check_common(self.n_genes, self.dim, self.head, self.out_dim, self.dropout)
        if self.genes_per_token < 1 or self.depth < 1:
            raise ValueError(f"genes_per_token and depth must be >= 1; got {self.genes_per_token}, {self.depth}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")


@dataclass
class GeneMLPConfig:
    n_genes: int
    dim: int = 128
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.1
    head: HeadKind = "linear"
    out_dim: int | None = None

    def __post_init__(self) -> None:
        _check_common(self.n_genes, self.dim, self.head, self.out_dim, self.dropout)
        self.hidden = tuple(int(h) for h in self.hidden)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1; got {self.hidden}")


def _norm(kind: NormKind, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-5) if kind == "rmsnorm" else nn.LayerNorm(dim)


def _head(kind: HeadKind, dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, out_dim)
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out_dim))


class GeneTokenizer(nn.Module):
    """genes (B, G) -> tokens (B, T, dim), T = ceil(G / genes_per_token): value projection + position embedding.

    ``projection="per_token"`` gives every token its own ``Linear(genes_per_token, dim)`` (as GMSA embeds each
    gene group with its own layer), so a gene's weight depends on the gene, not on its slot within a token;
    ``"shared"`` uses one projection for all tokens (with one gene per token: a learned vector scaled by
    the value). The shared one could not learn the demo's expression programme from ~20 patients (genes of
    the programme sit in different slots of different tokens); per-token could.
    """

    def __init__(self, n_genes: int, genes_per_token: int, dim: int, projection: ProjectionKind = "per_token"
                 ) -> None:
        super().__init__()
        if projection not in ("per_token", "shared"):
            raise ValueError(f"token_projection must be 'per_token' or 'shared'; got {projection!r}")
        self.n_genes = n_genes
        self.genes_per_token = genes_per_token
        self.n_tokens = math.ceil(n_genes / genes_per_token)
        self.projection = projection
        if projection == "shared":
            self.value = nn.Linear(genes_per_token, dim)
        else:  # (T, g, dim) weights, initialised as nn.Linear would be per token
            bound = 1.0 / math.sqrt(genes_per_token)
            self.weight = nn.Parameter(torch.empty(self.n_tokens, genes_per_token, dim).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(self.n_tokens, dim).uniform_(-bound, bound))
        self.position = nn.Parameter(torch.zeros(1, self.n_tokens, dim))
        trunc_normal_(self.position, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"position"} | ({"bias"} if self.projection == "per_token" else set())

    def forward(self, genes: Tensor) -> Tensor:
        # genes: (B, G)
        if genes.dim() != 2 or genes.shape[1] != self.n_genes:
            raise ValueError(f"expected genes of shape (batch, {self.n_genes}); got {tuple(genes.shape)}: "
                             "the encoder was built for another gene list")
        pad = self.n_tokens * self.genes_per_token - self.n_genes
        x = nn.functional.pad(genes, (0, pad)).view(genes.shape[0], self.n_tokens, self.genes_per_token)  # (B, T, g)
        if self.projection == "shared":
            values = self.value(x)  # (B, T, dim)
        else:
            values = torch.einsum("btg,tgd->btd", x, self.weight) + self.bias  # (B, T, dim)
        return values + self.position  # (B, T, dim)


class _GeneEncoderBase(nn.Module):
    """Shared frame: tokens -> blocks -> final norm -> mean pool -> head."""

    tokenizer: GeneTokenizer

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim or self.cfg.dim

    @property
    def n_tokens(self) -> int:
        return self.tokenizer.n_tokens


class MambaResidualBlock(nn.Module):
    """Pre-norm residual Mamba block: x + DropPath(Dropout(Mamba(norm(x))))."""

    def __init__(self, cfg: GeneMambaConfig, drop_path: float) -> None:
        super().__init__()
        self.norm = _norm(cfg.norm, cfg.dim)
        block = dict(d_model=cfg.dim, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                     recompute_length=cfg.recompute_length)
        self.mixer = BiMamba(**block) if cfg.bidirectional else Mamba(**block)
        self.drop = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, T, D)
        return x + self.drop_path(self.drop(self.mixer(self.norm(x))))


class GeneMambaEncoder(_GeneEncoderBase):
    """MGI's gene encoder: genes (B, G) -> GeneEncoding(pooled (B, out_dim), tokens (B, T, dim))."""

    def __init__(self, cfg: GeneMambaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = GeneTokenizer(cfg.n_genes, cfg.genes_per_token, cfg.dim, cfg.token_projection)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(MambaResidualBlock(cfg, r) for r in rates)
        self.norm = _norm(cfg.norm, cfg.dim)
        self.head = _head(cfg.head, cfg.dim, self.out_dim)
        self.apply(partial(init_mamba_weights, n_layer=cfg.depth))  # the reference stack's init

    def forward(self, genes: Tensor) -> GeneEncoding:
        # genes: (B, G)
        x = self.tokenizer(genes)  # (B, T, D)
        for block in self.blocks:
            stretched = self.cfg.recompute_length is not None and x.shape[1] > self.cfg.recompute_length
            if self.cfg.checkpoint and torch.is_grad_enabled() and not stretched:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        return GeneEncoding(self.head(x.mean(dim=1)), x)  # (B, out_dim), (B, T, D)


class GeneTransformerEncoder(_GeneEncoderBase):
    """The transformer baseline in the same frame: pre-norm SDPA blocks instead of Mamba blocks."""

    def __init__(self, cfg: GeneTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = GeneTokenizer(cfg.n_genes, cfg.genes_per_token, cfg.dim, cfg.token_projection)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = _head(cfg.head, cfg.dim, self.out_dim)
        init_weights(self.blocks)

    def forward(self, genes: Tensor) -> GeneEncoding:
        # genes: (B, G)
        x = self.tokenizer(genes)  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return GeneEncoding(self.head(x.mean(dim=1)), x)  # (B, out_dim), (B, T, D)


class GeneMLPEncoder(nn.Module):
    """The MLP baseline: LayerNorm, then (Linear, GELU, Dropout) per hidden width, Linear to dim, LayerNorm."""

    def __init__(self, cfg: GeneMLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [nn.LayerNorm(cfg.n_genes)]
        width = cfg.n_genes
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = h
        layers += [nn.Linear(width, cfg.dim), nn.LayerNorm(cfg.dim)]
        self.mlp = nn.Sequential(*layers)
        self.head = _head(cfg.head, cfg.dim, self.out_dim)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim or self.cfg.dim

    @property
    def n_tokens(self) -> int:
        return 1

    def forward(self, genes: Tensor) -> GeneEncoding:
        # genes: (B, G)
        if genes.dim() != 2 or genes.shape[1] != self.cfg.n_genes:
            raise ValueError(f"expected genes of shape (batch, {self.cfg.n_genes}); got {tuple(genes.shape)}: "
                             "the encoder was built for another gene list")
        x = self.mlp(genes)  # (B, dim)
        return GeneEncoding(self.head(x), x[:, None])  # (B, out_dim), (B, 1, dim)


GENE_ENCODERS: dict[str, tuple[type, type]] = {
    "mamba": (GeneMambaEncoder, GeneMambaConfig),
    "transformer": (GeneTransformerEncoder, GeneTransformerConfig),
    "mlp": (GeneMLPEncoder, GeneMLPConfig),
}


def build_gene_encoder(kind: str, n_genes: int, **cfg) -> nn.Module:
    """``build_gene_encoder("mamba", 2000, genes_per_token=8, dim=128)``; kind in mamba, transformer, mlp."""
    if kind not in GENE_ENCODERS:
        raise ValueError(f"unknown gene encoder {kind!r}; choose one of {', '.join(GENE_ENCODERS)}")
    model_cls, config_cls = GENE_ENCODERS[kind]
    allowed = {f.name for f in fields(config_cls)} - {"n_genes"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for the {kind} gene encoder; "
                         f"valid: {', '.join(sorted(allowed))}")
    return model_cls(config_cls(n_genes=n_genes, **cfg))
