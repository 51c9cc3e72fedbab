"""Mamba (selective state space) in pure PyTorch, with the CUDA kernel of ``mamba_ssm`` used when present.

The selective scan follows ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` argument for
argument, so the reference CUDA kernel can replace it whenever ``mamba_ssm`` is installed and the
tensors live on a GPU:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d and state n)
    y_t = <C_t, h_t> + D * u_t,   then   y *= silu(z)

Shapes: u, delta, z: (B, D, L); A: (D, N) real; B, C: (B, N, L) shared by all channels, (B, G, N, L)
grouped (channel d reads group d // (D / G)), or (D, N) constant; D, delta_bias: (D,). The computation is
fp32 and the output has u's dtype, as in the reference.

``selective_scan`` is the fast CPU/GPU path; ``selective_scan_ref`` is the plain sequential recurrence, kept
only as a test oracle (its autograd graph grows with L and its backward is very slow at long L).

Why this scan is shaped the way it is: A is per (channel, state), so the decay between two positions is a
(D, N) tensor, not the scalar per head that lets Mamba-2's SSD write the intra-chunk part as matrix
products; the quadratic closed form inside a chunk of length T would cost L*D*N*T work, T times the
recurrence itself. Instead each segment of ``segment_size`` positions is cut into chunks of
``chunk_size``. A first sweep over the T positions of a chunk, vectorised across all chunks of the
segment, gives each chunk's own end state from a zero start; the states entering the chunks follow from a
log-depth (Hillis-Steele) scan over the chunks with the chunk decays exp(sum(dt) * A) (cumulative
log-decays, never positive); a second sweep runs the recurrence from those states and stores every
position. Work is O(L*D*N), every exponent is <= 0 and only products of decays in [0, 1] are formed. A
custom autograd function keeps only the inputs and the state at each segment start; its backward
recomputes one segment at a time and runs the same scheme in reverse time for the adjoint, so at most
one segment's (B, segment, D, N) tensors exist at once.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Chosen by bench/gene_encoders.py --tune on 2 CPU cores (d_inner 256, d_state 16): chunk 16 was fastest;
# segments of 256 and 1,024 tie on one thread, and 1,024 needs half the ops (fewer thread hand-offs).
CHUNK_SIZE = 16
SEGMENT_SIZE = 1024

__all__ = [
    "BiMamba",
    "BiMambaConfig",
    "Mamba",
    "MambaConfig",
    "selective_scan",
    "selective_scan_ref",
]


# --------------------------------------------------------------------------------------------- shapes
def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
           delta_bias: Tensor | None) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, length); got {tuple(u.shape)} and "
                         f"{tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.is_complex():
        raise ValueError("complex A is not supported by the pure-PyTorch scan; use a real A of shape (dim, d_state)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, d_state); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if m.dim() == 2:
            ok = m.shape == (dim, n)
        elif m.dim() == 3:
            ok = m.shape == (batch, n, length)
        elif m.dim() == 4:
            ok = m.shape[0] == batch and m.shape[2:] == (n, length) and m.shape[1] > 0 and dim % m.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be (dim, d_state), (batch, d_state, length) or (batch, groups, d_state, "
                             f"length) with dim divisible by groups; got {tuple(m.shape)} for u {tuple(u.shape)}, "
                             f"A {tuple(A.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (dim,):
            raise ValueError(f"{name} must be (dim={dim},); got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}; got {tuple(z.shape)}")


def _grouped(m: Tensor, batch: int, length: int) -> Tensor:
    """B or C as (batch, groups, d_state, length) fp32 (a view where possible)."""
    m = m.float()
    if m.dim() == 2:  # constant per channel: one group per channel
        return m[None, :, :, None].expand(batch, -1, -1, length)
    if m.dim() == 3:
        return m.unsqueeze(1)
    return m


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


# ------------------------------------------------------------------------------------------ reference
def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The sequential recurrence, one position at a time: the oracle the fast scan is tested against.

    Same arguments and results as :func:`selective_scan`; the last state is (batch, dim, d_state).
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    dtype = u.dtype
    batch, dim, length = u.shape
    uf = u.float()
    dt = _prepare_delta(delta, delta_bias, delta_softplus)  # (B, D, L)
    Af = A.float()  # (D, N)
    Bg, Cg = _grouped(B, batch, length), _grouped(C, batch, length)  # (B, G, N, L)
    # channel d reads group d // (D / G): repeat each group's row for its channels
    Bd = Bg.repeat_interleave(dim // Bg.shape[1], dim=1)  # (B, D, N, L)
    Cd = Cg.repeat_interleave(dim // Cg.shape[1], dim=1)
    h = uf.new_zeros(batch, dim, Af.shape[1])  # (B, D, N)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, :, t, None] * Af)  # (B, D, N)
        h = decay * h + (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bd[:, :, :, t]
        ys.append((h * Cd[:, :, :, t]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(batch, dim, 0)  # (B, D, L)
    out = _finish(y, uf, D, z, dtype)
    return (out, h) if return_last_state else out


# ------------------------------------------------------------------------------------- chunked scan
class _Work:
    """Flat fp32 buffers reused by every segment of one call: a fresh multi-MB tensor per op costs page faults
    that took longer than the arithmetic on these 2-core machines."""

    def __init__(self, like: Tensor, numel: int):
        self._like, self._numel, self._bufs = like, numel, {}

    def get(self, name: str, *shape: int) -> Tensor:
        if name not in self._bufs:
            self._bufs[name] = self._like.new_empty(self._numel)
        return self._bufs[name][: math.prod(shape)].view(shape)


def _chunked(t: Tensor, s0: int, s1: int, T: int) -> Tensor:
    """(B, L, ...) positions s0:s1 -> contiguous (B, T, k, ...): position s0 + j*T + t sits at [:, t, j]."""
    part = t[:, s0:s1]
    return part.reshape(part.shape[0], (s1 - s0) // T, T, *part.shape[2:]).transpose(1, 2).contiguous()


def _unchunk_into(dest: Tensor, s0: int, s1: int, t: Tensor) -> None:
    """Write chunked ``t`` (B, T, k, ...) to positions s0:s1 of ``dest`` (B, L, ...) in one copy."""
    batch, T, k = t.shape[:3]
    dest[:, s0:s1].view(batch, k, T, *dest.shape[2:]).copy_(t.reshape(batch, T, k, *dest.shape[2:]).transpose(1, 2))


def _affine_scan(decay: Tensor, add: Tensor, s0: Tensor) -> Tensor:
    """s_j = decay_j * s_{j-1} + add_j along dim 1 with s_{-1} = s0, all j: (B, k, D, N).

    Hillis-Steele: log2(k) rounds of whole-tensor ops instead of k small ones; only products of decays
    (each in [0, 1]) are formed, never a quotient.
    """
    k = decay.shape[1]
    s = add.clone()
    s[:, 0].addcmul_(decay[:, 0], s0)
    d = decay
    o = 1
    while o < k:
        s = torch.cat([s[:, :o], torch.addcmul(s[:, o:], d[:, o:], s[:, :-o])], dim=1)
        if 2 * o < k:
            d = torch.cat([d[:, :o], d[:, o:] * d[:, :-o]], dim=1)
        o *= 2
    return s


def _seg_states(ws: _Work, dtc: Tensor, xc: Tensor, Bc: Tensor, A: Tensor, h0: Tensor):
    """All states of one segment.

    dtc, xc: (B, T, k, D) chunked dt and x = dt * u; Bc: (B, T, k, G, N); A: (D, N); h0: (B, D, N) the state
    before the segment. Returns h and a = exp(dt * A) as (B, T, k, D, N) work buffers and Hin (B, k, D, N),
    the state entering each chunk.

    Two sweeps over the T positions of a chunk, each one vectorised across all k chunks: the first keeps
    only a running state per chunk (started from zero) to get each chunk's own contribution at its end;
    the states entering the chunks are then carried chunk to chunk with the chunk decay exp(sum(dt) * A);
    the second sweep runs the recurrence from those true states and stores every position.
    """
    batch, T, k, dim = dtc.shape
    groups, n = Bc.shape[3], Bc.shape[4]
    hpg = dim // groups
    a = ws.get("a", batch, T, k, dim, n)
    torch.mul(dtc[..., None], A, out=a).exp_()  # exponent dt * A <= 0
    h = ws.get("h", batch, T, k, dim, n)  # first b = x * B, then (in place) the states
    torch.mul(xc.view(batch, T, k, groups, hpg, 1), Bc[:, :, :, :, None, :], out=h.view(batch, T, k, groups, hpg, n))
    av, hv = a.unbind(1), h.unbind(1)  # T slices (B, k, D, N)
    local = hv[0].clone()  # each chunk's state from a zero start
    for t in range(1, T):
        local = torch.addcmul(hv[t], av[t], local)
    decay = torch.exp(dtc.sum(1)[..., None] * A)  # (B, k, D, N) decay over each chunk, exponent <= 0
    ends = _affine_scan(decay, local, h0)  # (B, k, D, N) true state at each chunk end
    Hin = torch.cat([h0[:, None], ends[:, : k - 1]], dim=1)
    hv[0].addcmul_(av[0], Hin)
    for t in range(1, T):
        hv[t].addcmul_(av[t], hv[t - 1])
    return h, a, Hin


class _ChunkedScan(torch.autograd.Function):
    """y = <C, h> of the selective recurrence (no D, z, bias or softplus: those stay in plain autograd).

    Inputs dt, u: (B, L, D) fp32; A: (D, N); Bs, Cs: (B, L, G, N); L a multiple of T; S (a multiple of T)
    the segment length. Outputs y: (B, L, D) and the last state (B, D, N). The gradient of the last state
    is used (the reference CUDA function ignores it). Saves only the inputs and the state at each segment
    start; the backward recomputes one segment at a time.
    """

    @staticmethod
    def forward(ctx, dt: Tensor, u: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, T: int, S: int):
        batch, length, dim = dt.shape
        groups, n = Bs.shape[2], Bs.shape[3]
        hpg = dim // groups
        x = dt * u
        y = dt.new_empty(batch, length, dim)
        h0 = dt.new_zeros(batch, dim, n)
        starts = range(0, length, S)
        Hseg = dt.new_empty(batch, len(starts), dim, n)
        ws = _Work(dt, batch * min(S, length) * dim * n)
        for i, s0 in enumerate(starts):
            s1 = min(s0 + S, length)
            Hseg[:, i] = h0
            dtc, xc = _chunked(dt, s0, s1, T), _chunked(x, s0, s1, T)  # (B, T, k, D)
            Bc, Cc = _chunked(Bs, s0, s1, T), _chunked(Cs, s0, s1, T)  # (B, T, k, G, N)
            h, *_ = _seg_states(ws, dtc, xc, Bc, A, h0)
            k = dtc.shape[2]
            yc = torch.einsum("btkghn,btkgn->btkgh", h.view(batch, T, k, groups, hpg, n), Cc)
            _unchunk_into(y, s0, s1, yc)
            h0 = h[:, T - 1, k - 1].clone()
        ctx.save_for_backward(dt, u, A, Bs, Cs, Hseg)
        ctx.T, ctx.S = T, S
        return y, h0

    @staticmethod
    def backward(ctx, gy: Tensor, glast: Tensor | None):
        dt, u, A, Bs, Cs, Hseg = ctx.saved_tensors
        T, S = ctx.T, ctx.S
        batch, length, dim = dt.shape
        groups, n = Bs.shape[2], Bs.shape[3]
        hpg = dim // groups
        x = dt * u
        g_dt, g_u = torch.empty_like(dt), torch.empty_like(u)
        g_A = torch.zeros_like(A)
        g_B, g_C = torch.empty_like(Bs), torch.empty_like(Cs)
        ws = _Work(dt, batch * min(S, length) * dim * n)
        # adjoint flowing into a segment's last position from the right (from the last state at the end)
        G_next = glast.float() if glast is not None else dt.new_zeros(batch, dim, n)
        starts = list(range(0, length, S))
        for i in reversed(range(len(starts))):
            s0 = starts[i]
            s1 = min(s0 + S, length)
            dtc, xc, uc = _chunked(dt, s0, s1, T), _chunked(x, s0, s1, T), _chunked(u, s0, s1, T)
            Bc, Cc = _chunked(Bs, s0, s1, T), _chunked(Cs, s0, s1, T)
            gyc = _chunked(gy, s0, s1, T)  # (B, T, k, D)
            k = dtc.shape[2]
            h, a, Hin = _seg_states(ws, dtc, xc, Bc, A, Hseg[:, i])
            # adjoint g_t = dL/dh_t = gy_t C_t + a_{t+1} g_{t+1}: the same two sweeps in reverse time
            g = ws.get("g", batch, T, k, dim, n)
            g6 = g.view(batch, T, k, groups, hpg, n)
            torch.mul(gyc.view(batch, T, k, groups, hpg, 1), Cc[:, :, :, :, None, :], out=g6)
            av, gv = a.unbind(1), g.unbind(1)
            local = gv[T - 1].clone()  # adjoint at each chunk start from a zero end
            for t in range(T - 2, -1, -1):
                local = torch.addcmul(gv[t], av[t + 1], local)
            # adjoint flowing into each chunk's last position from the right, Gin_{j-1} = a_{j,0} * g_{j,0}
            # = a_{j,0} * local_j + decay_j * Gin_j with decay_j = exp(sum(dt) * A) over chunk j: a scan over
            # the chunks in reverse order, whose last element is what flows into the previous segment
            decay = torch.exp(dtc.sum(1)[..., None] * A)  # (B, k, D, N), exponent <= 0
            rev = _affine_scan(decay.flip(1), (av[0] * local).flip(1), G_next)
            Gin = torch.cat([rev[:, : k - 1].flip(1), G_next[:, None]], dim=1)  # (B, k, D, N)
            G_next = rev[:, k - 1]
            gv[T - 1].add_(Gin)
            for t in range(T - 2, -1, -1):
                gv[t].addcmul_(av[t + 1], gv[t + 1])
            h6 = h.view(batch, T, k, groups, hpg, n)
            gC = torch.matmul(gyc.view(batch, T, k, groups, 1, hpg), h6)  # (B, T, k, G, 1, N)
            gB = torch.matmul(xc.view(batch, T, k, groups, 1, hpg), g6)  # (B, T, k, G, 1, N)
            gx = torch.einsum("btkghn,btkgn->btkgh", g6, Bc).reshape(batch, T, k, dim)  # d/dx, x = dt * u
            # d/d(dt * A) at t = g_t * a_t * h_{t-1}, h_{t-1} the previous slice or Hin at a chunk start
            g.mul_(a)
            g[:, 1:].mul_(h[:, : T - 1])
            g[:, 0].mul_(Hin)
            tmp = ws.get("p", batch, T, k, dim, n)
            g_dtA = torch.mul(g, A, out=tmp).sum(-1)  # (B, T, k, D)
            g_A += torch.mul(g, dtc[..., None], out=tmp).sum((0, 1, 2))
            _unchunk_into(g_dt, s0, s1, torch.addcmul(g_dtA, gx, uc))
            _unchunk_into(g_u, s0, s1, gx * dtc)
            _unchunk_into(g_B, s0, s1, gB)
            _unchunk_into(g_C, s0, s1, gC)
        return g_dt, g_u, g_A, g_B, g_C, None, None


def _cuda_kernel() -> Callable | None:
    """``mamba_ssm``'s ``selective_scan_fn`` when the package imports, else None."""
    try:
        module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception:  # noqa: BLE001 - missing package, missing CUDA extension or a broken build: fall back
        return None
    return getattr(module, "selective_scan_fn", None)


def _is_cuda(t: Tensor) -> bool:
    return t.is_cuda


def _use_kernel(*tensors: Tensor | None) -> Callable | None:
    """The CUDA kernel when every given tensor is on CUDA and ``mamba_ssm`` is installed, else None."""
    if not all(_is_cuda(t) for t in tensors if t is not None):
        return None
    return _cuda_kernel()


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, chunk_size: int | None = None,
                   segment_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with ``mamba_ssm.selective_scan_fn``'s arguments and results (see the module docstring).

    On CUDA with ``mamba_ssm`` installed this calls its kernel (``chunk_size``/``segment_size`` then do not
    apply); otherwise the chunked pure-PyTorch scan. ``return_last_state`` gives ``(out, last_state)`` with
    last_state (batch, dim, d_state) in fp32.
    """
    kernel = _use_kernel(u, delta, A, B, C, D, z, delta_bias)
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    _check(u, delta, A, B, C, D, z, delta_bias)
    T = int(chunk_size or CHUNK_SIZE)
    S = int(segment_size or SEGMENT_SIZE)
    if T < 1 or S < 1:
        raise ValueError(f"chunk_size and segment_size must be >= 1; got {T} and {S}")
    dtype = u.dtype
    batch, dim, length = u.shape
    T = max(1, min(T, length))  # a short sequence is one chunk
    S = max(T, S // T * T)  # a segment is whole chunks
    uf = u.float()
    dt = _prepare_delta(delta, delta_bias, delta_softplus)  # (B, D, L)
    Bg, Cg = _grouped(B, batch, length), _grouped(C, batch, length)  # (B, G, N, L)
    pad = (-length) % T
    # padding with dt = 0 is an identity step (decay 1, no input), so the last state is unchanged
    dt_l = F.pad(dt, (0, pad)).transpose(1, 2).contiguous()  # (B, L', D)
    u_l = F.pad(uf, (0, pad)).transpose(1, 2).contiguous()
    B_l = F.pad(Bg, (0, pad)).permute(0, 3, 1, 2).contiguous()  # (B, L', G, N)
    C_l = F.pad(Cg, (0, pad)).permute(0, 3, 1, 2).contiguous()
    y, last = _ChunkedScan.apply(dt_l, u_l, A.float().contiguous(), B_l, C_l, T, S)
    y = y[:, :length].transpose(1, 2)  # (B, D, L)
    out = _finish(y, uf, D, z, dtype)
    return (out, last) if return_last_state else out


# ------------------------------------------------------------------------------------------- blocks
@dataclass
class MambaConfig:
    """Hyper-parameters of one Mamba block; defaults are the reference block's."""

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | Literal["auto"] = "auto"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False


class Mamba(nn.Module):
    """The reference Mamba block: x (B, L, d_model) -> (B, L, d_model), causal in L.

    in_proj to 2 * d_inner (x and gate z), causal depthwise conv1d + silu on x, x_proj to (dt, B, C),
    dt_proj, selective scan with D skip and silu(z) gate, out_proj. Initialisation as the reference:
    dt_proj weight uniform in +-dt_rank**-0.5, its bias the inverse softplus of dt ~ log-uniform in
    [dt_min, dt_max] (floored), A = -(1..d_state) per channel stored as A_log, D = 1.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | Literal["auto"] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False):
        super().__init__()
        self.config = MambaConfig(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor,
                                  conv_bias, bias)
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_ssm_parameters()

    @classmethod
    def from_config(cls, config: MambaConfig) -> Mamba:
        return cls(**asdict(config))

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The reference initialisation of dt_proj, A_log and D (call again after a generic re-init)."""
        cfg = self.config
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_lo, log_hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = torch.exp(torch.rand(self.d_inner) * (log_hi - log_lo) + log_lo).clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, L, d_model)
        length = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)  # (B, 2 * d_inner, L)
        xs, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
        xs = F.silu(self.conv1d(xs)[..., :length])  # causal: drop the right padding
        x_dbl = self.x_proj(xs.transpose(1, 2))  # (B, L, dt_rank + 2 * d_state)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L); bias added in the scan
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        y = selective_scan(xs, dt, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D.float(), z=z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True)  # (B, d_inner, L)
        return self.out_proj(y.transpose(1, 2))  # (B, L, d_model)


@dataclass
class BiMambaConfig(MambaConfig):
    """A :class:`MambaConfig` plus how the two directions are joined."""

    combine: Literal["mean", "sum"] = "mean"
    shared: bool = False


class BiMamba(nn.Module):
    """Bidirectional Mamba: one block over the sequence, one over its reversal (flipped back), averaged or summed.

    ``shared=False`` (default) gives the backward direction its own block (own projections, conv, A, D),
    as two independent causal readers; ``shared=True`` runs the same block both ways (half the parameters).
    Not causal: every output sees the whole sequence.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | Literal["auto"] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 combine: Literal["mean", "sum"] = "mean", shared: bool = False):
        super().__init__()
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum'; got {combine!r}")
        self.config = BiMambaConfig(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor,
                                    conv_bias, bias, combine, shared)
        block = dict(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                     dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, conv_bias=conv_bias, bias=bias)
        self.forward_block = Mamba(**block)
        self.backward_block = self.forward_block if shared else Mamba(**block)
        self.combine = combine

    @classmethod
    def from_config(cls, config: BiMambaConfig) -> BiMamba:
        return cls(**asdict(config))

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, L, d_model)
        y = self.forward_block(x) + self.backward_block(x.flip(1)).flip(1)  # (B, L, d_model)
        return y * 0.5 if self.combine == "mean" else y
