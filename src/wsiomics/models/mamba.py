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
position. Work is O(L*D*N), every exponent is <= 0 and only products of decays in [0, 1] are formed. One
custom autograd function does the whole scan (bias, softplus, recurrence, D skip, gate) and keeps only
its inputs and the state at each segment start; its backward recomputes one segment at a time and runs
the same scheme in reverse time for the adjoint, so at most one segment's (B, segment, D, N) tensors
exist at once and no (B, D, L) intermediate is kept between forward and backward.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Chosen with bench/gene_encoders.py on 2 CPU cores (d_inner 256, d_state 16): chunk 16 beat 8 and 32 on a
# loaded machine and was within noise of 32 on a quiet one; segments of 256 and 512 positions ran equally
# fast (16,384 tokens, 2 threads: 1.18 / 1.16 s), 256 with 4 MiB per work buffer instead of 8 (peak 306
# against 361 MB).
CHUNK_SIZE = 16
SEGMENT_SIZE = 256
# On a GPU each op is a kernel launch (~5-10 us), and the CPU sizes make a 16k-token scan thousands of small
# launches: longer chunks and segments cut their number (the sweeps are 2 * chunk launches per segment, the
# chunk scan log2(segment / chunk)). A segment is as long as keeps one (batch, segment, dim, d_state) fp32 work
# buffer within CUDA_SEGMENT_BYTES (the backward holds three). Not yet measured on a GPU (bench/gpu_check.py).
CUDA_CHUNK_SIZE = 32
CUDA_SEGMENT_SIZE = 4096
CUDA_SEGMENT_BYTES = 256 * 2**20

__all__ = [
    "BiMamba",
    "BiMambaConfig",
    "Mamba",
    "MambaConfig",
    "scan_backend",
    "scan_sizes",
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
                       return_last_state: bool = False, *, initial_state: Tensor | None = None
                       ) -> Tensor | tuple[Tensor, Tensor]:
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
    h = initial_state.float() if initial_state is not None else uf.new_zeros(batch, dim, Af.shape[1])  # (B, D, N)
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
    """Flat fp32 buffers reused by every segment of one call: a fresh multi-MB result per op made a multiply
    about 3x slower on the 2-core development machine (page faults on new memory)."""

    def __init__(self, like: Tensor, numel: int):
        self._like, self._numel, self._bufs = like, numel, {}

    def get(self, name: str, *shape: int) -> Tensor:
        if name not in self._bufs:
            self._bufs[name] = self._like.new_empty(self._numel)
        return self._bufs[name][: math.prod(shape)].view(shape)


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


class _Segment:
    """Chunked (B, T, k, ...) views of one segment's inputs, the last chunk padded.

    Padding uses dt = 0 (decay 1, no input): the state passes through unchanged, so the last state is right,
    and padded positions add nothing to any parameter gradient.
    """

    def __init__(self, s0: int, s1: int, T: int, u: Tensor, delta: Tensor, bias: Tensor | None, softplus: bool,
                 Bg: Tensor, Cg: Tensor, z: Tensor | None):
        self.s0, self.s1, self.n = s0, s1, s1 - s0
        self.pad = (-self.n) % T
        self.T, self.k = T, (self.n + self.pad) // T
        pre = delta[..., s0:s1]
        if bias is not None:
            pre = pre + bias[:, None]
        self.pre = pre  # (B, D, n) before the softplus
        self.dt = self.chunk(F.softplus(pre) if softplus else pre)  # (B, T, k, D)
        self.u = self.chunk(u[..., s0:s1])
        self.x = self.dt * self.u
        self.B, self.C = self.chunk(Bg[..., s0:s1]), self.chunk(Cg[..., s0:s1])  # (B, T, k, G, N)
        self.z = self.chunk(z[..., s0:s1]) if z is not None else None

    def chunk(self, t: Tensor) -> Tensor:
        """(B, ..., n) -> contiguous (B, T, k, ...): position j*T + t of the segment sits at [:, t, j]."""
        if self.pad:
            t = F.pad(t, (0, self.pad))
        lead = t.shape[1:-1]
        t = t.reshape(t.shape[0], *lead, self.k, self.T)
        order = (0, t.dim() - 1, t.dim() - 2, *range(1, t.dim() - 2))
        return t.permute(order).contiguous()

    def write(self, dest: Tensor, t: Tensor) -> None:
        """Chunked ``t`` (B, T, k, ...) into positions s0:s1 of ``dest`` (B, ..., L), padding dropped."""
        order = (0, *range(3, t.dim()), 2, 1)
        full = t.permute(order).reshape(*dest.shape[:-1], self.k * self.T)
        dest[..., self.s0 : self.s1] = full[..., : self.n]


def _scan_forward(u, delta, A, Bg, Cg, D, z, delta_bias, softplus: bool, T: int, S: int, h_init=None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`_ChunkedScan`'s forward computation: out (B, D, L), the last state (B, D, N) and the state
    at each segment start (B, n_segments, D, N), all its backward needs besides the inputs. In fp32 whatever
    the caller's autocast (which would run the output einsum, a bmm, in bf16)."""
    with torch.autocast(u.device.type, enabled=False):
        return _scan_forward_fp32(u, delta, A, Bg, Cg, D, z, delta_bias, softplus, T, S, h_init)


def _scan_forward_fp32(u, delta, A, Bg, Cg, D, z, delta_bias, softplus: bool, T: int, S: int, h_init=None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    batch, dim, length = u.shape
    groups, n = Bg.shape[1], Bg.shape[2]
    hpg = dim // groups
    out = u.new_empty(batch, dim, length)
    h0 = h_init.float() if h_init is not None else u.new_zeros(batch, dim, n)
    starts = range(0, length, S)
    Hseg = u.new_empty(batch, len(starts), dim, n)
    ws = _Work(u, batch * min(S, length + T) * dim * n)
    for i, s0 in enumerate(starts):
        Hseg[:, i] = h0
        seg = _Segment(s0, min(s0 + S, length), T, u, delta, delta_bias, softplus, Bg, Cg, z)
        h, *_ = _seg_states(ws, seg.dt, seg.x, seg.B, A, h0)
        k = seg.k
        y = torch.einsum("btkghn,btkgn->btkgh", h.view(batch, T, k, groups, hpg, n), seg.C).reshape(
            batch, T, k, dim)
        if D is not None:
            y.addcmul_(seg.u, D)
        if z is not None:
            y.mul_(F.silu(seg.z))
        seg.write(out, y)
        h0 = h[:, T - 1, k - 1].clone()
    return out, h0, Hseg


class _ChunkedScan(torch.autograd.Function):
    """The whole selective scan: softplus(delta + bias), the recurrence, <C, h> + D u, the silu(z) gate.

    Inputs u, delta, z: (B, D, L) fp32; A: (D, N); Bg, Cg: (B, G, N, L); D, delta_bias: (D,) or None;
    T the chunk and S the segment length (a multiple of T); h_init (B, D, N) the state before position 0 (None:
    zeros). Outputs (B, D, L) and the last state (B, D, N), whose gradient is used (the reference CUDA
    function ignores it), as is h_init's. Only the inputs and the state at each
    segment start are saved; the backward recomputes one segment at a time, so nothing of size L*D*N, and no
    (B, D, L) intermediate (dt, x, the gate) is kept between forward and backward.
    """

    @staticmethod
    def forward(ctx, u, delta, A, Bg, Cg, D, z, delta_bias, softplus: bool, T: int, S: int, h_init=None):
        out, last, Hseg = _scan_forward(u, delta, A, Bg, Cg, D, z, delta_bias, softplus, T, S, h_init)
        ctx.save_for_backward(u, delta, A, Bg, Cg, D, z, delta_bias, Hseg)
        ctx.softplus, ctx.T, ctx.S = softplus, T, S
        return out, last

    @staticmethod
    def backward(ctx, gout: Tensor, glast: Tensor | None):
        with torch.autocast(gout.device.type, enabled=False):  # fp32 matmuls even in a backward under autocast
            return _ChunkedScan._backward(ctx, gout, glast)

    @staticmethod
    def _backward(ctx, gout: Tensor, glast: Tensor | None):
        u, delta, A, Bg, Cg, D, z, delta_bias, Hseg = ctx.saved_tensors
        T, S = ctx.T, ctx.S
        batch, dim, length = u.shape
        groups, n = Bg.shape[1], Bg.shape[2]
        hpg = dim // groups
        g_u, g_delta = torch.empty_like(u), torch.empty_like(delta)
        g_A = torch.zeros_like(A)
        g_B, g_C = Bg.new_empty(Bg.shape), Cg.new_empty(Cg.shape)
        g_D = torch.zeros_like(D) if D is not None else None
        g_z = torch.empty_like(z) if z is not None else None
        ws = _Work(u, batch * min(S, length + T) * dim * n)
        # adjoint flowing into a segment's last position from the right (from the last state at the end)
        G_next = glast.float() if glast is not None else u.new_zeros(batch, dim, n)
        starts = list(range(0, length, S))
        for i in reversed(range(len(starts))):
            s0 = starts[i]
            seg = _Segment(s0, min(s0 + S, length), T, u, delta, delta_bias, ctx.softplus, Bg, Cg, z)
            k = seg.k
            dtc, xc, uc, Bc, Cc = seg.dt, seg.x, seg.u, seg.B, seg.C
            h, a, Hin = _seg_states(ws, dtc, xc, Bc, A, Hseg[:, i])
            h6 = h.view(batch, T, k, groups, hpg, n)
            gyc = seg.chunk(gout[..., seg.s0 : seg.s1])  # (B, T, k, D)
            if z is not None:  # out = (y + D u) * silu(z)
                y = torch.einsum("btkghn,btkgn->btkgh", h6, Cc).reshape(batch, T, k, dim)
                if D is not None:
                    y.addcmul_(uc, D)
                sig = torch.sigmoid(seg.z)
                seg.write(g_z, gyc * y * sig * (1 + seg.z * (1 - sig)))
                gyc = gyc * seg.z * sig
            g_udirect = None
            if D is not None:
                g_D += (gyc * uc).sum((0, 1, 2))
                g_udirect = gyc * D
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
            seg.write(g_C, torch.matmul(gyc.view(batch, T, k, groups, 1, hpg), h6).squeeze(-2))  # (B,T,k,G,N)
            seg.write(g_B, torch.matmul(xc.view(batch, T, k, groups, 1, hpg), g6).squeeze(-2))
            gx = torch.einsum("btkghn,btkgn->btkgh", g6, Bc).reshape(batch, T, k, dim)  # d/dx, x = dt * u
            # d/d(dt * A) at t = g_t * a_t * h_{t-1}, h_{t-1} the previous slice or Hin at a chunk start
            g.mul_(a)
            g[:, 1:].mul_(h[:, : T - 1])
            g[:, 0].mul_(Hin)
            tmp = h  # h is not read again in this segment
            g_dt = torch.mul(g, A, out=tmp).sum(-1).addcmul_(gx, uc)  # (B, T, k, D)
            g_A += torch.mul(g, dtc[..., None], out=tmp).sum((0, 1, 2))
            gu = gx * dtc
            if g_udirect is not None:
                gu += g_udirect
            seg.write(g_u, gu)
            seg.write(g_delta, g_dt)
            if ctx.softplus:
                g_delta[..., seg.s0 : seg.s1].mul_(torch.sigmoid(seg.pre))
        g_bias = g_delta.sum((0, 2)) if delta_bias is not None else None
        g_init = G_next if ctx.needs_input_grad[11] else None  # after segment 0: dL/d(state before position 0)
        return g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias, None, None, None, g_init


class _ScanReplay(_ChunkedScan):
    """:class:`_ChunkedScan` whose forward was already computed (by :func:`_scan_forward`, without autograd):
    it returns the given ``out`` and ``last`` and keeps the given segment states, so that rerunning a
    block under autograd does not rerun the scan; the backward is the scan's."""

    @staticmethod
    def forward(ctx, u, delta, A, Bg, Cg, D, z, delta_bias, softplus: bool, T: int, S: int, h_init, out, last,
                Hseg):
        ctx.save_for_backward(u, delta, A, Bg, Cg, D, z, delta_bias, Hseg)
        ctx.softplus, ctx.T, ctx.S = softplus, T, S
        return out.clone(), last.clone()

    @staticmethod
    def backward(ctx, gout: Tensor, glast: Tensor | None):
        return (*_ChunkedScan.backward(ctx, gout, glast), None, None, None)


def _load_kernel() -> tuple[Callable | None, str]:
    """``mamba_ssm``'s ``selective_scan_fn`` and a description, or None and why not.

    The function is taken only when the compiled extension ``selective_scan_cuda`` imports: mamba_ssm's main
    branch imports without it (setting it to None) and its function then raises on every call.
    """
    try:
        module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception as e:  # noqa: BLE001 - missing package or a broken build: fall back
        return None, f"mamba_ssm does not import ({type(e).__name__}: {e})"
    fn = getattr(module, "selective_scan_fn", None)
    if fn is None:
        return None, "mamba_ssm has no selective_scan_fn"
    if getattr(module, "selective_scan_cuda", None) is None:
        try:
            importlib.import_module("selective_scan_cuda")
        except Exception as e:  # noqa: BLE001 - not built, or built against another torch/CUDA
            return None, (f"mamba_ssm imports but its compiled extension selective_scan_cuda does not "
                          f"({type(e).__name__}: {e}); reinstall it built for this torch "
                          "(pip install mamba-ssm --no-build-isolation)")
    version = getattr(sys.modules.get("mamba_ssm"), "__version__", "?")
    return fn, f"mamba_ssm CUDA kernel (mamba_ssm {version})"


@functools.cache
def _cuda_kernel() -> Callable | None:
    """The CUDA kernel or None, decided once per process (and logged)."""
    fn, why = _load_kernel()
    _CHOICE["cuda"] = why if fn is not None else f"pure-PyTorch chunked scan: {why}"
    _announce("cuda")
    return fn


_CHOICE = {"cpu": "pure-PyTorch chunked scan"}
_announced: set[str] = set()


def _announce(device_type: str) -> None:
    if device_type not in _announced:
        _announced.add(device_type)
        log.info("selective scan on %s: %s", device_type, _CHOICE.get(device_type, _CHOICE["cpu"]))


def scan_backend(device: torch.device | str) -> str:
    """Which selective scan runs for tensors on ``device``, and on CUDA why (decides the kernel if not yet)."""
    if torch.device(device).type == "cuda":
        _cuda_kernel()
        return _CHOICE["cuda"]
    return _CHOICE["cpu"]


def _is_cuda(t: Tensor) -> bool:
    return t.is_cuda


def _use_kernel(*tensors: Tensor | None) -> Callable | None:
    """The CUDA kernel when every given tensor is on CUDA and ``mamba_ssm`` is installed with its compiled
    extension, else None."""
    if not all(_is_cuda(t) for t in tensors if t is not None):
        _announce("cpu")
        return None
    return _cuda_kernel()


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, chunk_size: int | None = None,
                   segment_size: int | None = None, initial_state: Tensor | None = None
                   ) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with ``mamba_ssm.selective_scan_fn``'s arguments and results (see the module docstring).

    On CUDA with ``mamba_ssm`` and its compiled extension this calls its kernel (``chunk_size``/``segment_size``
    then do not apply); otherwise the chunked pure-PyTorch scan. ``return_last_state`` gives ``(out, last_state)`` with
    last_state (batch, dim, d_state) in fp32. ``initial_state`` (batch, dim, d_state), the state before the
    first position (differentiable; default zeros), is an extension the CUDA kernel lacks: with it the
    pure-PyTorch scan always runs.
    """
    kernel = _use_kernel(u, delta, A, B, C, D, z, delta_bias) if initial_state is None else None
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    ops, T, S = _operands(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size, segment_size)
    out, last = _ChunkedScan.apply(*ops[:8], delta_softplus, T, S, ops[8])
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


def scan_sizes(device: torch.device, batch: int, dim: int, d_state: int) -> tuple[int, int]:
    """Default (chunk, segment) lengths of the pure-PyTorch scan for tensors on ``device``: the CPU-tuned
    CHUNK_SIZE / SEGMENT_SIZE, or on CUDA longer ones, the segment bounded by CUDA_SEGMENT_BYTES."""
    if device.type != "cuda":
        return CHUNK_SIZE, SEGMENT_SIZE
    T = CUDA_CHUNK_SIZE
    fit = CUDA_SEGMENT_BYTES // max(1, batch * dim * d_state * 4)
    return T, max(T, min(CUDA_SEGMENT_SIZE, fit) // T * T)


def _operands(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
              delta_bias: Tensor | None, initial_state: Tensor | None, chunk_size: int | None,
              segment_size: int | None) -> tuple[tuple[Tensor | None, ...], int, int]:
    """The checked fp32 operands of :class:`_ChunkedScan` (u, delta, A, B and C as (B, G, N, L), D, z,
    delta_bias, initial_state) and its chunk and segment lengths."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    if initial_state is not None and initial_state.shape != (u.shape[0], u.shape[1], A.shape[1]):
        raise ValueError(f"initial_state must be (batch, dim, d_state) = {(u.shape[0], u.shape[1], A.shape[1])}; "
                         f"got {tuple(initial_state.shape)}")
    batch, dim, length = u.shape
    T_default, S_default = scan_sizes(u.device, batch, dim, A.shape[1])
    T = int(chunk_size or T_default)
    S = int(segment_size or S_default)
    if T < 1 or S < 1:
        raise ValueError(f"chunk_size and segment_size must be >= 1; got {T} and {S}")
    T = max(1, min(T, length))  # a short sequence is one chunk
    S = max(T, S // T * T)  # a segment is whole chunks
    f = lambda t: t.float() if t is not None else None  # noqa: E731
    Bg, Cg = _grouped(B, batch, length), _grouped(C, batch, length)  # (B, G, N, L)
    return (f(u), f(delta), f(A), Bg, Cg, f(D), f(z), f(delta_bias), f(initial_state)), T, S


class _Tape:
    """Stand-ins for :func:`selective_scan` that let a block be rerun under autograd without rerunning its
    scans: ``record`` computes each scan (no autograd) and keeps its output, last state and segment
    states; ``replay`` hands them back, in the same order, through :class:`_ScanReplay`."""

    def __init__(self) -> None:
        self.entries: list[tuple[Tensor, Tensor, Tensor]] = []
        self.cursor = 0

    def record(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               return_last_state=False, initial_state=None):
        ops, T, S = _operands(u, delta, A, B, C, D, z, delta_bias, initial_state, None, None)
        out, last, Hseg = _scan_forward(*ops[:8], delta_softplus, T, S, ops[8])
        self.entries.append((out, last, Hseg))
        return (out.to(u.dtype), last) if return_last_state else out.to(u.dtype)

    def replay(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               return_last_state=False, initial_state=None):
        ops, T, S = _operands(u, delta, A, B, C, D, z, delta_bias, initial_state, None, None)
        out, last = _ScanReplay.apply(*ops[:8], delta_softplus, T, S, ops[8], *self.entries[self.cursor])
        self.cursor += 1
        return (out.to(u.dtype), last) if return_last_state else out.to(u.dtype)


# ------------------------------------------------------------------------------------------- blocks
class _SegmentRecompute(torch.autograd.Function):
    """A Mamba block over a long sequence, run in consecutive stretches of ``segment`` positions.

    Everything in the block is per position except the causal conv (``d_conv - 1`` positions of look-back)
    and the scan (one (B, d_inner, d_state) state carried across), so a stretch needs only its own input,
    that look-back and the state entering it. The forward keeps the input, those states and each
    stretch's scan output (:class:`_Tape`); the backward reruns one stretch at a time, last first, under
    autograd, with the scan replayed rather than recomputed, and hands the gradient of each stretch's
    entering state to the stretch before. The in_proj output, conv, silu and dt of the whole sequence are
    never held at once; the cost is the block's projections and conv once more.
    """

    @staticmethod
    def forward(ctx, x: Tensor, block: Mamba, segment: int, *params: Tensor) -> Tensor:
        # x: (B, L, d_model)
        length = x.shape[1]
        outs, states, state, tapes = [], [], None, []
        for s0 in range(0, length, segment):
            lo = max(0, s0 - (block.d_conv - 1))
            if state is not None:
                states.append(state)
            tapes.append(_Tape())
            out, state = block.mix(x[:, lo : s0 + segment], s0 - lo, state, scan=tapes[-1].record)
            outs.append(out)
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.block, ctx.segment, ctx.tapes = block, segment, tapes
        ctx.save_for_backward(x, *states)
        return torch.cat(outs, dim=1)  # (B, L, d_model)

    @staticmethod
    def backward(ctx, gout: Tensor):
        x, *states = ctx.saved_tensors
        block, segment = ctx.block, ctx.segment
        params = tuple(block.parameters())  # the order forward was given them in
        want = ctx.needs_input_grad[3:]
        g_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        g_params: list[Tensor | None] = [None] * len(params)
        g_state = None  # gradient of the state leaving the current stretch
        device, enabled, dtype = ctx.autocast
        starts = list(range(0, x.shape[1], segment))
        for i in reversed(range(len(starts))):
            s0 = starts[i]
            lo = max(0, s0 - (block.d_conv - 1))
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                xin = x[:, lo : s0 + segment].detach().requires_grad_(g_x is not None)
                state = states[i - 1].detach().requires_grad_() if i else None
                out, last = block.mix(xin, s0 - lo, state, scan=ctx.tapes[i].replay)
            ctx.tapes[i] = None  # its scan outputs are no longer needed
            outputs, grads = [out], [gout[:, s0 : s0 + segment]]
            if g_state is not None:
                outputs.append(last)
                grads.append(g_state)
            leaves = [t for t in (xin, state) if t is not None and t.requires_grad]
            wrt = leaves + [p for p, w in zip(params, want, strict=True) if w]
            got = list(torch.autograd.grad(outputs, wrt, grads, allow_unused=True))
            if g_x is not None:
                g_x[:, lo : s0 + segment] += got.pop(0)
            g_state = got.pop(0) if state is not None else None
            for j, w in enumerate(want):
                if w:
                    g = got.pop(0)
                    if g is not None:
                        g_params[j] = g if g_params[j] is None else g_params[j] + g
        return (g_x, None, None, *g_params)


@dataclass
class MambaConfig:
    """Hyper-parameters of one Mamba block; defaults are the reference block's.

    ``recompute_length``: when training on a sequence longer than this, the block runs in stretches of this
    many positions and recomputes each in the backward (:class:`_SegmentRecompute`) instead of keeping its
    whole-sequence activations; None never does. Not used where ``mamba_ssm``'s CUDA kernel runs.
    """

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
    recompute_length: int | None = 2048


class Mamba(nn.Module):
    """The reference Mamba block: x (B, L, d_model) -> (B, L, d_model), causal in L.

    in_proj to 2 * d_inner (x and gate z), causal depthwise conv1d + silu on x, x_proj to (dt, B, C),
    dt_proj, selective scan with D skip and silu(z) gate, out_proj. Initialisation as the reference:
    dt_proj weight uniform in +-dt_rank**-0.5, its bias the inverse softplus of dt ~ log-uniform in
    [dt_min, dt_max] (floored), A = -(1..d_state) per channel stored as A_log, D = 1.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | Literal["auto"] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 recompute_length: int | None = 2048):
        super().__init__()
        self.config = MambaConfig(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor,
                                  conv_bias, bias, recompute_length)
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max; got dt_min={dt_min}, dt_max={dt_max}")
        if recompute_length is not None and recompute_length < 1:
            raise ValueError(f"recompute_length must be >= 1 or None; got {recompute_length}")
        self.recompute_length = recompute_length
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

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention; the reference flags them ``_no_weight_decay``)."""
        return {"A_log", "D"}

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
        seg = self.recompute_length
        if (seg is not None and x.shape[1] > seg and torch.is_grad_enabled() and _use_kernel(x) is None):
            return _SegmentRecompute.apply(x, self, seg, *self.parameters())
        return self.mix(x)[0]

    def mix(self, x: Tensor, lookback: int = 0, state: Tensor | None = None, scan: Callable | None = None
            ) -> tuple[Tensor, Tensor]:
        """The block on one stretch of a sequence.

        x: (B, lookback + n, d_model), whose first ``lookback`` (< d_conv) positions only feed the causal
        conv; ``state``: the scan state (B, d_inner, d_state) before the stretch, None at the sequence start;
        ``scan``: what runs the selective scan (default :func:`selective_scan`).
        Returns out (B, n, d_model) and the scan state after the stretch.
        """
        scan = scan or selective_scan
        xz = self.in_proj(x).transpose(1, 2)  # (B, 2 * d_inner, lookback + n)
        xs, z = xz.chunk(2, dim=1)  # (B, d_inner, lookback + n) each
        xs = F.pad(xs, (self.d_conv - 1 - lookback, 0))  # causal: zeros before the sequence start
        xs = F.silu(F.conv1d(xs, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner))  # (B, d_inner, n)
        z = z[..., lookback:]
        x_dbl = self.x_proj(xs.transpose(1, 2))  # (B, n, dt_rank + 2 * d_state)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, n); bias added in the scan
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        y, last = scan(xs, dt, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D.float(), z=z,
                       delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=True,
                       initial_state=state)  # (B, d_inner, n)
        return self.out_proj(y.transpose(1, 2)), last  # (B, n, d_model), (B, d_inner, d_state)



@torch.no_grad()
def init_mamba_weights(module: nn.Module, n_layer: int, n_residuals_per_layer: int = 1) -> None:
    """The reference initialisation of a stack of Mamba blocks (mamba_ssm ``mixer_seq_simple._init_weights``),
    applied per module: ``stack.apply(partial(init_mamba_weights, n_layer=depth))``.

    Linear biases are zeroed unless flagged ``_no_reinit`` (dt_proj's, which sets the initial step sizes);
    each residual branch's output projection (``out_proj``, ``fc2``) is re-drawn as ``nn.Linear`` draws it
    and divided by sqrt(n_residuals_per_layer * n_layer) (GPT-2's scheme), so the residual stream's variance
    does not grow with depth. Re-drawing rather than scaling keeps it idempotent.
    """
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
        nn.init.zeros_(module.bias)
    for name, p in module.named_parameters():
        if name in ("out_proj.weight", "fc2.weight"):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            p /= math.sqrt(n_residuals_per_layer * n_layer)


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
                 recompute_length: int | None = 2048, combine: Literal["mean", "sum"] = "mean",
                 shared: bool = False):
        super().__init__()
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum'; got {combine!r}")
        self.config = BiMambaConfig(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor,
                                    conv_bias, bias, recompute_length, combine, shared)
        block = dict(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                     dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, conv_bias=conv_bias, bias=bias,
                     recompute_length=recompute_length)
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
