"""Patch features for one slide: tiles read in worker processes, encoded on the GPU (or CPU), streamed to zarr.

The design goal is an encoder-bound pipeline: workers decode and resize tiles while the model runs, tiles
travel as uint8 (pinned, non-blocking copies on CUDA) and are normalised on the device, and features are
written chunk by chunk so memory does not grow with the slide. Output rows follow the tiles store's
``coords`` order exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from tqdm import tqdm

from wsiomics import devices
from wsiomics.encoders import Encoder, preset_attrs
from wsiomics.encoders.fusion import fold_batchnorm
from wsiomics.features.tiles import TileBatches, TileGeometry
from wsiomics.io import atomic_zarr, json_safe, open_store
from wsiomics.slide import SlideError

log = logging.getLogger(__name__)

OK = "ok"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STORE_DTYPES = ("float16", "float32")


class FeatureError(RuntimeError):
    """Extraction produced something unusable (non-finite features, a store that cannot be written)."""


class TileReadError(FeatureError):
    """Tiles of a slide that tiled fine could not be read (damaged data deep in the file)."""


@dataclass(frozen=True)
class ExtractParams:
    """How to run an encoder over a slide; the defaults are the pipeline's."""

    batch_size: str = "auto"  # auto | N tiles per forward pass (see resolve_batch_size)
    num_workers: str = "auto"  # auto | N worker processes reading tiles (see resolve_workers)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float16"  # how features are stored
    chunk_rows: int = 4096
    channels_last: bool = True
    fold_batchnorm: bool = True  # fold BatchNorm into convolutions for inference (exact up to rounding)
    compile: str = "auto"  # auto | true | false: torch.compile the encoder (see resolve_compile)


def resolve_device(spec: str) -> torch.device:
    return devices.resolve_device(spec, key="features.device", error=FeatureError)


def _count(spec: str | int, name: str, minimum: int) -> int | None:
    """``None`` for ``auto``, else the whole number ``spec`` (at least ``minimum``)."""
    if str(spec) == "auto":
        return None
    try:
        value = int(spec)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name} must be 'auto' or a whole number >= {minimum}; got {spec!r}")
    return value


def resolve_batch_size(spec: str | int, device: torch.device) -> int:
    """Tiles per forward pass. ``auto``: 128 on CUDA; 16 on the CPU, where small batches stay in cache.

    Measured on 2 cores with bf16: ResNet-50-trunc ran 91 patches/s at batch 16 but 61 at batch 64;
    ViT-S 55 vs 45. Out-of-memory errors halve the batch whatever its origin.
    """
    value = _count(spec, "batch_size", 1)
    if value is not None:
        return value
    return 128 if device.type == "cuda" else 16


def resolve_workers(spec: str | int, device: torch.device) -> int:
    """Reader processes. ``auto``: on CUDA, up to 8 (one CPU is left for the main process); on the CPU, none.

    On the CPU every core already runs the encoder's threads, so reader processes only preempt them (and
    stall oneDNN's parallel regions): measured on 2 cores, reading in the main process between batches
    was 6% faster than 1 or 2 workers. Users with many cores may still set a number.
    """
    value = _count(spec, "num_workers", 0)
    if value is not None:
        return value
    if device.type != "cuda":
        return 0
    return max(1, min(8, len(os.sched_getaffinity(0)) - 1))


# ONEDNN_MAX_CPU_ISA values (oneDNN's names, ALL/DEFAULT = no cap) under which oneDNN may use bf16 instructions:
# AVX512_CORE_BF16 and every later ISA (the FP16/AVX10 and AMX ones include them).
ONEDNN_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                    "AVX10_2_512", "AVX10_2_512_AMX_2")


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls in hardware (AVX512-BF16 or AMX) that this process may use: there bf16 autocast is ~2.5x
    faster than fp32. The hardware probes ignore caps set for the process (ATEN_CPU_CAPABILITY below AVX-512,
    ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16), under which bf16 is emulated and slower than fp32."""
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    if not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return not isa or isa in ONEDNN_BF16_ISAS


def resolve_precision(spec: str, device: torch.device, cuda_default: str) -> str:
    """``auto``: the encoder's preferred dtype on CUDA; bf16 on CPUs with bf16 hardware, else fp32."""
    if spec != "auto":
        if spec not in PRECISIONS:
            raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {spec!r}")
        return spec
    if device.type == "cuda":
        return cuda_default
    return "bf16" if cpu_has_fast_bf16() else "fp32"


COMPILE_MIN_TILES = 8192
COMPILE_CHOICES = ("auto", "true", "false")


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile would use on the CPU, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - private API: any failure means "not usable"
        return None


def resolve_compile(spec: str | bool, device: torch.device, n_tiles: int) -> bool:
    """Whether to ``torch.compile`` the encoder (inductor, weights frozen as constants, one static shape).

    On 2 CPU cores with bf16 it ran ResNet-50-trunc ~28% and ViT-S ~16% faster than eager once compiled,
    but compiling costs 9 s (ResNet) to 14 s (ViT-S) per job with an empty inductor cache, so ``auto``
    compiles on the CPU only for slides of at least COMPILE_MIN_TILES tiles, where the saving outweighs a
    cold compile, and only when a C++ compiler is installed. On CUDA ``auto`` stays eager: that path has
    not been measured yet; ``true`` compiles anywhere.
    """
    spec = str(spec).lower()
    if spec not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}; got {spec!r}")
    if spec != "auto":
        if spec == "true" and device.type == "cpu" and cpp_compiler() is None:
            raise FeatureError("features.compile is true but no C++ compiler was found (torch.compile needs one "
                               "on the CPU): install g++ (conda: cxx-compiler) or set features.compile: auto")
        return spec == "true"
    return device.type == "cpu" and n_tiles >= COMPILE_MIN_TILES and cpp_compiler() is not None


@contextlib.contextmanager
def tf32_disabled(active: bool = True):
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block, the caller's setting restored after.

    cuDNN convolves in TF32 (10-bit mantissa) by default, so ``precision: fp32`` would not be fp32 on a GPU.
    """
    if not active:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


class Encoding:
    """The device side: normalise uint8 tiles, run the model under autocast, halve the batch on OOM."""

    def __init__(self, encoder: Encoder, device: torch.device, precision: str, channels_last: bool, batch_size: int,
                 fold_bn: bool = True, compile_model: bool = False, compile_required: bool = False):
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.max_batch = batch_size
        self.model, self.folded = fold_batchnorm(encoder.model) if fold_bn else (encoder.model, False)
        self.model = self.model.to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Compiled lazily on the first batch; every batch is padded to max_batch so one static graph serves all.
        self.compiled = torch.compile(self.model, dynamic=False) if compile_model else None
        self.compile_required = compile_required
        self.compile_s: float | None = None
        p = encoder.preset
        self.mean = torch.tensor(p.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(p.std, device=device).view(1, 3, 1, 1) * 255

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, 3, S, S) uint8 on the device -> (b, D) float32
        b = len(x)
        if self.compiled is not None and b < self.max_batch:  # x: (max_batch, 3, S, S), zero tiles appended
            x = torch.cat([x, x.new_zeros((self.max_batch - b, *x.shape[1:]))])
        x = (x.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.precision]
        with tf32_disabled(dtype is None), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self._run(x)[:b].float()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, S, S) normalised -> (B, D); the first compiled call compiles (timed), or falls back to eager
        if self.compiled is None:
            return self.model(x)
        if self.compile_s is not None:
            return self._compiled(x)
        started = time.perf_counter()
        try:
            out = self._compiled(x)
        except Exception as e:
            if _is_oom(e):
                raise
            if self.compile_required:
                raise FeatureError(f"torch.compile of the encoder failed ({type(e).__name__}: {e}); set "
                                   "features.compile: false to run it eagerly") from e
            log.warning("torch.compile failed (%s: %s); running the encoder eagerly", type(e).__name__, e)
            self.compiled = None
            return self.model(x)
        self.compile_s = time.perf_counter() - started
        log.info("encoder compiled in %.1f s", self.compile_s)
        return out

    def _compiled(self, x: torch.Tensor) -> torch.Tensor:
        # Freezing (weights as constants, pre-packed for oneDNN) must be on while inductor compiles, which
        # happens inside a call (the first, or a recompile after an OOM halving). As a torch.compile option
        # it reached only part of the pipeline: ViT-S ran +23% over eager with it, +39% with the config set.
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # batch: (B, 3, S, S) uint8 on the host -> (B, D) float32 on the host
        x = batch.to(self.device, non_blocking=True)
        out, start = [], 0
        while start < len(x):
            size = min(self.max_batch, len(x) - start)
            try:
                out.append(self._forward(x[start:start + size]))
            except Exception as e:
                if not _is_oom(e) or size == 1:
                    raise
                self.max_batch = max(1, size // 2)
                log.warning("out of memory at batch size %d; retrying with %d", size, self.max_batch)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += size
        return torch.cat(out).cpu()


class EncodingCache:
    """The :class:`Encoding` of each (encoder, device, precision, options) used by one job's slides, so BatchNorm
    folding, the copy to the GPU and a compile are paid once per job, not once per slide."""

    def __init__(self) -> None:
        self._items: dict[tuple, tuple[Encoder, Encoding]] = {}
        self.built = 0

    def get(self, encoder: Encoder, device: torch.device, precision: str, params: ExtractParams, batch_size: int,
            compiled: bool) -> Encoding:
        key = (id(encoder), str(device), precision, params.channels_last, params.fold_batchnorm, compiled, batch_size)
        if key not in self._items:  # the encoder is kept with it, so its id is not reused while cached
            self._items[key] = encoder, Encoding(
                encoder, device, precision, params.channels_last, batch_size, params.fold_batchnorm,
                compile_model=compiled, compile_required=str(params.compile).lower() == "true")
            self.built += 1
        return self._items[key][1]


# The GPU waiting for tiles longer than this (seconds, and share of the encoding loop) is worth a warning.
TILE_WAIT_WARN_S = 2.0
TILE_WAIT_WARN_SHARE = 0.2


def tile_wait_warning(timings: dict[str, Any], device: torch.device) -> str | None:
    """Why and how to fix it, when a GPU spent a good part of a slide waiting for its tile readers."""
    wait, encode = timings.get("wait_for_tiles_s", 0.0), timings.get("encode_s", 0.0)
    if device.type != "cuda" or wait < TILE_WAIT_WARN_S or wait < TILE_WAIT_WARN_SHARE * (wait + encode):
        return None
    return (f"the GPU waited {wait:.1f} s for tiles ({100 * wait / (wait + encode):.0f}% of the encoding loop) with "
            f"{timings.get('num_workers', '?')} tile-reading process(es). Fix: give the job more CPUs "
            "(features.threads: num_workers auto starts one fewer than the job's CPUs, up to 8) or set "
            "features.num_workers")


class RowWriter:
    """Append rows to a zarr array in whole chunks, so each chunk is written exactly once."""

    def __init__(self, array, chunk_rows: int):
        self.array = array
        self.chunk_rows = chunk_rows
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def append(self, rows: np.ndarray) -> None:
        self.buffer.append(rows)
        self.buffered += len(rows)
        if self.buffered >= self.chunk_rows:
            self._flush(whole_chunks_only=True)

    def _flush(self, whole_chunks_only: bool) -> None:
        data = np.concatenate(self.buffer) if self.buffer else np.empty((0,) + self.array.shape[1:])
        n = (len(data) // self.chunk_rows) * self.chunk_rows if whole_chunks_only else len(data)
        if n:
            self.array[self.written:self.written + n] = data[:n]
            self.written += n
        self.buffer = [data[n:]] if n < len(data) else []
        self.buffered = len(data) - n

    def close(self) -> None:
        self._flush(whole_chunks_only=False)
        if self.written != self.array.shape[0]:
            raise FeatureError(f"wrote {self.written} of {self.array.shape[0]} feature rows")


@dataclass
class ExtractResult:
    slide_id: str
    status: str
    n_tiles: int
    seconds: float
    skipped: bool = False


def _finite_or_raise(features: torch.Tensor, offset: int, coords: np.ndarray, slide_id: str) -> None:
    bad = (~torch.isfinite(features).all(dim=1)).nonzero().flatten()
    if len(bad):
        i = offset + int(bad[0])
        raise FeatureError(
            f"{slide_id}: the encoder produced NaN/inf features for {len(bad)} tile(s) in rows {offset}.."
            f"{offset + len(features) - 1}, first at tile {i} (level-0 x={coords[i][0]}, y={coords[i][1]}). "
            "With fp16 this is usually an overflow: set features.precision to bf16 or fp32; otherwise check "
            "the weights (features.weights) for NaNs.")


def _storable_or_raise(rows: np.ndarray, offset: int, coords: np.ndarray, slide_id: str, dtype: str) -> None:
    """Finite features that overflow the storage dtype (float16 tops out at 65504) become inf in the cast:
    checked after it, so the store never holds inf."""
    if dtype == "float32":
        return
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        i = offset + int(bad[0])
        raise FeatureError(
            f"{slide_id}: {len(bad)} feature row(s) in rows {offset}..{offset + len(rows) - 1} exceed the {dtype} "
            f"range (|x| > {float(np.finfo(dtype).max):g}), first at tile {i} (level-0 x={coords[i][0]}, "
            f"y={coords[i][1]}). Fix: store them as float32 (features.dtype: float32).")


def _identity(encoder: Encoder, precision: str, params: ExtractParams, tiles_attrs: dict[str, Any]) -> dict[str, Any]:
    """The attrs that decide whether an existing store is still valid for this run."""
    return {"encoder": encoder.name, "weights": encoder.weights.as_attrs(), "precision": precision,
            "dtype": params.dtype, "tiles_created": tiles_attrs.get("provenance", {}).get("created")}


def is_current(out: str | os.PathLike, identity: dict[str, Any]) -> bool:
    """A finished store made from the same tiles with the same encoder, weights, precision and dtype."""
    try:
        attrs = dict(open_store(out).attrs)
    except (FileNotFoundError, RuntimeError, ValueError):
        return False
    return all(json_safe(attrs.get(k)) == json_safe(v) for k, v in identity.items())


def effective_mpp(tiles_attrs: dict[str, Any], input_size: int) -> float | None:
    """µm per pixel the encoder actually sees: the tile's physical side over the encoder's input size.

    Equals ``target_mpp`` only when ``tiling.patch_size`` is the encoder's input size; a 256 px tile fed to a
    224 px encoder is shrunk, so the encoder sees 0.571 µm/px instead of 0.5. None for an untiled slide.
    """
    level0, mpp = tiles_attrs.get("patch_size_level0"), tiles_attrs.get("mpp")
    if not level0 or not mpp:
        return None
    return float(level0) * float(mpp) / int(input_size)


def extract_slide(tiles_store: str | os.PathLike, out: str | os.PathLike, encoder: Encoder,
                  params: ExtractParams = ExtractParams(), *, strict: bool = False, force: bool = False,
                  progress: bool = True, encodings: EncodingCache | None = None) -> ExtractResult:
    """Encode every tile of ``tiles_store`` into ``out`` (written atomically; skipped when already current).

    ``encodings``: share one across the slides of a job to prepare the encoder on the device once. A slide
    whose tiling status is not ``ok`` gets a store with zero rows and that status; tiles that cannot be read give
    status ``unreadable`` (or an error in strict mode); non-finite features are always an error.
    """
    if params.dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {STORE_DTYPES}; got {params.dtype!r}")
    tiles = open_store(tiles_store)
    tattrs = dict(tiles.attrs)
    slide_id = tattrs.get("slide_id", Path(tiles_store).stem)
    coords = np.asarray(tiles["coords"][...], dtype=np.int64)
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device, encoder.preset.cuda_precision)
    batch_size = resolve_batch_size(params.batch_size, device)  # bad values fail before anything is written
    workers = resolve_workers(params.num_workers, device)
    compiled = resolve_compile(params.compile, device, len(coords))
    identity = _identity(encoder, precision, params, tattrs)
    if not force and is_current(out, identity):
        log.info("%s: %s is current, skipped", slide_id, out)
        return ExtractResult(slide_id, tattrs.get("status", OK), len(coords), 0.0, skipped=True)

    status, reason = tattrs.get("status", OK), tattrs.get("reason", "")
    if status != OK:
        coords = coords[:0]
    geometry = None if status != OK else TileGeometry(
        level=int(tattrs["read_level"]), read_size=int(tattrs["read_size"]),
        out_size=encoder.preset.input_size, interpolation=encoder.preset.interpolation)
    effective = effective_mpp(tattrs, encoder.preset.input_size)
    if status == OK and effective is not None and tattrs.get("patch_size") != encoder.preset.input_size:
        log.warning("%s: tiles are %s px at %s um/px but %s takes %d px, so each tile is resized and the encoder "
                    "sees %.3f um/px, not %s (recorded as effective_mpp). Fix: tiling.patch_size: %d keeps the "
                    "target resolution", slide_id, tattrs["patch_size"], tattrs.get("target_mpp"), encoder.name,
                    encoder.preset.input_size, effective, tattrs.get("target_mpp"), encoder.preset.input_size)
    attrs = {
        "slide_id": slide_id, "patient_id": tattrs.get("patient_id", ""), **identity,
        "feature_dim": encoder.feature_dim, "n_tiles": int(len(coords)), "transforms": encoder.transforms(),
        "encoder_preset": preset_attrs(encoder.preset), "weights_path": encoder.weights.path, "device": str(device),
        "patch_size": encoder.preset.input_size, "tile_patch_size": tattrs.get("patch_size"),
        "patch_size_level0": tattrs.get("patch_size_level0"), "target_mpp": tattrs.get("target_mpp"),
        "effective_mpp": effective, "mpp": tattrs.get("mpp"), "read_level": tattrs.get("read_level"),
        "read_size": tattrs.get("read_size"), "read_downsample": tattrs.get("read_downsample"),
        "tiles_store": str(Path(tiles_store).resolve()), "slide_path": tattrs.get("slide_path"),
        "extract_params": asdict(params), "status": status, "reason": reason,
    }
    try:
        timings = _write_store(out, attrs, coords, lambda feats: _encode_into(
            feats, coords, geometry, tattrs["slide_path"], slide_id, encoder, device, precision, params, batch_size,
            workers, compiled, progress, encodings or EncodingCache()))
    except TileReadError as e:
        if strict:
            raise
        log.error("%s (recorded as status 'unreadable'; strict: true makes this fatal)", e)
        status, reason, coords = "unreadable", f"{e}. Fix: re-scan or re-export the slide, then re-run", coords[:0]
        attrs.update(status=status, reason=reason, n_tiles=0)
        timings = _write_store(out, attrs, coords, None)
    log.info("%s: %s, %d tiles -> %s (%s, %s on %s) in %.1f s (%.1f tiles/s)", slide_id, status, len(coords), out,
             encoder.name, precision, device, timings["seconds"], timings["patches_per_s"])
    if (advice := tile_wait_warning(timings, device)) is not None:
        log.warning("%s: %s", slide_id, advice)
    return ExtractResult(slide_id, status, len(coords), timings["seconds"])


def _write_store(out, attrs: dict[str, Any], coords: np.ndarray, encode) -> dict[str, Any]:
    """The store, written atomically: coords first, then features via ``encode(array) -> timings``."""
    started = time.perf_counter()
    n, dim = len(coords), attrs["feature_dim"]
    with atomic_zarr(out, json_safe(attrs)) as root:
        chunk_rows = max(1, min(attrs["extract_params"]["chunk_rows"], n))
        feats = root.create_array("features", shape=(n, dim), dtype=attrs["dtype"], chunks=(chunk_rows, dim))
        root.create_array("coords", shape=(n, 2), dtype=np.int64, chunks=(max(1, n), 2))
        if n:
            root["coords"][...] = coords
        timings = encode(feats) if n and encode else {}
        timings["seconds"] = time.perf_counter() - started
        timings["patches_per_s"] = n / timings["seconds"] if n else 0.0
        root.attrs["timings"] = json_safe(timings)
    return timings


def _loader(dataset: TileBatches, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    size = dataset.geometry.out_size
    workers, prefetch = devices.shm_loader_limits(min(workers, len(dataset)), dataset.batch_size * 3 * size * size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=prefetch, persistent_workers=False)


def _encode_into(feats, coords, geometry, slide_path, slide_id, encoder, device, precision, params, batch_size,
                 workers, compiled, progress, encodings: EncodingCache) -> dict[str, Any]:
    encoding = encodings.get(encoder, device, precision, params, batch_size, compiled)
    dataset = TileBatches(slide_path, coords, geometry, batch_size)
    writer = RowWriter(feats, feats.chunks[0])
    wait = compute = 0.0
    done = 0
    bar = tqdm(total=len(coords), desc=f"{slide_id} tiles", unit="tile", disable=not progress, mininterval=5)
    try:
        batches = iter(_loader(dataset, workers, device))
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            t1 = time.perf_counter()
            out = encoding(batch)
            _finite_or_raise(out, done, coords, slide_id)
            with np.errstate(over="ignore"):  # an overflow is checked, and named, right after the cast
                rows = out.numpy().astype(params.dtype)
            _storable_or_raise(rows, done, coords, slide_id, params.dtype)
            writer.append(rows)
            t2 = time.perf_counter()
            wait, compute = wait + t1 - t0, compute + t2 - t1
            done += len(out)
            bar.update(len(out))
    except (openslide.OpenSlideError, SlideError) as e:
        raise TileReadError(f"{slide_id}: reading tiles from {slide_path} failed after {done} tiles: {e}") from e
    finally:
        bar.close()
    writer.close()
    return {"wait_for_tiles_s": wait, "encode_s": compute, "batch_size": batch_size,
            "batch_size_used": encoding.max_batch, "num_workers": workers, "batchnorm_folded": encoding.folded,
            "compiled": encoding.compiled is not None, "compile_s": encoding.compile_s}
