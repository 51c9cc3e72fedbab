"""The chunked selective scan against the sequential recurrence, the kernel dispatch, and the Mamba blocks."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from wsiomics.models import mamba as mm
from wsiomics.models.mamba import BiMamba, Mamba, MambaConfig, selective_scan, selective_scan_ref

torch.set_num_threads(2)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _inputs(seed: int, batch: int = 2, dim: int = 8, n: int = 4, length: int = 37, groups: int | None = None,
            D: bool = True, z: bool = True, delta_bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    bc = (batch, n, length) if groups is None else (batch, groups, n, length)
    if groups == 0:  # constant B, C per channel
        bc = (dim, n)
    t = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5,
        "A": -torch.rand(dim, n, generator=g) * 3,
        "B": torch.randn(*bc, generator=g),
        "C": torch.randn(*bc, generator=g),
        "D": torch.randn(dim, generator=g) if D else None,
        "z": torch.randn(batch, dim, length, generator=g) if z else None,
        "delta_bias": torch.randn(dim, generator=g) * 0.5 if delta_bias else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}


def _run(fn, inputs: dict, softplus: bool, **kw):
    """Output, last state, and the gradients of a loss that reads both (so the last state's gradient counts)."""
    y, last = fn(**inputs, delta_softplus=softplus, return_last_state=True, **kw)
    w = torch.linspace(-1, 1, y.numel()).view_as(y)
    loss = (y * w).sum() + (last * 0.5).sum()
    leaves = [inputs[k] for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad(loss, leaves)
    return y, last, dict(zip([k for k in NAMES if inputs[k] is not None], grads, strict=True))


CASES = [
    # groups, D, z, delta_bias, softplus, length, chunk, segment
    (None, True, True, True, True, 37, 4, 8),  # several segments, last one short, padded last chunk
    (None, False, False, False, False, 37, 4, 8),
    (None, True, False, True, False, 13, 5, 12),  # segment rounded down to whole chunks
    (None, False, True, False, True, 64, 16, 256),  # one segment, exact chunks
    (2, True, True, True, True, 37, 4, 8),  # grouped B/C
    (4, False, True, True, False, 29, 3, 9),
    (0, True, True, False, True, 21, 4, 8),  # constant (dim, d_state) B/C
    (None, True, True, True, True, 1, 16, 256),  # a single position
    (2, True, True, True, True, 100, 3, 60),  # 20 chunks per segment: several rounds of the chunk scan
    (2, True, True, True, True, 23, None, None),  # the defaults
]


@pytest.mark.parametrize(("groups", "D", "z", "bias", "softplus", "length", "chunk", "segment"), CASES)
def test_chunked_scan_matches_recurrence(groups, D, z, bias, softplus, length, chunk, segment):
    inputs = _inputs(length, length=length, groups=groups, D=D, z=z, delta_bias=bias)
    y0, last0, g0 = _run(selective_scan_ref, inputs, softplus)
    y1, last1, g1 = _run(selective_scan, inputs, softplus, chunk_size=chunk, segment_size=segment)
    assert y1.shape == y0.shape == inputs["u"].shape
    assert last1.shape == last0.shape == (inputs["u"].shape[0], inputs["u"].shape[1], inputs["A"].shape[1])
    assert _rel(y1, y0) <= 1e-4
    assert _rel(last1, last0) <= 1e-4
    assert g1.keys() == g0.keys()
    for name in g0:
        assert _rel(g1[name], g0[name]) <= 1e-4, name


@pytest.mark.parametrize(("groups", "chunk", "segment"), [(None, 4, 8), (2, 3, 60), (None, 16, 256)])
def test_initial_state_matches_recurrence(groups, chunk, segment):
    """A scan started from a given state: output, last state and every gradient (the state's too) as the
    recurrence started from it."""
    inputs = _inputs(11, length=37, groups=groups)
    h0 = (torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(5))).requires_grad_()
    leaves = [v for v in inputs.values() if v is not None] + [h0]
    outs = []
    for fn, kw in ((selective_scan_ref, {}), (selective_scan, dict(chunk_size=chunk, segment_size=segment))):
        y, last = fn(**inputs, delta_softplus=True, return_last_state=True, initial_state=h0, **kw)
        w = torch.linspace(-1, 1, y.numel()).view_as(y)
        outs.append((y, last, torch.autograd.grad((y * w).sum() + (last * 0.5).sum(), leaves)))
    (y0, last0, g0), (y1, last1, g1) = outs
    assert _rel(y1, y0) <= 1e-4 and _rel(last1, last0) <= 1e-4
    assert g0[-1].abs().sum() > 0  # the initial state's gradient
    for a, b in zip(g1, g0, strict=True):
        assert _rel(a, b) <= 1e-4


def test_scan_resumes_from_its_last_state():
    """Two halves, the second started from the first's last state, are the whole scan."""
    inputs = {k: (v.detach() if v is not None else None) for k, v in _inputs(4, length=50).items()}
    y, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    first = {k: (v[..., :20] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    second = {k: (v[..., 20:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    y1, h1 = selective_scan(**first, delta_softplus=True, return_last_state=True)
    y2, h2 = selective_scan(**second, delta_softplus=True, return_last_state=True, initial_state=h1)
    assert _rel(torch.cat([y1, y2], dim=-1), y) <= 1e-5 and _rel(h2, last) <= 1e-5


def test_long_sequence_forward_matches_recurrence():
    inputs = _inputs(7, batch=1, dim=16, n=8, length=512)
    with torch.no_grad():
        y0, last0 = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
        y1, last1 = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert _rel(y1, y0) <= 1e-4 and _rel(last1, last0) <= 1e-4


def test_strong_decay_stays_finite():
    """Large dt * |A| (states forgotten within a step): no overflow, NaN or mismatch anywhere."""
    inputs = _inputs(3, length=40, delta_bias=False)
    with torch.no_grad():
        inputs["delta"].mul_(0).add_(8.0)
        inputs["A"].mul_(10)
    y0, _, g0 = _run(selective_scan_ref, inputs, False)
    y1, _, g1 = _run(selective_scan, inputs, False, chunk_size=8, segment_size=16)
    assert torch.isfinite(y1).all() and all(torch.isfinite(g).all() for g in g1.values())
    assert _rel(y1, y0) <= 1e-4
    for name in g0:
        assert _rel(g1[name], g0[name]) <= 1e-4, name


def test_output_dtype_follows_u():
    inputs = {k: (v.detach() if v is not None else None) for k, v in _inputs(1, length=10).items()}
    inputs["u"] = inputs["u"].to(torch.bfloat16)
    assert selective_scan(**inputs).dtype == torch.bfloat16
    assert selective_scan_ref(**inputs).dtype == torch.bfloat16


def test_shape_errors_name_the_argument():
    inputs = {k: v for k, v in _inputs(1, length=10).items()}
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**{**inputs, "B": torch.zeros(2, 3, 4, 10)})  # 8 channels not divisible by 3 groups
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**inputs, "A": torch.zeros(5, 4)})
    with pytest.raises(ValueError, match="complex"):
        selective_scan(**{**inputs, "A": torch.zeros(8, 4, dtype=torch.complex64)})


def _fake_mamba_ssm(monkeypatch, fn, extension: bool) -> None:
    """A stand-in ``mamba_ssm`` whose interface module imports; ``extension``: whether the compiled
    ``selective_scan_cuda`` does too (mamba_ssm's main branch imports without it, then raises on a call)."""
    fake = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    fake.selective_scan_fn = fn
    fake.selective_scan_cuda = types.ModuleType("selective_scan_cuda") if extension else None
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", fake)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", fake.selective_scan_cuda)
    mm._cuda_kernel.cache_clear()
    monkeypatch.setattr(mm, "_announced", set())


@pytest.fixture
def fresh_kernel_choice():
    mm._cuda_kernel.cache_clear()
    yield
    mm._cuda_kernel.cache_clear()


def test_cuda_kernel_dispatch(monkeypatch, fresh_kernel_choice, caplog):
    calls = []

    def fake_fn(*args):
        calls.append(args)
        return "kernel"

    _fake_mamba_ssm(monkeypatch, fake_fn, extension=True)
    inputs = {k: (v.detach() if v is not None else None) for k, v in _inputs(2, length=9).items()}
    # CPU tensors: the pure-PyTorch scan even though the package imports
    assert isinstance(selective_scan(**inputs, delta_softplus=True), torch.Tensor) and not calls
    # "CUDA" tensors: the kernel, with the arguments in selective_scan_fn's order, and the choice logged once
    monkeypatch.setattr(mm, "_is_cuda", lambda t: True)
    with caplog.at_level("INFO", logger="wsiomics.models.mamba"):
        assert selective_scan(**inputs, delta_softplus=True, return_last_state=True) == "kernel"
        selective_scan(**inputs)
    expected = [inputs[k] for k in NAMES] + [True, True]
    assert len(calls) == 2 and all(a is b for a, b in zip(calls[0], expected, strict=True))
    assert sum("mamba_ssm CUDA kernel" in r.getMessage() for r in caplog.records) == 1
    # package missing: the pure-PyTorch scan
    mm._cuda_kernel.cache_clear()
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)
    assert isinstance(selective_scan(**inputs), torch.Tensor) and len(calls) == 2


def test_cuda_kernel_needs_the_compiled_extension(monkeypatch, fresh_kernel_choice, caplog):
    """mamba_ssm importing without ``selective_scan_cuda``: its function would raise on every call, so the
    pure-PyTorch scan runs, and the log says why."""
    def broken(*args):
        raise TypeError("'NoneType' object has no attribute 'fwd'")

    _fake_mamba_ssm(monkeypatch, broken, extension=False)
    monkeypatch.setattr(mm, "_is_cuda", lambda t: True)
    inputs = {k: (v.detach() if v is not None else None) for k, v in _inputs(3, length=9).items()}
    with caplog.at_level("INFO", logger="wsiomics.models.mamba"):
        out = selective_scan(**inputs, delta_softplus=True)
    assert torch.allclose(out, selective_scan_ref(**inputs, delta_softplus=True), atol=1e-5)
    assert any("pure-PyTorch" in r.getMessage() and "selective_scan_cuda" in r.getMessage() for r in caplog.records)
    assert "selective_scan_cuda" in mm.scan_backend(torch.device("cuda"))


def test_cuda_kernel_decided_once_per_process(monkeypatch, fresh_kernel_choice):
    imports = []
    real = mm.importlib.import_module

    def counting(name, *a, **k):
        imports.append(name)
        return real(name, *a, **k)

    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)  # not installed
    monkeypatch.setattr(mm.importlib, "import_module", counting)
    monkeypatch.setattr(mm, "_is_cuda", lambda t: True)
    inputs = {k: (v.detach() if v is not None else None) for k, v in _inputs(4, length=5).items()}
    for _ in range(3):
        selective_scan(**inputs)
    assert imports.count("mamba_ssm.ops.selective_scan_interface") == 1
    assert mm.scan_backend(torch.device("cpu")).startswith("pure-PyTorch")


# ----------------------------------------------------------------------------------------------- blocks
def test_mamba_block_reference_initialisation():
    torch.manual_seed(0)
    m = Mamba(64, dt_min=0.001, dt_max=0.1)
    assert m.d_inner == 128 and m.dt_rank == 4
    assert m.in_proj.weight.shape == (256, 64) and m.in_proj.bias is None
    assert m.conv1d.weight.shape == (128, 1, 4) and m.conv1d.bias is not None
    assert m.x_proj.weight.shape == (4 + 32, 128) and m.out_proj.weight.shape == (64, 128)
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.dt_proj.weight.abs().max() <= 4**-0.5
    assert torch.allclose(-torch.exp(m.A_log), -torch.arange(1, 17.0).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))
    assert Mamba.from_config(MambaConfig(d_model=64)).config == m.config


def test_mamba_block_is_causal_and_trains():
    torch.manual_seed(0)
    m = Mamba(16, d_state=8)
    x = torch.randn(2, 30, 16)
    y = m(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 20:] = torch.randn(2, 10, 16)
    y2 = m(x2)
    assert torch.allclose(y[:, :20], y2[:, :20], atol=1e-6)
    assert not torch.allclose(y[:, 20:], y2[:, 20:], atol=1e-3)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in m.parameters())


def test_mamba_block_matches_reference_scan(monkeypatch):
    torch.manual_seed(0)
    m = Mamba(16, d_state=8)
    x = torch.randn(2, 21, 16)
    y = m(x)
    monkeypatch.setattr(mm, "selective_scan", selective_scan_ref)
    assert _rel(y, m(x)) <= 1e-4


def _block_grads(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y = m(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}


@pytest.mark.parametrize(("length", "stretch", "d_conv"), [(50, 16, 4), (50, 7, 4), (33, 3, 4), (40, 8, 2)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_block_recomputed_in_stretches_matches_whole(length, stretch, d_conv, bidirectional):
    """The segment-recompute path (conv look-back and scan state across stretches, gradients handed back
    stretch to stretch) gives the whole-sequence block's output and every gradient, x's included."""
    torch.manual_seed(0)
    cls = BiMamba if bidirectional else Mamba
    whole = cls(16, d_state=4, d_conv=d_conv, recompute_length=None)
    pieces = cls(16, d_state=4, d_conv=d_conv, recompute_length=stretch)
    pieces.load_state_dict(whole.state_dict())
    x = torch.randn(2, length, 16)
    y0, g0 = _block_grads(whole, x)
    y1, g1 = _block_grads(pieces, x)
    assert _rel(y1, y0) <= 1e-5
    assert g0.keys() == g1.keys()
    for name in g0:
        assert _rel(g1[name], g0[name]) <= 1e-4, name
    with torch.no_grad():  # no gradient wanted: the whole-sequence path
        assert torch.equal(pieces(x), whole(x))


def test_recompute_keeps_only_the_input_scan_outputs_and_stretch_states():
    """What the segment-recompute path holds for the backward (saved tensors plus each stretch's recorded
    scan output and states) is its input, the (B, d_inner, L) scan output and a state per segment: a small
    fraction of what the whole-sequence block saves (its projections, conv, silu, dt, gate...)."""
    torch.manual_seed(0)
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def held_bytes(m: Mamba, x: torch.Tensor) -> int:
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = m(x)  # what the forward keeps until the backward
        tapes = getattr(y.grad_fn, "tapes", [])
        for tape in tapes:
            for entry in tape.entries:
                for t in entry:
                    pack(t)
        y.sum().backward()  # the backward works and frees it all
        assert all(t is None for t in tapes)
        return sum(sizes.values())  # distinct storages

    length, d_model = 1024, 32
    x = torch.randn(1, length, d_model, requires_grad=True)
    whole = held_bytes(Mamba(d_model, recompute_length=None), x)
    pieces = held_bytes(Mamba(d_model, recompute_length=128), x)
    x_bytes = x.numel() * 4
    scan_out = 2 * d_model * length * 4
    states = 2 * (length // 512 + length // 128) * 2 * d_model * 16 * 4  # segment and stretch states, generous
    assert pieces <= x_bytes + scan_out + states + 4096
    assert whole > 10 * x_bytes and pieces < whole / 4


@pytest.mark.parametrize("shared", [False, True])
def test_bimamba_sees_both_directions(shared):
    torch.manual_seed(0)
    m = BiMamba(16, d_state=8, shared=shared)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == sum(p.numel() for p in Mamba(16, d_state=8).parameters()) * (1 if shared else 2)
    x = torch.randn(1, 24, 16)
    y = m(x)
    x2 = x.clone()
    x2[:, 18:] += 1.0
    y2 = m(x2)
    assert y.shape == x.shape
    assert not torch.allclose(y[:, :18], y2[:, :18], atol=1e-4)  # earlier outputs see the future
    summed = BiMamba(16, d_state=8, shared=shared, combine="sum")
    summed.load_state_dict(m.state_dict())
    assert torch.allclose(summed(x), 2 * y, atol=1e-6)
    with pytest.raises(ValueError, match="combine"):
        BiMamba(16, combine="max")


def test_scan_under_bf16_autocast_stays_fp32():
    """The output contraction <C, h> (an einsum, i.e. a bmm that autocast would run in bf16) and the backward's
    matmuls run with autocast off: the scan under CPU bf16 autocast equals the fp32 scan, gradients too."""
    results = []
    for autocast in (False, True):
        inputs = _inputs(5, batch=2, dim=16, n=8, length=300)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, chunk_size=8,
                                       segment_size=64)
            (out.square().sum() + last.sum()).backward()  # a backward inside autocast, as _SegmentRecompute runs
        results.append([out.detach(), last.detach()] + [inputs[k].grad for k in ("u", "delta", "B", "C", "z")])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_scan_sizes_per_device():
    cpu = mm.scan_sizes(torch.device("cpu"), batch=4, dim=256, d_state=16)
    assert cpu == (mm.CHUNK_SIZE, mm.SEGMENT_SIZE)
    small = mm.scan_sizes(torch.device("cuda"), batch=1, dim=256, d_state=16)
    big = mm.scan_sizes(torch.device("cuda"), batch=64, dim=1024, d_state=16)
    # fewer, larger launches on a GPU, while one (batch, segment, dim, d_state) fp32 work buffer stays in budget
    assert small[0] >= cpu[0] and small[1] > cpu[1]
    assert big[1] < small[1]
    for (T, S), (b, d) in ((small, (1, 256)), (big, (64, 1024))):
        assert S % T == 0 and S >= T
        assert b * S * d * 16 * 4 <= mm.CUDA_SEGMENT_BYTES or S == T


def test_chunked_scan_matches_reference_at_gpu_sizes():
    """The sizes chosen for a GPU give the reference result (checked on the CPU, where any sizes run)."""
    inputs = {k: (v.detach() if v is not None else None) for k, v in _inputs(6, length=700).items()}
    T, S = mm.scan_sizes(torch.device("cuda"), batch=2, dim=8, d_state=4)
    out = selective_scan(**inputs, delta_softplus=True, chunk_size=T, segment_size=S)
    assert _rel(out, selective_scan_ref(**inputs, delta_softplus=True)) < 1e-5
