"""CLAM / TRIDENT h5 feature files: import, export, round trips, and the errors for broken files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsiomics.encoders import build_encoder
from wsiomics.features import ExtractParams, extract_slide
from wsiomics.features.__main__ import main as features_main
from wsiomics.features.interop import H5FormatError, ImportMismatchError, export_h5, import_features, import_h5
from wsiomics.io import open_store
from wsiomics.tiling import tile_slide

CLAM_COORD_ATTRS = {"patch_size": 256, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
                    "downsampled_level_dim": np.array([20000, 15000]), "level_dim": np.array([20000, 15000]),
                    "name": "TCGA-AA-0001-01Z", "save_path": "/data/patches"}
TRIDENT_COORD_ATTRS = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                       "target_magnification": 20, "overlap": 0, "name": "TCGA-AA-0002-01Z",
                       "savetodir": "/data/trident"}


def write_h5(path: Path, features: np.ndarray, coords: np.ndarray, coord_attrs: dict, *, file_attrs=None) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        c = f.create_dataset("coords", data=coords)
        c.attrs.update(coord_attrs)
        f.attrs.update(file_attrs or {})
    return path


def random_slide(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(n) * 256, [0]), -1).reshape(-1, 2)[:n].astype(np.int64)
    coords[:, 1] = rng.integers(0, 10, n) * 256
    return rng.standard_normal((n, dim)).astype(np.float32), coords


def read_store(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    root = open_store(path)
    return root["features"][...], root["coords"][...], dict(root.attrs)


@pytest.mark.parametrize("layout", ["clam", "trident", "clam_3d"])
def test_import_keeps_rows_in_order_and_carries_the_h5_attrs(tmp_path, layout):
    feats, coords = random_slide(300, 64)
    attrs = TRIDENT_COORD_ATTRS if layout == "trident" else CLAM_COORD_ATTRS
    data = feats[None] if layout == "clam_3d" else feats
    h5 = write_h5(tmp_path / "slide.h5", data, coords, attrs, file_attrs={"encoder": "uni_v1"})
    result = import_h5(h5, tmp_path / "slide.zarr", "uni", dtype="float32", chunk_rows=128)
    got, got_coords, store_attrs = read_store(tmp_path / "slide.zarr")
    assert result.n_tiles == 300 and result.feature_dim == 64 and not result.skipped
    np.testing.assert_array_equal(got, feats)
    np.testing.assert_array_equal(got_coords, coords)
    assert open_store(tmp_path / "slide.zarr")["features"].chunks == (128, 64)
    assert store_attrs["encoder"] == "uni" and store_attrs["weights"]["source"] == "imported"
    assert store_attrs["status"] == "ok" and store_attrs["n_tiles"] == 300 and store_attrs["feature_dim"] == 64
    assert store_attrs["h5_attrs"]["coords"]["name"] == attrs["name"]
    assert store_attrs["h5_attrs"]["file"]["encoder"] == "uni_v1"
    expected_level0 = 512.0 if layout == "trident" else 256.0
    assert store_attrs["patch_size_level0"] == expected_level0
    if layout == "trident":
        assert store_attrs["mpp"] == pytest.approx(0.25) and store_attrs["target_mpp"] == pytest.approx(0.5)


def test_import_then_export_gives_back_the_same_h5(tmp_path):
    feats, coords = random_slide(1000, 32, seed=1)
    h5 = write_h5(tmp_path / "a.h5", feats, coords, TRIDENT_COORD_ATTRS)
    import_h5(h5, tmp_path / "a.zarr", "uni", dtype="float32", chunk_rows=100)
    assert export_h5(tmp_path / "a.zarr", tmp_path / "back.h5", "trident", block_rows=333) == 1000
    with h5py.File(tmp_path / "back.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][...], feats)
        np.testing.assert_array_equal(f["coords"][...], coords)
        assert f["features"].dtype == np.float32
        back_attrs = dict(f["coords"].attrs)
        ours = json.loads(f.attrs["wsiomics"])
    assert {k: (v.item() if hasattr(v, "item") else v) for k, v in back_attrs.items()} == TRIDENT_COORD_ATTRS
    assert ours["encoder"] == "uni" and ours["n_tiles"] == 1000


def test_float16_import_is_close_and_float16_overflow_is_refused(tmp_path):
    feats, coords = random_slide(50, 16, seed=2)
    import_h5(write_h5(tmp_path / "a.h5", feats, coords, CLAM_COORD_ATTRS), tmp_path / "a.zarr", "r50")
    got = read_store(tmp_path / "a.zarr")[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), feats, rtol=1e-3, atol=1e-3)
    feats[3, 3] = 1e6
    with pytest.raises(H5FormatError, match="float16 range.*--dtype float32"):
        import_h5(write_h5(tmp_path / "b.h5", feats, coords, CLAM_COORD_ATTRS), tmp_path / "b.zarr", "r50")
    assert not (tmp_path / "b.zarr").exists()


def test_reimporting_an_unchanged_file_is_skipped_and_a_changed_one_redone(tmp_path):
    feats, coords = random_slide(20, 8, seed=3)
    h5 = write_h5(tmp_path / "a.h5", feats, coords, CLAM_COORD_ATTRS)
    assert not import_h5(h5, tmp_path / "a.zarr", "r50").skipped
    assert import_h5(h5, tmp_path / "a.zarr", "r50").skipped
    write_h5(h5, feats + 1, coords, CLAM_COORD_ATTRS)
    assert not import_h5(h5, tmp_path / "a.zarr", "r50").skipped
    np.testing.assert_allclose(read_store(tmp_path / "a.zarr")[0], feats + 1, atol=1e-2)


@pytest.mark.parametrize(("breakage", "message"), [
    ("no_features", "no 'features' dataset .* not patches/"),
    ("no_coords", "no 'coords' dataset.*h5_files/"),
    ("short_coords", "20 feature rows but 19 coords"),
    ("nan_row", "NaN/inf .* first row 7 \\(level-0 x=1792"),
    ("slide_embedding", "shape \\(20,\\)"),
    ("not_h5", "not a readable HDF5 file"),
])
def test_broken_h5_files_are_refused_with_the_file_and_the_fix(tmp_path, breakage, message):
    feats, coords = random_slide(20, 8, seed=4)
    coords[:, 1] = 0
    h5 = tmp_path / "bad.h5"
    if breakage == "not_h5":
        h5.write_bytes(b"this is a csv, not hdf5\n")
    else:
        with h5py.File(h5, "w") as f:
            if breakage != "no_features":
                data = feats[:, 0] if breakage == "slide_embedding" else feats.copy()
                if breakage == "nan_row":
                    data[7, 2] = np.nan
                f.create_dataset("features", data=data)
            if breakage != "no_coords":
                f.create_dataset("coords", data=coords[:19] if breakage == "short_coords" else coords)
    with pytest.raises(H5FormatError, match=message) as caught:
        import_h5(h5, tmp_path / "bad.zarr", "r50")
    assert str(h5) in str(caught.value)
    assert not (tmp_path / "bad.zarr").exists() and not list(tmp_path.glob(".tmp-*"))


def tiff40_slide(slide_dir: Path, slide_factory) -> Path:
    """A generic TIFF at 40x with 2x pyramid steps, so 20x tiles are read from level 1 (shared with test_tiling)."""
    path = slide_dir / "tiff40.tiff"
    if not path.exists():
        slide_factory(slide_dir, "tiff40", seed=11, mpp=0.25, fmt="tiff", size_um=(1400.0, 1050.0))
    return path


def h5_coord_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f["coords"].attrs.items()}


# pen20: 20x read at level 0; same40: 40x Aperio (4x steps) read at level 0; tiff40: 40x with 2x steps, level 1
@pytest.mark.parametrize(("name", "level", "level0"), [("pen20", 0, 224), ("same40", 0, 448), ("tiff40", 1, 448)])
def test_our_store_exports_each_flavor_with_its_geometry_and_imports_back(slides, slide_dir, slide_factory, tmp_path,
                                                                         name, level, level0):
    slide = tiff40_slide(slide_dir, slide_factory) if name == "tiff40" else slides[name]
    tile_slide(slide, name, tmp_path / "t.zarr", tmp_path / "t.png")
    tiles = dict(open_store(tmp_path / "t.zarr").attrs)
    assert (tiles["read_level"], tiles["patch_size"]) == (level, 224)
    assert tiles["patch_size_level0"] == pytest.approx(level0)
    encoder = build_encoder("test_resnet", pretrained=False, seed=0)
    params = ExtractParams(batch_size=32, num_workers=0, precision="fp32", dtype="float32")
    extract_slide(tmp_path / "t.zarr", tmp_path / "f.zarr", encoder, params, progress=False)
    feats, coords, attrs = read_store(tmp_path / "f.zarr")

    export_h5(tmp_path / "f.zarr", tmp_path / "clam.h5", "clam")
    with h5py.File(tmp_path / "clam.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][...], feats)
        np.testing.assert_array_equal(f["coords"][...], coords)
    clam = h5_coord_attrs(tmp_path / "clam.h5")
    # CLAM reads patch_size pixels at patch_level: that must cover our tile's level-0 square
    assert clam["patch_level"] == level and clam["patch_size"] == tiles["read_size"]
    for downsample in clam["downsample"]:
        assert clam["patch_size"] * downsample == pytest.approx(tiles["patch_size_level0"])
    assert clam["level_dim"] == tiles["level_dimensions"][level] and clam["name"] == name
    assert "patch_size_level0" not in clam and "target_magnification" not in clam

    export_h5(tmp_path / "f.zarr", tmp_path / "trident.h5", "trident")
    trident = h5_coord_attrs(tmp_path / "trident.h5")
    assert trident["patch_size"] == 224 and trident["patch_size_level0"] == level0  # 224 px at the target
    assert trident["target_magnification"] == pytest.approx(10 / tiles["target_mpp"])
    assert trident["level0_magnification"] == pytest.approx(10 / tiles["mpp"]) and "patch_level" not in trident

    for flavor in ("clam", "trident"):  # auto-detected on import
        import_h5(tmp_path / f"{flavor}.h5", tmp_path / f"{flavor}.zarr", "test_resnet", dtype="float32")
        again, again_coords, again_attrs = read_store(tmp_path / f"{flavor}.zarr")
        np.testing.assert_array_equal(again, feats)
        np.testing.assert_array_equal(again_coords, coords)
        assert again_attrs["h5_flavor"] == flavor
        assert again_attrs["patch_size_level0"] == pytest.approx(level0)
    clam_back = read_store(tmp_path / "clam.zarr")[2]
    assert (clam_back["read_level"], clam_back["read_size"]) == (level, tiles["read_size"])
    trident_back = read_store(tmp_path / "trident.zarr")[2]
    assert trident_back["target_mpp"] == pytest.approx(tiles["target_mpp"]) and trident_back["tile_patch_size"] == 224


def test_flavor_decides_what_patch_size_means_on_import_and_across_flavors(tmp_path):
    """A CLAM file of a 40x slide read at level 0 (512 px = 256 at 20x) and a TRIDENT file of the same tiles."""
    feats, coords = random_slide(30, 8, seed=5)
    clam = {**CLAM_COORD_ATTRS, "patch_size": 512}
    write_h5(tmp_path / "c.h5", feats, coords, clam)
    write_h5(tmp_path / "t.h5", feats, coords, TRIDENT_COORD_ATTRS)
    import_h5(tmp_path / "c.h5", tmp_path / "c.zarr", "uni", dtype="float32")
    import_h5(tmp_path / "t.h5", tmp_path / "t.zarr", "uni", dtype="float32")
    c, t = read_store(tmp_path / "c.zarr")[2], read_store(tmp_path / "t.zarr")[2]
    assert c["patch_size_level0"] == t["patch_size_level0"] == 512
    assert (c["read_level"], c["read_size"]) == (0, 512) and t["tile_patch_size"] == 256
    # a TRIDENT file read as CLAM is taken at its word: 256 px at level 0
    import_h5(tmp_path / "t.h5", tmp_path / "t_as_clam.zarr", "uni", dtype="float32", flavor="clam")
    assert read_store(tmp_path / "t_as_clam.zarr")[2]["patch_size_level0"] == 256
    # the other flavor is derived from the geometry: TRIDENT's store as CLAM reads 512 px at level 0
    export_h5(tmp_path / "t.zarr", tmp_path / "t_clam.h5", "clam")
    as_clam = h5_coord_attrs(tmp_path / "t_clam.h5")
    assert (as_clam["patch_size"], as_clam["patch_level"], as_clam["downsample"]) == (512, 0, [1.0, 1.0])
    export_h5(tmp_path / "c.zarr", tmp_path / "c_trident.h5", "trident")
    assert h5_coord_attrs(tmp_path / "c_trident.h5")["patch_size_level0"] == 512
    with pytest.raises(ValueError, match="flavor must be clam or trident"):
        export_h5(tmp_path / "c.zarr", tmp_path / "x.h5", "auto")


def test_cli_imports_a_folder_and_exports_it_back(tmp_path, capsys):
    folder = tmp_path / "h5_files"
    folder.mkdir()
    for i in range(3):
        write_h5(folder / f"slide{i}.h5", *random_slide(10 + i, 8, seed=i), CLAM_COORD_ATTRS)
    (folder / "broken.h5").write_bytes(b"nope")
    run = [sys.executable, "-m", "wsiomics.features"]
    proc = subprocess.run([*run, "import-h5", "--h5", *map(str, sorted(folder.glob("*.h5"))), "--out-dir",
                           str(tmp_path / "features" / "r50"), "--encoder", "r50"], capture_output=True, text=True)
    assert proc.returncode == 1 and "broken.h5" in proc.stderr  # one bad file does not stop the others
    stores = sorted((tmp_path / "features" / "r50").glob("*.zarr"))
    assert [s.name for s in stores] == ["slide0.zarr", "slide1.zarr", "slide2.zarr"]
    with pytest.raises(SystemExit) as exited:  # no default flavor: the tools disagree on what patch_size is
        features_main(["export-h5", "--store", *map(str, stores), "--out-dir", str(tmp_path / "back")])
    assert exited.value.code == 2 and "--flavor" in capsys.readouterr().err
    proc = subprocess.run([*run, "export-h5", "--store", *map(str, stores), "--out-dir", str(tmp_path / "back"),
                           "--flavor", "clam"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "back" / "slide2.h5", "r") as f:
        assert f["features"].shape == (12, 8)
        assert f["coords"].attrs["patch_size"] == CLAM_COORD_ATTRS["patch_size"]


def test_a_missing_h5py_is_an_import_error_not_an_invalid_choice(monkeypatch):
    """h5py is a dependency: without it the command must say so, not that import-h5 is an 'invalid choice'."""
    import importlib

    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now raises ImportError
    for name in ("wsiomics.features.interop", "wsiomics.features.__main__"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match="h5py"):
        cli = importlib.import_module("wsiomics.features.__main__")
        cli.main(["import-h5", "--h5", "x.h5", "--out-dir", "out", "--encoder", "r50"])


# --- the workflow's per-slide import (the sample sheet's features_path) --------------------------------------


def test_import_features_takes_trident_clam_and_our_stores_and_records_the_source(tmp_path):
    feats, coords = random_slide(40, 16, seed=6)
    trident_dir = tmp_path / "features_uni_v1"  # TRIDENT's output folder names the encoder
    trident_dir.mkdir()
    trident = write_h5(trident_dir / "a.h5", feats, coords, TRIDENT_COORD_ATTRS)
    clam = write_h5(tmp_path / "b.h5", feats, coords, CLAM_COORD_ATTRS)
    import_features(trident, tmp_path / "A.zarr", "myenc", slide_id="A", patient_id="PA", expected_dim=16)
    import_features(clam, tmp_path / "B.zarr", "myenc", slide_id="B", patient_id="PB", dtype="float32")
    import_features(tmp_path / "B.zarr", tmp_path / "C.zarr", "myenc", slide_id="C", dtype="float32")
    a, b, c = (read_store(tmp_path / f"{s}.zarr") for s in "ABC")
    assert a[2]["slide_id"] == "A" and a[2]["patient_id"] == "PA" and a[2]["encoder"] == "myenc"
    assert a[2]["source_h5"] == str(trident) and a[2]["source_encoder"] == "uni_v1" and a[2]["h5_flavor"] == "trident"
    assert b[2]["source_encoder"] == "" and b[2]["h5_flavor"] == "clam"  # CLAM files do not name their encoder
    assert c[2]["source_store"] == str(tmp_path / "B.zarr") and c[2]["slide_id"] == "C"
    assert c[2]["source_encoder"] == "myenc" and c[2]["h5_flavor"] == "clam"  # the store's attrs travel with it
    np.testing.assert_array_equal(c[0], feats)
    np.testing.assert_array_equal(c[1], coords)
    assert import_features(tmp_path / "B.zarr", tmp_path / "C.zarr", "myenc", slide_id="C", dtype="float32").skipped


def test_import_features_refuses_another_width_or_another_encoders_store(tmp_path):
    feats, coords = random_slide(10, 16, seed=7)
    h5 = write_h5(tmp_path / "a.h5", feats, coords, TRIDENT_COORD_ATTRS, file_attrs={"encoder": "conch_v15"})
    with pytest.raises(ImportMismatchError, match=r"a.h5: 16-wide features \(made by conch_v15\), but features.encoder "
                                                  r"uni gives 1024-wide ones. Fix: set features.encoder"):
        import_features(h5, tmp_path / "a.zarr", "uni", slide_id="a", expected_dim=1024)
    assert not (tmp_path / "a.zarr").exists()
    import_h5(h5, tmp_path / "s.zarr", "conch_v15")
    with pytest.raises(ImportMismatchError, match="s.zarr: a feature store of encoder conch_v15, but features.encoder "
                                                  "is uni. Fix: set features.encoder: conch_v15"):
        import_features(tmp_path / "s.zarr", tmp_path / "b.zarr", "uni", slide_id="b")


def test_import_cli_checks_the_width_of_a_known_encoder(tmp_path):
    h5 = write_h5(tmp_path / "a.h5", *random_slide(10, 32, seed=8), CLAM_COORD_ATTRS)
    run = [sys.executable, "-m", "wsiomics.features", "import", "--source", str(h5), "--slide-id", "a"]
    proc = subprocess.run([*run, "--out", str(tmp_path / "a.zarr"), "--encoder", "test_resnet"], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "32-wide features, but features.encoder test_resnet gives 96-wide" in proc.stderr
    proc = subprocess.run([*run, "--out", str(tmp_path / "b.zarr"), "--encoder", "conch_v15"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr  # a name neither a preset nor timm knows: any width
    assert read_store(tmp_path / "b.zarr")[0].shape == (10, 32)
