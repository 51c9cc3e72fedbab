"""Tissue detection and tiling, scored against the generator's known truth."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiomics.io import TMP_PREFIX, open_store
from wsiomics.slide import SlideError, open_slide, read_downsampled, read_rgb, resolve_mpp
from wsiomics.synth.render import rasterize
from wsiomics.synth.truth import load_truth, score_tiling
from wsiomics.tiling import MaskParams, TilingError, TilingParams, tile_slide
from wsiomics.tiling.__main__ import main as tiling_main
from wsiomics.tiling.grid import box_fractions


def tile(slide: Path, out_dir: Path, **kwargs):
    name = slide.stem
    result = tile_slide(slide, name, out_dir / f"{name}.zarr", out_dir / f"{name}.png", **kwargs)
    return result, open_store(out_dir / f"{name}.zarr")


# --- resolution ---------------------------------------------------------------------------------

def test_mpp_order_override_first():
    props = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}
    assert resolve_mpp(props, 0.5, "s").source == "sample_sheet"
    assert resolve_mpp(props, 0.5, "s").x == 0.5


def test_mpp_order_openslide_then_tiff_then_vendor():
    tiff = {"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000", "tiff.YResolution": "40000"}
    vendor = {"aperio.MPP": "0.2527"}
    both = {"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5", **tiff, **vendor}
    assert resolve_mpp(both, None, "s").source == "openslide.mpp-x"
    m = resolve_mpp({**tiff, **vendor}, None, "s")
    assert (m.source, m.x) == ("tiff.XResolution", pytest.approx(0.25))
    inch = resolve_mpp({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600", "tiff.YResolution": "101600"},
                       None, "s")
    assert inch.x == pytest.approx(0.25)
    assert resolve_mpp(vendor, None, "s").source == "aperio.MPP"


def test_mpp_implausible_tags_skipped_and_missing_mpp_is_actionable():
    dpi72 = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72", "tiff.YResolution": "72"}
    assert resolve_mpp({**dpi72, "aperio.MPP": "0.5"}, None, "s").source == "aperio.MPP"
    with pytest.raises(SlideError) as e:
        resolve_mpp(dpi72, None, "slide X (/data/x.tiff)")
    assert e.value.status == "no_mpp"
    assert "slide X (/data/x.tiff)" in str(e.value) and "'mpp' column" in str(e.value)
    assert "tiff.XResolution=352.7" in str(e.value)


def test_slide_without_mpp_is_recorded_or_overridden(slide_dir, slide_factory, tmp_path):
    slide = slide_factory(slide_dir, "nompp", seed=21, fmt="tiff", mpp_metadata=False)
    result, store = tile(slide, tmp_path)
    assert result.status == "no_mpp" and store["coords"].shape == (0, 2)
    assert "'mpp' column" in store.attrs["reason"]
    result, store = tile(slide, tmp_path, mpp_override=0.5)
    assert result.status == "ok" and store.attrs["mpp_source"] == "sample_sheet" and result.n_tiles > 20


# --- geometry -----------------------------------------------------------------------------------

def test_40x_and_20x_scans_give_the_same_physical_grid(slides, tmp_path):
    r20, s20 = tile(slides["pen20"], tmp_path)
    r40, s40 = tile(slides["same40"], tmp_path)
    assert s20.attrs["patch_size_level0"] == pytest.approx(224)
    assert s40.attrs["patch_size_level0"] == pytest.approx(448)
    assert s40.attrs["read_size"] == 448 and s40.attrs["read_level"] == 0  # levels are 1x and 4x
    um20 = {tuple(c) for c in (s20["coords"][:] * 0.5).round().astype(int)}
    um40 = {tuple(c) for c in (s40["coords"][:] * 0.25).round().astype(int)}
    assert len(um20 & um40) / len(um20 | um40) >= 0.95


def tiff40_slide(slide_dir: Path, slide_factory) -> Path:
    """A generic TIFF at 40x with 2x pyramid steps, so 20x tiles are read from level 1 (shared with the
    feature tests, which find it already written)."""
    path = slide_dir / "tiff40.tiff"
    if not path.exists():
        slide_factory(slide_dir, "tiff40", seed=11, mpp=0.25, fmt="tiff", size_um=(1400.0, 1050.0))
    return path


def test_40x_tiff_with_2x_steps_is_read_from_level_1_like_a_resized_level_0_read(slide_dir, slide_factory,
                                                                                  tmp_path):
    """The read level is the coarsest at or below the target downsample; its pixels match level 0 resized.

    Levels are rendered independently (nuclei fall differently), so tiles are compared as 4 x 4 block means
    over all tiles; reading the wrong area (level 1 at the level-0 size, or half the side at level 0) is far off.
    """
    slide_path = tiff40_slide(slide_dir, slide_factory)
    _, store = tile(slide_path, tmp_path)
    a = store.attrs
    assert a["level_downsamples"][:3] == [1.0, 2.0, 4.0]
    assert (a["read_level"], a["read_downsample"], a["read_size"]) == (1, 2.0, 224)
    assert a["patch_size_level0"] == pytest.approx(448)
    slide = open_slide(slide_path)

    def blocks(x: int, y: int, level: int, size: int) -> np.ndarray:
        img = Image.fromarray(read_rgb(slide, (int(x), int(y)), level, (size, size)))
        img = np.asarray(img.resize((224, 224), Image.Resampling.BOX), dtype=np.float64)
        return img.reshape(4, 56, 4, 56, 3).mean(axis=(1, 3))

    coords = store["coords"][:]
    assert len(coords) >= 5
    level0 = np.array([blocks(x, y, 0, 448) for x, y in coords])
    reads = {"level1": (1, 224), "level1_wrong_size": (1, 448), "level0_half_side": (0, 224)}
    mad, corr = {}, {}
    for name, (level, size) in reads.items():
        got = np.array([blocks(x, y, level, size) for x, y in coords])
        mad[name] = np.abs(got - level0).mean()
        corr[name] = np.corrcoef(got.ravel(), level0.ravel())[0, 1]
    assert mad["level1"] < 12 and corr["level1"] > 0.9, (mad, corr)
    for wrong in ("level1_wrong_size", "level0_half_side"):
        assert mad[wrong] > 1.5 * mad["level1"] and corr[wrong] < 0.85, (mad, corr)


def test_coords_are_raster_order_and_patch_reads_back(slides, tmp_path):
    _, store = tile(slides["pen20b"], tmp_path)
    coords = store["coords"][:]
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    assert (order == np.arange(len(coords))).all()
    a = store.attrs
    slide = open_slide(slides["pen20b"])
    patch = read_rgb(slide, tuple(int(v) for v in coords[len(coords) // 2]), a["read_level"],
                     (a["read_size"], a["read_size"]))
    assert patch.shape == (a["patch_size"], a["patch_size"], 3)
    assert np.asarray(Image.fromarray(patch).convert("HSV"))[..., 1].mean() > 40  # stained, not glass


def test_box_fractions_are_exact_for_fractional_boxes():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    f = box_fractions(mask, np.array([[4.5, 0, 5.5, 2], [0, 0, 2.5, 3], [4.75, 1.2, 6.75, 3.3]]))
    assert f == pytest.approx([0.5, 1.0, 0.125])


# --- quality against truth ----------------------------------------------------------------------

def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("name", ["pen20", "pen20b", "pen20c", "same40"])
def test_tissue_mask_matches_truth(slides, tmp_path, name):
    _, store = tile(slides[name], tmp_path)
    truth = load_truth(slides[name].with_suffix(".geojson"))
    mask = store["tissue_mask"][:].astype(bool)
    ds_x, ds_y = store.attrs["mask_downsample"]
    clean = truth.tissue.difference(truth.pen)
    expected = rasterize(clean, 0, 0, mask.shape[1], mask.shape[0], (ds_x + ds_y) / 2)
    assert _iou(mask, expected) >= 0.9


@pytest.mark.parametrize("name", ["pen20", "pen20b", "pen20c", "same40"])
def test_tiles_meet_quality_bar(slides, tmp_path, name):
    _, store = tile(slides[name], tmp_path)
    truth = load_truth(slides[name].with_suffix(".geojson"))
    score = score_tiling(truth, store["coords"][:], store.attrs["patch_size_level0"])
    assert score.n_tiles > 50
    assert score.mostly_background <= 0.01
    assert score.full_cell_recall >= 0.99
    assert score.max_pen_fraction <= 0.10


def test_small_fragments_kept_at_any_mask_resolution(slides, tmp_path):
    """A 250 um fragment is a handful of pixels at 16 um/px; the area threshold is physical, so it stays."""
    truth = load_truth(slides["pen20"].with_suffix(".geojson"))
    fragments = [p for p in getattr(truth.tissue, "geoms", [truth.tissue]) if p.area * 0.25 < 0.1e6]
    assert fragments, "the generator places small fragments"
    for mask_mpp in (4.0, 16.0):
        _, store = tile(slides["pen20"], tmp_path, params=TilingParams(mask_mpp=mask_mpp))
        mask = store["tissue_mask"][:].astype(bool)
        ds = store.attrs["mask_downsample"][0]
        for frag in fragments:
            c = frag.representative_point()
            assert mask[int(c.y / ds), int(c.x / ds)], f"fragment at {c} dropped at mask_mpp={mask_mpp}"


def test_thresholds_apply(slides, tmp_path):
    (tmp_path / "loose").mkdir()
    _, loose = tile(slides["pen20"], tmp_path / "loose", params=TilingParams(min_tissue_fraction=0.1))
    _, tight = tile(slides["pen20"], tmp_path, params=TilingParams(min_tissue_fraction=0.9))
    assert loose["coords"].shape[0] > tight["coords"].shape[0]
    assert tight["tissue_fraction"][:].min() >= 0.9
    assert tight["artifact_fraction"][:].max() <= 0.05


# --- faults -------------------------------------------------------------------------------------

def test_blank_slide_gives_zero_tiles_recorded(slides, tmp_path):
    result, store = tile(slides["blank"], tmp_path)
    assert result.status == "no_tissue" and result.n_tiles == 0
    assert store["coords"].shape == (0, 2) and store.attrs["n_tiles"] == 0
    assert (tmp_path / "blank.png").stat().st_size > 1000


@pytest.mark.parametrize("keep", [0.02, 0.6])
def test_truncated_slide_recorded_not_raised(slides, tmp_path, keep):
    data = slides["pen20"].read_bytes()
    bad = tmp_path / "cut.svs"
    bad.write_bytes(data[: int(len(data) * keep)])
    result, store = tile(bad, tmp_path)
    assert result.status == "unreadable" and store.attrs["status"] == "unreadable"
    assert str(bad) in store.attrs["reason"]
    with pytest.raises(TilingError, match="strict"):
        tile(bad, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict" / "cut.zarr").exists()


def test_garbage_file_is_unreadable(tmp_path):
    bad = tmp_path / "junk.svs"
    bad.write_bytes(b"not a slide" * 100)
    result, _ = tile(bad, tmp_path)
    assert result.status == "unreadable" and "Fix:" in result.reason


def test_fixed_slide_is_processed_on_rerun(slides, tmp_path):
    target = tmp_path / "fixme.svs"
    target.write_bytes(slides["pen20"].read_bytes()[:5000])
    assert tile(target, tmp_path)[0].status == "unreadable"
    shutil.copy(slides["pen20"], target)
    result, store = tile(target, tmp_path)
    assert result.status == "ok" and store["coords"].shape[0] > 50


def test_too_coarse_scan_is_refused_unless_allowed(slides, tmp_path):
    result, _ = tile(slides["pen20"], tmp_path, params=TilingParams(target_mpp=0.25))
    assert result.status == "resolution_too_low" and "allow_upsampling" in result.reason
    result, store = tile(slides["pen20"], tmp_path, params=TilingParams(target_mpp=0.25, allow_upsampling=True))
    assert result.status == "ok" and store.attrs["upsampled"] is True


def test_read_downsampled_blocks_match_single_read(slides):
    slide = open_slide(slides["pen20b"])
    whole, *_ = read_downsampled(slide, 8.0, block=100000)
    blocks, *_ = read_downsampled(slide, 8.0, block=700)
    assert whole.shape == blocks.shape
    assert np.abs(whole.astype(int) - blocks.astype(int)).mean() < 2.0


# --- atomic output ------------------------------------------------------------------------------

def test_failed_write_leaves_no_store(slides, tmp_path, monkeypatch):
    import wsiomics.tiling.core as core

    calls = {"n": 0}
    real = core.write_array

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "write_array", failing)
    with pytest.raises(OSError, match="disk full"):
        tile(slides["pen20"], tmp_path)
    assert not (tmp_path / "pen20.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_killed_job_leaves_nothing_that_looks_finished(slides, tmp_path):
    script = f"""
import os, signal
import wsiomics.tiling.core as core
real = core.write_array
def dying(*a, **k):
    out = real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
core.write_array = dying
core.tile_slide({str(slides['pen20'])!r}, 'x', {str(tmp_path / 'x.zarr')!r}, {str(tmp_path / 'x.png')!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "x.zarr").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert leftovers, "the partial store stays under its hidden temporary name"
    with pytest.raises(RuntimeError, match="incomplete"):
        open_store(leftovers[0])


# --- command line -------------------------------------------------------------------------------

def test_cli_tile_and_status(slides, tmp_path):
    for name in ("pen20", "blank"):
        rc = tiling_main(["tile", "--slide", str(slides[name]), "--slide-id", name, "--patient-id", "P1",
                          "--out", str(tmp_path / f"{name}.zarr"), "--qc-png", str(tmp_path / f"{name}.png"),
                          "--min-tissue-fraction", "0.6", "--mask-min-tissue-area-um2", "8000"])
        assert rc == 0
    assert open_store(tmp_path / "pen20.zarr").attrs["params"]["min_tissue_fraction"] == 0.6
    assert open_store(tmp_path / "pen20.zarr").attrs["params"]["mask"]["min_tissue_area_um2"] == 8000
    import pandas as pd

    from wsiomics.status import main as status_main

    pd.DataFrame({"slide_id": ["pen20", "blank"], "patient_id": ["P1", "P1"]}).to_csv(
        tmp_path / "slides.tsv", sep="\t", index=False)
    assert status_main(["--slides", str(tmp_path / "slides.tsv"), "--tiles-dir", str(tmp_path),
                        "--out", str(tmp_path / "s.tsv")]) == 0  # tiling only: no --features-dir
    table = pd.read_csv(tmp_path / "s.tsv", sep="\t")
    assert list(table.status) == ["ok", "no_tissue"] and list(table.patient_id) == ["P1", "P1"]
    rc = tiling_main(["tile", "--slide", str(slides["blank"]), "--slide-id", "b", "--strict",
                      "--out", str(tmp_path / "b.zarr"), "--qc-png", str(tmp_path / "b.png")])
    assert rc == 1 and not (tmp_path / "b.zarr").exists()


def test_mask_params_are_physical():
    """The same physical speck is kept or dropped the same way at two mask resolutions."""
    params = MaskParams(min_tissue_area_um2=5000)
    from wsiomics.tiling.mask import detect_tissue

    for um_per_px in (2.0, 8.0):
        img = np.full((200, 200, 3), 238, np.uint8)
        r_big, r_small = int(60 / um_per_px), max(1, int(25 / um_per_px))  # 11,300 um^2 and 1,960 um^2
        import cv2

        cv2.circle(img, (60, 60), r_big, (220, 140, 190), -1)
        cv2.circle(img, (150, 150), r_small, (220, 140, 190), -1)
        mask = detect_tissue(img, um_per_px, params).tissue
        assert mask[60, 60] and not mask[150, 150], um_per_px


def test_damaged_level0_data_is_caught_by_read_back(slide_factory, slide_dir, tmp_path):
    """Pyramid and metadata intact, level-0 tile data zeroed: the mask still works, the read-back does not."""
    import tifffile

    slide = slide_factory(slide_dir, "damaged", seed=31, fmt="tiff")
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    data = bytearray(slide.read_bytes())
    for off, n in zip(offsets, counts, strict=True):
        data[off:off + n] = b"\0" * n
    bad = tmp_path / "damaged.tiff"
    bad.write_bytes(bytes(data))
    result, _ = tile(bad, tmp_path, params=TilingParams(verify_reads=0))
    assert result.status == "ok"  # without the check the damage goes unnoticed
    result, store = tile(bad, tmp_path)
    assert result.status == "unreadable" and "cannot be read from level 0" in result.reason
    assert store["coords"].shape == (0, 2)


def test_internal_bug_is_reported_as_error_not_blamed_on_the_slide(slides, tmp_path, monkeypatch):
    import wsiomics.tiling.core as core

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(core, "detect_tissue", broken)
    result, store = tile(slides["pen20"], tmp_path)
    assert result.status == "error" and "unexpected ValueError: boom" in store.attrs["reason"]
