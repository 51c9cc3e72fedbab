"""Feature extraction: equal to a hand computation, order, resume, OOM retry, NaN guard, weights, presets."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import openslide
import pytest
import timm
import torch
from PIL import Image

from wsiomics.encoders import WeightsError, build_encoder
from wsiomics.encoders.fusion import fold_batchnorm
from wsiomics.features import ExtractParams, FeatureError, extract_slide, resolve_precision
from wsiomics.features import extract as extract_mod
from wsiomics.features.extract import resolve_batch_size, resolve_workers
from wsiomics.io import open_store
from wsiomics.slide import SlideError
from wsiomics.tiling import TilingParams, tile_slide

REPO = Path(__file__).resolve().parents[1]
ENCODER = "test_resnet"  # a tiny timm CNN (96-d, 160 px input): every code path, a fraction of the time
FP32 = ExtractParams(batch_size=16, num_workers=0, precision="fp32", dtype="float32", chunk_rows=64)


@pytest.fixture(scope="module")
def tiled(slides, slide_dir, slide_factory, tmp_path_factory) -> dict[str, Path]:
    """Tiles stores of a 20x slide, the same layout at 40x (read at level 0 and resized), a blank slide, and a
    40x TIFF with 2x steps (read at level 1; the same file as test_tiling's)."""
    out = tmp_path_factory.mktemp("tiles")
    tiff40 = slide_dir / "tiff40.tiff"
    if not tiff40.exists():
        slide_factory(slide_dir, "tiff40", seed=11, mpp=0.25, fmt="tiff", size_um=(1400.0, 1050.0))
    stores = {}
    for name, path in ({name: slides[name] for name in ("pen20", "same40", "blank")} | {"tiff40": tiff40}).items():
        tile_slide(path, name, out / f"{name}.zarr", out / f"{name}.png")
        stores[name] = out / f"{name}.zarr"
    return stores


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(ENCODER, pretrained=False, seed=0)


def direct_features(tiles_store: Path, encoder, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The reference: tiles read by hand with OpenSlide, resized with PIL, normalised, fp32 forward."""
    tiles = open_store(tiles_store)
    attrs = dict(tiles.attrs)
    coords = tiles["coords"][...][:limit]
    slide = openslide.OpenSlide(attrs["slide_path"])
    p = encoder.preset
    size, level, read = p.input_size, attrs["read_level"], attrs["read_size"]
    mean, std = torch.tensor(p.mean).view(3, 1, 1), torch.tensor(p.std).view(3, 1, 1)
    images = []
    for x, y in coords:
        region = slide.read_region((int(x), int(y)), level, (read, read))
        rgb = Image.alpha_composite(Image.new("RGBA", region.size, "white"), region).convert("RGB")
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR if p.interpolation == "bilinear"
                         else Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255
        images.append((tensor - mean) / std)
    with torch.no_grad():
        feats = torch.cat([encoder.model(torch.stack(images[i:i + 32])) for i in range(0, len(images), 32)])
    return feats.numpy(), coords


def read(store: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    root = open_store(store)
    return root["features"][...], root["coords"][...], dict(root.attrs)


@pytest.mark.parametrize(("name", "level"), [("pen20", 0), ("same40", 0), ("tiff40", 1)])
def test_features_equal_a_direct_computation_in_coords_order(tiled, encoder, tmp_path, name, level):
    out = tmp_path / f"{name}.zarr"
    result = extract_slide(tiled[name], out, encoder, ExtractParams(**{**FP32.__dict__, "num_workers": 2}))
    feats, coords, attrs = read(out)
    expected, expected_coords = direct_features(tiled[name], encoder)
    assert attrs["read_level"] == level and attrs["read_downsample"] == [1.0, 2.0][level]
    assert result.status == "ok" and result.n_tiles == len(expected) > (5 if name == "tiff40" else 50)
    np.testing.assert_array_equal(coords, expected_coords)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert feats.dtype == np.float32 and feats.shape == (len(coords), encoder.feature_dim)
    assert attrs["encoder"] == ENCODER and attrs["precision"] == "fp32" and attrs["complete"]
    assert attrs["weights"]["source"] == "random" and attrs["transforms"]["input_size"] == 160
    assert attrs["patch_size_level0"] == open_store(tiled[name]).attrs["patch_size_level0"]
    assert attrs["timings"]["patches_per_s"] > 0


def test_default_float16_store_is_chunked_by_rows_and_close_to_fp32(tiled, encoder, tmp_path):
    params = ExtractParams(**{**FP32.__dict__, "dtype": "float16", "chunk_rows": 40})
    extract_slide(tiled["pen20"], tmp_path / "f16.zarr", encoder, params)
    extract_slide(tiled["pen20"], tmp_path / "f32.zarr", encoder, FP32)
    f16, _, _ = read(tmp_path / "f16.zarr")
    f32, _, _ = read(tmp_path / "f32.zarr")
    assert f16.dtype == np.float16 and open_store(tmp_path / "f16.zarr")["features"].chunks == (40, 96)
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=2e-3, atol=2e-3 * np.abs(f32).max())


def test_workers_and_batch_size_do_not_change_features(tiled, encoder, tmp_path):
    extract_slide(tiled["pen20"], tmp_path / "a.zarr", encoder, FP32)
    extract_slide(tiled["pen20"], tmp_path / "b.zarr", encoder,
                  ExtractParams(**{**FP32.__dict__, "num_workers": 2, "batch_size": 7, "channels_last": False,
                                   "fold_batchnorm": False}))
    a, b = read(tmp_path / "a.zarr")[0], read(tmp_path / "b.zarr")[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_bf16_autocast_is_close_to_fp32(tiled, encoder, tmp_path):
    bf16 = ExtractParams(**{**FP32.__dict__, "precision": "bf16"})
    extract_slide(tiled["pen20"], tmp_path / "bf16.zarr", encoder, bf16)
    extract_slide(tiled["pen20"], tmp_path / "fp32.zarr", encoder, FP32)
    a, b = torch.from_numpy(read(tmp_path / "bf16.zarr")[0]), torch.from_numpy(read(tmp_path / "fp32.zarr")[0])
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    assert read(tmp_path / "bf16.zarr")[2]["precision"] == "bf16"


def test_rerun_skips_a_current_store_and_redoes_a_changed_one(tiled, encoder, tmp_path):
    out = tmp_path / "f.zarr"
    assert not extract_slide(tiled["pen20"], out, encoder, FP32).skipped
    assert extract_slide(tiled["pen20"], out, encoder, FP32).skipped
    changed = extract_slide(tiled["pen20"], out, encoder, ExtractParams(**{**FP32.__dict__, "dtype": "float16"}))
    assert not changed.skipped and read(out)[0].dtype == np.float16


def test_killed_extraction_leaves_no_store_and_the_rerun_equals_a_clean_run(tiled, encoder, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "wsiomics.features", "extract", "--tiles", str(tiled["pen20"]), "--out", str(out),
           "--encoder", ENCODER, "--no-pretrained", "--precision", "fp32", "--dtype", "float32", "--batch-size", "2",
           "--chunk-rows", "4", "--num-workers", "0", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until some feature chunks are on disk, then kill hard
            temps = list(tmp_path.glob(".tmp-killed.zarr.*"))
            if temps and len(list(temps[0].glob("features/c/*/*"))) >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("extraction never started writing")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not out.exists() and list(tmp_path.glob(".tmp-killed.zarr.*"))
    extract_slide(tiled["pen20"], out, encoder, FP32)
    extract_slide(tiled["pen20"], tmp_path / "clean.zarr", encoder, FP32)
    np.testing.assert_array_equal(read(out)[0], read(tmp_path / "clean.zarr")[0])
    assert not list(tmp_path.glob(".tmp-killed.zarr.*")), "the dead writer's leftover was not swept"


def test_compiled_encoder_gives_the_eager_features(tiled, encoder, tmp_path):
    """torch.compile (inductor, frozen weights, one static shape): 7-tile batches leave a short last batch."""
    params = ExtractParams(**{**FP32.__dict__, "batch_size": 7, "compile": "true"})
    extract_slide(tiled["pen20"], tmp_path / "compiled.zarr", encoder, params)
    extract_slide(tiled["pen20"], tmp_path / "eager.zarr", encoder, FP32)
    compiled, coords, attrs = read(tmp_path / "compiled.zarr")
    eager, eager_coords, _ = read(tmp_path / "eager.zarr")
    assert len(coords) % 7 != 0, "the fixture should leave a short last batch"
    assert attrs["timings"]["compiled"] and attrs["timings"]["compile_s"] > 0
    np.testing.assert_array_equal(coords, eager_coords)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-4 * np.abs(eager).max())


def test_resolve_compile_auto_true_false(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big = extract_mod.COMPILE_MIN_TILES
    monkeypatch.setattr(extract_mod, "cpp_compiler", lambda: "g++")
    assert extract_mod.resolve_compile("auto", cpu, big) and not extract_mod.resolve_compile("auto", cpu, big - 1)
    assert not extract_mod.resolve_compile("auto", cuda, 10 * big)  # not measured on CUDA yet
    assert extract_mod.resolve_compile("True", cpu, 1) and not extract_mod.resolve_compile(False, cpu, 10 * big)
    monkeypatch.setattr(extract_mod, "cpp_compiler", lambda: None)
    assert not extract_mod.resolve_compile("auto", cpu, 10 * big)
    with pytest.raises(FeatureError, match="no C\\+\\+ compiler.*install g\\+\\+.*features.compile: auto"):
        extract_mod.resolve_compile("true", cpu, 10)
    with pytest.raises(ValueError, match="compile must be one of auto, true, false; got 'sometimes'"):
        extract_mod.resolve_compile("sometimes", cpu, 10)


def test_compiled_path_pads_short_batches_to_one_static_shape(encoder, monkeypatch):
    """Every call into the compiled model has the full batch shape, so inductor compiles one graph."""
    shapes = []

    def recording_compile(model, **_):
        def run(x):
            shapes.append(tuple(x.shape))
            return model(x)
        return run

    monkeypatch.setattr(torch, "compile", recording_compile)
    batch = torch.randint(0, 255, (19, 3, 160, 160), dtype=torch.uint8)
    plain = extract_mod.Encoding(encoder, torch.device("cpu"), "fp32", True, 8)(batch)
    padded = extract_mod.Encoding(encoder, torch.device("cpu"), "fp32", True, 8, compile_model=True)(batch)
    assert shapes == [(8, 3, 160, 160)] * 3  # 8 + 8 + 3 tiles, the last call padded with 5 zero tiles
    assert padded.shape == plain.shape == (19, encoder.feature_dim)
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-5)


def test_a_failing_compile_falls_back_to_eager_unless_it_was_asked_for(encoder, monkeypatch):
    def broken_compile(model, **_):
        def run(x):
            raise RuntimeError("InductorError: C++ compile error")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    batch = torch.randint(0, 255, (5, 3, 160, 160), dtype=torch.uint8)
    plain = extract_mod.Encoding(encoder, torch.device("cpu"), "fp32", True, 8)(batch)
    fallback = extract_mod.Encoding(encoder, torch.device("cpu"), "fp32", True, 8, compile_model=True)
    np.testing.assert_allclose(fallback(batch), plain, rtol=1e-5, atol=1e-5)
    assert fallback.compiled is None
    required = extract_mod.Encoding(encoder, torch.device("cpu"), "fp32", True, 8, compile_model=True,
                                    compile_required=True)
    with pytest.raises(FeatureError, match="torch.compile of the encoder failed.*features.compile: false"):
        required(batch)


class FlakyMemory(torch.nn.Module):
    """Raises CUDA's out-of-memory error for batches above ``limit``, like a GPU that is too small."""

    def __init__(self, model, limit: int):
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_gives_the_same_features(tiled, tmp_path):
    flaky = build_encoder(ENCODER, pretrained=False, seed=0)
    flaky.model = FlakyMemory(flaky.model, limit=4)
    extract_slide(tiled["pen20"], tmp_path / "oom.zarr", flaky, FP32)
    extract_slide(tiled["pen20"], tmp_path / "ref.zarr", build_encoder(ENCODER, pretrained=False, seed=0), FP32)
    assert flaky.model.sizes[:3] == [16, 8, 4] and max(flaky.model.sizes[3:]) == 4
    assert read(tmp_path / "oom.zarr")[2]["timings"]["batch_size_used"] == 4
    np.testing.assert_allclose(read(tmp_path / "oom.zarr")[0], read(tmp_path / "ref.zarr")[0], rtol=1e-5, atol=1e-5)


def test_nan_features_are_an_error_naming_slide_and_tile(tiled, tmp_path):
    class NaNAt(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.seen = model, 0

        def forward(self, x):
            out = self.model(x)
            row = 21 - self.seen
            if 0 <= row < len(out):
                out[row, 3] = float("nan")
            self.seen += len(x)
            return out

    broken = build_encoder(ENCODER, pretrained=False)
    broken.model = NaNAt(broken.model)
    coords = open_store(tiled["pen20"])["coords"][21]
    with pytest.raises(FeatureError, match=rf"pen20: .*NaN/inf.*tile 21 \(level-0 x={coords[0]}, y={coords[1]}\)"):
        extract_slide(tiled["pen20"], tmp_path / "nan.zarr", broken, FP32)
    assert not (tmp_path / "nan.zarr").exists()


def test_slide_without_tiles_gets_an_empty_store_with_its_status(tiled, encoder, tmp_path):
    result = extract_slide(tiled["blank"], tmp_path / "blank.zarr", encoder, FP32)
    feats, coords, attrs = read(tmp_path / "blank.zarr")
    assert result.status == attrs["status"] == "no_tissue" and attrs["reason"]
    assert feats.shape == (0, 96) and coords.shape == (0, 2)


@pytest.fixture(scope="module")
def destroyed(slides, tmp_path_factory) -> Path:
    """A tiles store whose slide file was emptied after tiling."""
    folder = tmp_path_factory.mktemp("destroyed")
    slide = folder / "damaged.svs"
    slide.write_bytes(slides["pen20"].read_bytes())
    tile_slide(slide, "damaged", folder / "t.zarr", folder / "t.png")
    slide.write_bytes(b"")
    return folder / "t.zarr"


# num_workers >= 1 is the GPU path: the slide fails inside a DataLoader worker and torch re-raises it as type(e)(msg)
@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_tiles_are_recorded_or_fatal_in_strict_mode(destroyed, encoder, tmp_path, workers):
    params = ExtractParams(**{**FP32.__dict__, "num_workers": workers})
    result = extract_slide(destroyed, tmp_path / "f.zarr", encoder, params)
    attrs = read(tmp_path / "f.zarr")[2]
    assert result.status == attrs["status"] == "unreadable" and "damaged" in attrs["reason"]
    assert "not a slide format OpenSlide supports" in attrs["reason"] and "Traceback" not in attrs["reason"]
    with pytest.raises(FeatureError, match="damaged: reading tiles"):
        extract_slide(destroyed, tmp_path / "g.zarr", encoder, params, strict=True)


def test_slide_error_survives_pickling_and_rebuilding_from_its_message():
    error = pickle.loads(pickle.dumps(SlideError("no_mpp", "slide X: no mpp")))
    assert (type(error), error.status, str(error)) == (SlideError, "no_mpp", "slide X: no mpp")
    assert SlideError("x.svs: truncated").status == "unreadable"
    report = ("Caught SlideError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "tiles.py", line 62\nwsiomics.slide.SlideError: x.svs: truncated. Fix: re-download\n')
    rebuilt = SlideError(report)  # how torch re-raises a worker's error in the main process
    assert (rebuilt.status, str(rebuilt)) == ("unreadable", "x.svs: truncated. Fix: re-download")


def test_float16_overflow_is_an_error_naming_the_fix(tiled, tmp_path):
    class Huge(torch.nn.Module):
        """Finite features too large for float16 (|x| > 65504) from tile 30 on."""

        def __init__(self, model):
            super().__init__()
            self.model, self.seen = model, 0

        def forward(self, x):
            out = self.model(x)
            rows = torch.arange(self.seen, self.seen + len(x)) >= 30
            out[rows, 2] = 1e5
            self.seen += len(x)
            return out

    big = build_encoder(ENCODER, pretrained=False)
    big.model = Huge(big.model)
    coords = open_store(tiled["pen20"])["coords"][30]
    f16 = ExtractParams(**{**FP32.__dict__, "dtype": "float16"})
    with pytest.raises(FeatureError, match=rf"pen20: .* exceed the float16 range .*tile 30 \(level-0 x={coords[0]}, "
                                           rf"y={coords[1]}\)\. Fix: .*features.dtype: float32"):
        extract_slide(tiled["pen20"], tmp_path / "f16.zarr", big, f16)
    assert not (tmp_path / "f16.zarr").exists()
    big.model.seen = 0
    extract_slide(tiled["pen20"], tmp_path / "f32.zarr", big, FP32)
    assert read(tmp_path / "f32.zarr")[0][30:, 2].min() == 1e5


def test_tile_size_unlike_the_encoder_input_is_warned_and_recorded(slides, tiled, encoder, tmp_path, caplog):
    """224 px tiles at 0.5 um/px into a 160 px encoder: it sees 0.7 um/px; 160 px tiles keep 0.5."""
    with caplog.at_level(logging.WARNING, logger="wsiomics.features"):
        extract_slide(tiled["pen20"], tmp_path / "resized.zarr", encoder, FP32)
    attrs = read(tmp_path / "resized.zarr")[2]
    assert attrs["effective_mpp"] == pytest.approx(0.5 * 224 / 160) and attrs["target_mpp"] == 0.5
    assert "encoder sees 0.700 um/px" in caplog.text and "tiling.patch_size: 160" in caplog.text
    caplog.clear()
    tile_slide(slides["pen20"], "pen20", tmp_path / "t160.zarr", tmp_path / "t160.png", TilingParams(patch_size=160))
    with caplog.at_level(logging.WARNING, logger="wsiomics.features"):
        extract_slide(tmp_path / "t160.zarr", tmp_path / "exact.zarr", encoder, FP32)
    assert read(tmp_path / "exact.zarr")[2]["effective_mpp"] == pytest.approx(0.5)
    assert "encoder sees" not in caplog.text


def test_batchnorm_folding_is_exact_and_optional():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0).eval()
    for m in backbone.modules():  # non-trivial running statistics, as trained weights have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    folded, done = fold_batchnorm(backbone)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), backbone(x), rtol=1e-4, atol=1e-4)
    assert done and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    vit = timm.create_model("test_vit", num_classes=0)
    assert fold_batchnorm(vit) == (vit, False)  # nothing to fold

    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent control flow

    plain = Untraceable().eval()
    assert fold_batchnorm(plain) == (plain, False)


def test_auto_batch_size_and_workers_follow_the_device(monkeypatch):
    assert resolve_workers("auto", torch.device("cpu")) == 0
    for cpus, workers in ((1, 1), (2, 1), (4, 3), (9, 8), (64, 8)):  # one CPU left to the main process, at most 8
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cpus: set(range(n)))
        assert resolve_workers("auto", torch.device("cuda")) == workers, cpus
        assert resolve_workers("auto", torch.device("cpu")) == 0
    assert resolve_workers("3", torch.device("cpu")) == 3
    with pytest.raises(ValueError, match="num_workers must be 'auto' or a whole number >= 0"):
        resolve_workers("many", torch.device("cpu"))
    assert resolve_batch_size("auto", torch.device("cpu")) == 16
    assert resolve_batch_size("auto", torch.device("cuda")) == 128
    with pytest.raises(ValueError, match="batch_size must be 'auto' or a whole number >= 1"):
        resolve_batch_size("0", torch.device("cpu"))


def test_features_schema_and_config_defaults_equal_extract_params():
    """Every ExtractParams field is a `features:` key with the same default (fold_batchnorm: command line only)."""
    import yaml

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]["features"]["properties"]
    config = yaml.safe_load((REPO / "config.yaml").read_text())["features"]
    cli_only = {"fold_batchnorm"}  # an escape hatch for models fx cannot fold; not a workflow setting
    code = {k: v for k, v in asdict(ExtractParams()).items() if k not in cli_only}
    assert set(code) <= set(props), f"not in the schema: {set(code) - set(props)}"
    for key, value in code.items():
        assert str(props[key]["default"]).lower() == str(value).lower(), key  # compile: auto, bool or str
    assert set(config) == set(props)
    assert {k for k in config if k in code and str(config[k]).lower() != str(code[k]).lower()} == set()


def test_precision_auto_follows_the_device_and_cpu(monkeypatch):
    assert resolve_precision("auto", torch.device("cuda"), "fp16") == "fp16"
    monkeypatch.setattr(extract_mod, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu"), "fp16") == "bf16"
    monkeypatch.setattr(extract_mod, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu"), "fp16") == "fp32"
    assert resolve_precision("fp16", torch.device("cpu"), "bf16") == "fp16"


@pytest.mark.parametrize(("capability", "onednn_isa", "fast"), [
    ("AVX512", None, True),
    ("AVX512", "ALL", True),
    ("AVX512", "avx512_core_amx", True),
    ("AVX512", "AVX512_CORE_BF16", True),
    ("AVX2", None, False),  # ATEN_CPU_CAPABILITY=avx2: the benchmark's capped run
    ("AVX512", "AVX2", False),  # ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's convolutions and matmuls would emulate bf16
    ("AVX512", "AVX512_CORE", False),  # AVX-512 without its bf16 instructions
    ("AVX512", "AVX512_CORE_VNNI", False),
])
def test_fast_bf16_honours_capped_isas(monkeypatch, capability, onednn_isa, fast):
    """precision: auto picks bf16 only where both ATen's dispatch and oneDNN may use the bf16 units; the hardware
    probes alone ignore ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, and emulated bf16 is slower than fp32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if onednn_isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)
    assert extract_mod.cpu_has_fast_bf16() is fast
    assert resolve_precision("auto", torch.device("cpu"), "fp16") == ("bf16" if fast else "fp32")


def test_fast_bf16_needs_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert extract_mod.cpu_has_fast_bf16() is False


# ---- weights ----


def saved_model(path: Path, seed: int = 7, wrap=lambda sd: sd) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(ENCODER, num_classes=0).eval()
    state = wrap(model.state_dict())
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return model


@pytest.mark.parametrize("filename,wrap", [
    ("plain.pth", lambda sd: sd),
    ("lightning.ckpt", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}),
    ("weights.safetensors", lambda sd: sd),
])
def test_local_checkpoint_is_loaded_and_its_sha256_recorded(tmp_path, filename, wrap, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / filename
    reference = saved_model(path, wrap=wrap)
    enc = build_encoder(ENCODER, pretrained=True, weights=str(path))
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(enc.model(x), reference(x))
    assert enc.weights.source == "checkpoint"
    assert enc.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert build_encoder(ENCODER, pretrained=True, weights=str(path)).weights.sha256 == enc.weights.sha256  # cached


def test_checkpoint_for_another_architecture_is_refused_with_the_keys(tmp_path):
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(WeightsError, match=r"vit.pth does not fit the architecture: \d+ missing .*unexpected"):
        build_encoder(ENCODER, pretrained=True, weights=str(tmp_path / "vit.pth"))


def test_weights_errors_are_actionable(tmp_path):
    with pytest.raises(WeightsError, match="does not exist; fix features.weights"):
        build_encoder(ENCODER, pretrained=True, weights=str(tmp_path / "missing.pth"))
    torch.save({"model": object()}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match="weights_only=True"):
        build_encoder(ENCODER, pretrained=True, weights=str(tmp_path / "pickled.pth"))
    with pytest.raises(WeightsError, match="pretrained is false"):
        build_encoder(ENCODER, pretrained=False, weights=str(tmp_path / "pickled.pth"))
    with pytest.raises(ValueError, match="unknown encoder 'resnet5O'.*uni2_h"):
        build_encoder("resnet5O", pretrained=False)


def run_offline(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "XDG_CACHE_HOME": str(hf_home / "x")}
    return subprocess.run([sys.executable, "-m", "wsiomics.features", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_offline_hub_weights_fail_fast_with_the_fix(tiled, tmp_path):
    started = time.time()
    proc = run_offline(["extract", "--tiles", str(tiled["pen20"]), "--out", str(tmp_path / "f.zarr"),
                        "--encoder", "uni"], tmp_path / "hf")
    assert proc.returncode == 1 and time.time() - started < 60
    assert "'MahmoodLab/UNI' are not in the local Hugging Face cache" in proc.stderr
    assert "`hf download MahmoodLab/UNI`" in proc.stderr and "`hf auth login`" in proc.stderr
    assert "huggingface-cli" not in proc.stderr and "pretrained: false" in proc.stderr  # gone from huggingface_hub
    assert not (tmp_path / "f.zarr").exists()


def test_gated_hub_weights_name_the_login_command(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    from wsiomics.encoders import weights as weights_mod

    def gated(*args, **kwargs):
        error = GatedRepoError.__new__(GatedRepoError)  # its constructor wants a live HTTP response
        Exception.__init__(error, "401 gated")
        raise error

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    monkeypatch.setattr(weights_mod, "hub_reachable", lambda: True)
    with pytest.raises(WeightsError, match=r"'MahmoodLab/UNI' is gated: .*HF_TOKEN \(or run `hf auth login`\)"):
        weights_mod.hub_file("MahmoodLab/UNI")


def test_offline_hub_weights_load_from_a_populated_cache(tiled, tmp_path):
    """The offline-cluster recipe: a copied Hugging Face cache, HF_HUB_OFFLINE=1, a hub name as weights."""
    snapshot = tmp_path / "hf" / "hub" / "models--lab--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    saved_model(snapshot / "model.safetensors")
    proc = run_offline(["extract", "--tiles", str(tiled["pen20"]), "--out", str(tmp_path / "f.zarr"),
                        "--encoder", ENCODER, "--weights", "hf-hub:lab/tiny", "--precision", "fp32"], tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = read(tmp_path / "f.zarr")[2]["weights"]
    assert weights["source"] == "hub" and weights["name"] == "lab/tiny"
    assert weights["sha256"] == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()


# ---- presets ----


# The presets' architectures (state_dict keys and shapes, output dimension): tests/test_encoders.py.


def test_resnet50_trunc_is_layer3_average_pooled():
    enc = build_encoder("resnet50_trunc", pretrained=False, seed=3)
    torch.manual_seed(3)
    full = timm.create_model("resnet50", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        h = full.layer3(full.layer2(full.layer1(h)))
        torch.testing.assert_close(enc.model(x), h.mean(dim=(2, 3)))


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("bf16", True)])
def test_fp32_extraction_turns_tf32_off_while_encoding(encoder, precision, tf32):
    """cuDNN's default TF32 convolutions (and TF32 matmuls) would make ``precision: fp32`` features differ from
    fp32 on a GPU: they are off while an fp32 encoder runs, and the user's setting is back afterwards. The
    flags are process-wide and only matter on CUDA, so the CPU path shows the switching."""
    seen = []
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        encoding = extract_mod.Encoding(encoder, torch.device("cpu"), precision, True, 8)
        model = encoding.model

        def recording(x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return model(x)

        encoding.model = recording
        encoding(torch.randint(0, 255, (3, 3, 160, 160), dtype=torch.uint8))
        assert seen == [(tf32, tf32)]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_multi_slide_cli_prepares_the_encoder_once(tiled, tmp_path, monkeypatch):
    """One job's slides share one Encoding (BatchNorm folding, the device copy, a compile), and each still gets
    its own features."""
    from wsiomics.features.__main__ import main

    built = []
    real = extract_mod.Encoding

    def counting(*a, **k):
        built.append(1)
        return real(*a, **k)

    monkeypatch.setattr(extract_mod, "Encoding", counting)
    outs = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    assert main(["extract", "--tiles", str(tiled["pen20"]), str(tiled["tiff40"]), "--out", *map(str, outs),
                 "--encoder", ENCODER, "--no-pretrained", "--no-progress", "--num-workers", "0", "--batch-size",
                 "16", "--precision", "fp32", "--dtype", "float32", "--device", "cpu"]) == 0
    assert len(built) == 1
    for name, out in zip(("pen20", "tiff40"), outs, strict=True):
        feats, coords, _ = read(out)
        ref_feats, ref_coords = direct_features(tiled[name], build_encoder(ENCODER, pretrained=False, seed=0), 8)
        np.testing.assert_array_equal(coords[:8], ref_coords)
        np.testing.assert_allclose(feats[:8], ref_feats, rtol=1e-4, atol=1e-4)


def test_multi_slide_cli_keep_going_skips_a_bad_slide(tiled, tmp_path):
    """--keep-going (the workflow's batches): a slide that cannot be encoded gets no store and the job succeeds;
    without it the job fails. The good slide is written either way."""
    import shutil

    from wsiomics.features.__main__ import main

    broken = tmp_path / "broken.zarr"
    shutil.copytree(tiled["pen20"], broken)
    shutil.rmtree(broken / "coords")
    common = ["--encoder", ENCODER, "--no-pretrained", "--no-progress", "--num-workers", "0", "--precision", "fp32",
              "--device", "cpu"]
    for flag, code, name in (([], 1, "strict"), (["--keep-going"], 0, "lenient")):
        outs = [tmp_path / name / "bad.zarr", tmp_path / name / "good.zarr"]
        assert main(["extract", "--tiles", str(broken), str(tiled["tiff40"]), "--out", *map(str, outs), *common,
                     *flag]) == code
        assert not outs[0].exists() and (outs[1] / "zarr.json").is_file()


def test_gpu_waiting_for_tiles_is_warned():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    starved = {"wait_for_tiles_s": 30.0, "encode_s": 20.0, "num_workers": 1}
    advice = extract_mod.tile_wait_warning(starved, cuda)
    assert advice is not None and "30.0 s" in advice and "60%" in advice and "features.threads" in advice
    assert extract_mod.tile_wait_warning(starved, cpu) is None  # on the CPU reading shares the cores by design
    assert extract_mod.tile_wait_warning({"wait_for_tiles_s": 3.0, "encode_s": 60.0}, cuda) is None  # 5%
    assert extract_mod.tile_wait_warning({"wait_for_tiles_s": 1.0, "encode_s": 0.5}, cuda) is None  # too short
    assert extract_mod.tile_wait_warning({}, cuda) is None  # an empty slide
