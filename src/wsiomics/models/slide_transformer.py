"""Slide transformer: a patient's patch features as tokens, [CLS], 2-D grid positions, pre-norm SDPA blocks.

GiMP's image encoder and MGI's ViT image encoder. Positions are the dataset's grid (col, row) in patch
units (coords / patch size at level 0), so a 20x and a 40x scan of the same tissue get the same
encoding; they are not normalised by slide size, so the encoding depends on grid position only.
Memory is linear in tokens: attention is SDPA with a key-padding mask, and :meth:`cls_attention`
scores the [CLS] row alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wsiomics.models.blocks import SelfAttentionBlock, init_weights, trunc_normal_

POS_ENCODINGS = ("sincos", "none")


def sincos_2d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine-cosine encoding of (col, row) positions: ``(..., 2) -> (..., dim)``.

    Half the channels encode the column, half the row, each as [sin(p w_i), cos(p w_i)] with
    w_i = temperature^(-i / (dim/4)) (MAE / ViT-style); positions may be fractional.
    """
    if dim % 4:
        raise ValueError(f"sin-cos 2-D positional encoding needs a width divisible by 4, got {dim}")
    n = dim // 4
    omega = temperature ** -(torch.arange(n, dtype=torch.float32, device=positions.device) / n)  # (n,)
    p = positions.float()[..., :, None] * omega  # (..., 2, n)
    enc = torch.cat([p.sin(), p.cos()], dim=-1)  # (..., 2, 2n): [col sin|cos, row sin|cos]
    return enc.flatten(-2)  # (..., dim)


@dataclass
class SlideTransformerConfig:
    in_dim: int
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    drop_path: float = 0.0
    pos_encoding: str = "sincos"  # "sincos" (2-D grid positions) or "none"

    def __post_init__(self) -> None:
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


class SlideTransformer(nn.Module):
    """Patch features -> (image [CLS], per-token outputs)."""

    def __init__(self, cfg: SlideTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.pos_encoding == "sincos" and cfg.dim % 4:
            raise ValueError(f"pos_encoding 'sincos' needs dim divisible by 4, got dim={cfg.dim}")
        # Linear + GELU like CLAM / TransMIL's input layer; no input LayerNorm, so feature scale survives.
        self.proj = nn.Sequential(nn.Linear(cfg.in_dim, cfg.dim), nn.GELU(), nn.Dropout(cfg.dropout))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim)
        init_weights(self)
        trunc_normal_(self.cls_token, std=0.02)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        # features: (B, L, Din) -> (B, L, D)
        return self.proj(features)

    def _prepare(self, tokens: torch.Tensor, positions: torch.Tensor,
                 token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # tokens: (B, L, D); positions: (B, L, 2); token_mask: (B, L) -> x (B, 1+L, D), key mask (B, 1+L) or None
        if self.cfg.pos_encoding == "sincos":
            tokens = tokens + sincos_2d(positions, self.cfg.dim).to(tokens.dtype)
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)  # (B, 1+L, D)
        key_mask = None
        if token_mask is not None and not bool(token_mask.all()):  # one sync; no mask -> fastest SDPA kernel
            key_mask = torch.cat([token_mask.new_ones(b, 1), token_mask], dim=1)  # [CLS] always a valid key
        return x, key_mask

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, token_mask: torch.Tensor | None,
             attention: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x, key_mask = self._prepare(tokens, positions, token_mask)  # (B, 1+L, D)
        weights = None
        for i, block in enumerate(self.blocks):
            if attention and i == len(self.blocks) - 1:
                weights = self._cls_weights(block, x, key_mask)
            x = block(x, key_mask)
        x = self.norm(x)
        return x[:, 0], x[:, 1:], weights  # (B, D), (B, L, D), (B, L) or None

    @staticmethod
    def _cls_weights(block: SelfAttentionBlock, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        # [CLS] row over the patch tokens only (its own key left out), renormalised: (B, L), zeros at padding
        mask = None if key_mask is None else key_mask.clone()
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        mask[:, 0] = False
        return block.query_weights(x, 0, mask)[:, 1:]

    def encode(self, tokens: torch.Tensor, positions: torch.Tensor,
               token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens: (B, L, D) embedded; positions: (B, L, 2) grid (col, row); token_mask: (B, L) bool or None
        cls, out, _ = self._run(tokens, positions, token_mask, attention=False)
        return cls, out  # (B, D), (B, L, D)

    def encode_with_attention(self, tokens: torch.Tensor, positions: torch.Tensor,
                              token_mask: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`encode` plus :meth:`cls_attention` from the same pass: (B, D), (B, L, D), (B, L)."""
        cls, out, weights = self._run(tokens, positions, token_mask, attention=True)
        return cls, out, weights

    def forward(self, features: torch.Tensor, positions: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # features: (B, L, Din); positions: (B, L, 2); token_mask: (B, L) -> (B, D), (B, L, D)
        return self.encode(self.embed(features), positions, token_mask)

    def cls_attention(self, tokens_in: torch.Tensor, positions: torch.Tensor,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The [CLS] query's attention over the patch tokens in the last block, for heatmaps.

        tokens_in: (B, L, D) embedded tokens (the input of :meth:`encode`). Head-averaged softmax of
        q_cls . K over the patch tokens (the [CLS] key itself left out), so each row sums to 1 over its
        valid tokens; zeros at padding, all zeros for a patient with no token. Returns (B, L).
        """
        return self._run(tokens_in, positions, token_mask, attention=True)[2]
