"""Pre-norm transformer blocks on :func:`torch.nn.functional.scaled_dot_product_attention`.

Every attention in the models goes through SDPA, so no (L, L) score matrix is ever built here and
memory stays linear in tokens wherever a fused kernel (flash / memory-efficient, CPU or CUDA) applies.
Masks are key-padding masks, ``(B, L)`` bool with True = a real token; they become SDPA's boolean
``attn_mask`` of shape ``(B, 1, 1, L)``. Pass ``None`` when nothing is padded (batch 1, or a full
batch): then SDPA can take its fastest kernel.

A query row whose keys are all masked would make SDPA return NaN; the blocks guard that case by
attending over all keys and then giving that row a zero update (its residual passes unchanged), so
an empty context (a patient without expression, say) is a no-op rather than a NaN.

Attention-weight dropout is not used: on CPU it forces SDPA's math kernel, which materialises the
(L, L) matrix. ``dropout`` applies to the attention output projection and the MLP instead.

``Mlp``, ``DropPath`` and ``trunc_normal_`` follow timm's layers (same layout and parameter names) but are
defined here: importing timm pulls in all of torchvision's models, about 1 s of start-up that every
training job (a Snakemake job, a process of its own) would pay for three small layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "CrossAttentionBlock", "DropPath", "FeatureStandardizer", "HeadSplit", "Mlp",
           "SelfAttentionBlock", "init_weights", "trunc_normal_"]


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """Fill ``tensor`` from N(mean, std^2) truncated to [a, b] by the inverse CDF of a truncated uniform.

    The same draws as timm's ``trunc_normal_`` (torch's own now samples differently), so models
    initialise exactly as they did on timm's layers.
    """
    def cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1).erfinv_()
    return tensor.mul_(std * math.sqrt(2.0)).add_(mean).clamp_(min=a, max=b)


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout, with timm's ``Mlp`` parameter names.

    ``drop`` is one rate for both dropouts or a pair (after fc1, after fc2).
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float | tuple[float, float] = 0.0) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        drop1, drop2 = drop if isinstance(drop, tuple) else (drop, drop)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability ``p`` and
    scale the kept ones by 1 / (1 - p); the identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path rate {p} is outside [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, ...) -> same shape
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _safe_key_mask(key_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``key_mask (B, Lk)`` -> (SDPA mask ``(B, 1, 1, Lk)``, rows-with-a-key ``(B,)``); both None if no mask.

    Rows with no valid key get all keys valid (finite output) and are flagged so the caller zeroes them.
    """
    if key_mask is None:
        return None, None
    has_key = key_mask.any(dim=-1)  # (B,)
    mask = key_mask | ~has_key[:, None]  # (B, Lk)
    return mask[:, None, None, :], has_key


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context`` (self-attention when context is None)."""

    def __init__(self, dim: int, heads: int, *, kv_dim: int | None = None, proj_drop: float = 0.0,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        kv_dim = dim if kv_dim is None else kv_dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, Lq, D); context: (B, Lk, Dkv) or None (= x); key_mask: (B, Lk) bool or None
        context = x if context is None else context
        b, lq, d = x.shape
        q = self._split(self.q(x))  # (B, H, Lq, Dh)
        k, v = self._kv(context)  # (B, H, Lk, Dh) each
        mask, has_key = _safe_key_mask(key_mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, Dh)
        out = out.transpose(1, 2).reshape(b, lq, d)  # (B, Lq, D)
        out = self.proj_drop(self.proj(out))
        if has_key is not None:
            out = out * has_key[:, None, None].to(out.dtype)
        return out

    def _kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = context.shape
        kv = self.kv(context).view(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, H, N, Dh)
        return kv[0], kv[1]

    def query_weights(self, query: torch.Tensor, context: torch.Tensor,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Head-averaged softmax weights of a few queries over the keys, without any (Lk, Lk) matrix.

        query: (B, Q, D) (Q small, e.g. the [CLS] row); context: (B, Lk, Dkv); key_mask: (B, Lk) bool.
        Returns (B, Q, Lk); zeros at masked keys; a row with no valid key is all zeros.
        """
        q = self._split(self.q(query))  # (B, H, Q, Dh)
        k, _ = self._kv(context)  # (B, H, Lk, Dh)
        scores = (q @ k.transpose(-2, -1)).float() * self.head_dim ** -0.5  # (B, H, Q, Lk), Q*Lk only
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1).mean(dim=1)  # (B, Q, Lk)
        if key_mask is not None:
            weights = weights * key_mask[:, None, :].to(weights.dtype)  # zeros at padding and for empty rows
        return weights


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, proj_drop=dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, L, D); key_mask: (B, L) bool, True = valid key, or None
        x = x + self.drop_path(self.attn(self.norm1(x), key_mask=key_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, L, D)

    def query_weights(self, x: torch.Tensor, query_index: int = 0,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of token ``query_index`` over all tokens of ``x`` as this block computes it: (B, L)."""
        h = self.norm1(x)  # (B, L, D)
        return self.attn.query_weights(h[:, query_index:query_index + 1], h, key_mask)[:, 0]


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: queries attend to a context with its own key-padding mask, then an MLP.

    A query row whose context is empty (all keys masked) gets a zero attention update; the MLP still
    applies to the residual, like it does after any attention update.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, mlp_ratio: float = 2.0,
                 dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(context_dim)
        self.attn = Attention(dim, heads, kv_dim=context_dim, proj_drop=dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, Lq, D) queries; context: (B, Lk, Dc); context_mask: (B, Lk) bool, True = valid, or None
        x = x + self.drop_path(self.attn(self.norm_q(x), self.norm_kv(context), key_mask=context_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, Lq, D)


def init_weights(module: nn.Module) -> None:
    """timm-style init: truncated-normal (std 0.02) linears with zero bias, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FeatureStandardizer(nn.Module):
    """(x - mean) / std per feature dimension, with fixed (non-learned) statistics; identity until set."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_statistics(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(self.mean.shape)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(self.std.shape)
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))  # constant dims pass unscaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, L, D)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class HeadSplit(nn.Module):
    """Parameter groups for fine-tuning, where encoders get a lower LR: ``head_parameters`` are the modules
    listed in ``_heads``, ``encoder_parameters`` everything else."""

    _heads: tuple[str, ...] = ("head",)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for name in self._heads:
            yield from getattr(self, name).parameters()

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return (p for p in self.parameters() if id(p) not in head)
