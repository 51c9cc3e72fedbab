"""Group multi-head self-attention (GMSA) gene encoder, GiMP's gene side.

The expression vector (fixed gene order) is cut into groups, each group is embedded into one token by
its own linear layer, and a [CLS] token plus the group tokens go through pre-norm SDPA blocks; the
[CLS] output is the gene token.

Groups are either ``n_groups`` contiguous runs of the gene order, sized as evenly as possible
(``numpy.array_split``: sizes differ by at most one; smaller groups are zero-padded to the largest),
or given per gene by ``group_of_gene`` (a group index per gene from a gene-set table, e.g. MSigDB
families as in MCAT / PathOmics; genes with index -1 are dropped). A group with no gene (fewer genes
than groups, or a gene set without any of the cohort's genes) keeps its token slot but is masked out
as an attention key everywhere; :attr:`GeneGMSA.group_valid` says which slots are real.

The per-group linears are one einsum over a padded ``(n_groups, max_group_size)`` gather of the genes,
with the padded weight rows kept at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wsiomics.models.blocks import SelfAttentionBlock, init_weights, trunc_normal_


@dataclass
class GeneGMSAConfig:
    n_genes: int
    n_groups: int = 16
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    group_of_gene: tuple[int, ...] | None = None  # one group index per gene (-1 = drop); None = contiguous

    def __post_init__(self) -> None:
        if self.n_genes < 1 or self.n_groups < 1:
            raise ValueError(f"n_genes and n_groups must be >= 1, got {self.n_genes}, {self.n_groups}")
        if self.group_of_gene is not None:
            self.group_of_gene = tuple(int(g) for g in self.group_of_gene)
            if len(self.group_of_gene) != self.n_genes:
                raise ValueError(f"group_of_gene has {len(self.group_of_gene)} entries for n_genes={self.n_genes}; "
                                 "give one group index per gene, in the cohort's gene order")
            bad = [g for g in self.group_of_gene if g < -1 or g >= self.n_groups]
            if bad:
                raise ValueError(f"group_of_gene has indices {sorted(set(bad))[:5]} outside "
                                 f"[-1, n_groups={self.n_groups})")
            if all(g == -1 for g in self.group_of_gene):
                raise ValueError("group_of_gene drops every gene (all -1): "
                                 "the gene-set table matches none of the genes")


def group_index(cfg: GeneGMSAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather table for the groups: gene index ``(n_groups, S)`` long and validity ``(n_groups, S)`` bool."""
    if cfg.group_of_gene is None:
        members = [a.tolist() for a in np.array_split(np.arange(cfg.n_genes), cfg.n_groups)]
    else:
        assign = np.asarray(cfg.group_of_gene)
        members = [np.flatnonzero(assign == g).tolist() for g in range(cfg.n_groups)]
    size = max(1, max(len(m) for m in members))
    index = torch.zeros(cfg.n_groups, size, dtype=torch.long)
    valid = torch.zeros(cfg.n_groups, size, dtype=torch.bool)
    for g, m in enumerate(members):
        index[g, :len(m)] = torch.as_tensor(m, dtype=torch.long)
        valid[g, :len(m)] = True
    return index, valid


class GeneGMSA(nn.Module):
    """Genes ``(B, G)`` -> (gene [CLS] ``(B, D)``, group tokens ``(B, n_groups, D)``)."""

    def __init__(self, cfg: GeneGMSAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        index, valid = group_index(cfg)
        self.register_buffer("gene_index", index, persistent=False)  # (n_groups, S)
        self.register_buffer("gene_valid", valid, persistent=False)  # (n_groups, S)
        self.register_buffer("group_valid", valid.any(dim=1), persistent=False)  # (n_groups,)
        self._all_groups_valid = bool(valid.any(dim=1).all())
        n, s = index.shape
        self.group_weight = nn.Parameter(torch.empty(n, s, cfg.dim))  # one (S, D) linear per group
        self.group_bias = nn.Parameter(torch.zeros(n, cfg.dim))
        self.group_embed = nn.Parameter(torch.zeros(1, n, cfg.dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        init_weights(self)
        self._init_groups()
        trunc_normal_(self.group_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    @torch.no_grad()
    def _init_groups(self) -> None:
        # like nn.Linear(size_g, D) per group (uniform +-1/sqrt(fan_in)); padded rows stay zero
        sizes = self.gene_valid.sum(dim=1).clamp(min=1).float()  # (n_groups,)
        bound = (1.0 / sizes.sqrt())[:, None, None]
        self.group_weight.uniform_(-1.0, 1.0).mul_(bound).mul_(self.gene_valid[..., None])
        self.group_bias.uniform_(-1.0, 1.0).mul_(bound[:, :, 0])

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "group_embed", "group_bias"}

    @property
    def n_tokens(self) -> int:
        return int(self.gene_index.shape[0])

    def embed(self, genes: torch.Tensor) -> torch.Tensor:
        # genes: (B, G) -> group tokens (B, n_groups, D)
        if genes.shape[-1] != self.cfg.n_genes:
            raise ValueError(f"expected {self.cfg.n_genes} genes per patient, got {genes.shape[-1]}; "
                             "the model was built for another gene list")
        x = genes[:, self.gene_index] * self.gene_valid.to(genes.dtype)  # (B, n_groups, S)
        w = self.group_weight * self.gene_valid[..., None].to(self.group_weight.dtype)  # padding stays inert
        tokens = torch.einsum("bgs,gsd->bgd", x, w) + self.group_bias  # (B, n_groups, D)
        return self.drop(tokens + self.group_embed)

    def forward(self, genes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # genes: (B, G) -> cls (B, D), tokens (B, n_groups, D)
        tokens = self.embed(genes)
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)  # (B, 1+n_groups, D)
        key_mask = None
        if not self._all_groups_valid:
            key_mask = torch.cat([self.group_valid.new_ones(1), self.group_valid])[None].expand(b, -1)  # (B, 1+n)
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]
