"""Gated attention MIL pooling (Ilse, Tomczak & Welling, ICML 2018), the image-only baseline's encoder.

h_k = ReLU(W x_k); a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))) over the bag's valid tokens;
pooled = sum_k a_k h_k. Padding gets weight exactly 0, and a bag with no valid token pools to zeros
with all-zero attention (no NaN), so a patient without slides is handled by the caller's
missing-modality token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wsiomics.models.blocks import init_weights


@dataclass
class ABMILConfig:
    in_dim: int
    dim: int = 128
    attn_dim: int = 64
    dropout: float = 0.1


class ABMIL(nn.Module):
    """Features ``(B, L, Din)`` + mask -> (pooled ``(B, D)``, attention ``(B, L)``)."""

    def __init__(self, cfg: ABMILConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Sequential(nn.Linear(cfg.in_dim, cfg.dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attn_v = nn.Sequential(nn.Linear(cfg.dim, cfg.attn_dim), nn.Tanh())
        self.attn_u = nn.Sequential(nn.Linear(cfg.dim, cfg.attn_dim), nn.Sigmoid())
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.attn_w = nn.Linear(cfg.attn_dim, 1)
        init_weights(self)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def forward(self, features: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # features: (B, L, Din); token_mask: (B, L) bool, True = valid, or None (all valid)
        h = self.proj(features)  # (B, L, D)
        scores = self.attn_w(self.attn_drop(self.attn_v(h) * self.attn_u(h)))[..., 0].float()  # (B, L)
        if token_mask is not None:
            scores = scores.masked_fill(~token_mask, torch.finfo(scores.dtype).min)
        attention = scores.softmax(dim=-1)  # (B, L); exp(min - max) == 0 at padding of a non-empty bag
        if token_mask is not None:
            attention = attention * token_mask.to(attention.dtype)  # empty bag: uniform -> zeros
            h = h.masked_fill(~token_mask[..., None], 0.0)
        pooled = torch.einsum("bl,bld->bd", attention.to(h.dtype), h)  # (B, D)
        return pooled, attention
