"""``wsiomics inspect``: store kinds, completeness, exit codes, and summaries that match numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from wsiomics import inspect as wi
from wsiomics.__main__ import main
from wsiomics.expression import write_anndata
from wsiomics.io import TMP_PREFIX, atomic_zarr, provenance, write_array
from wsiomics.tiling import tile_slide

NAN_ROWS, ZERO_ROWS = [5, 150, 299], [10, 11]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def features(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A feature store like the features stage writes: 300 x 16 in chunks of 64 rows (the last one partial)."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 16)).astype(np.float32)
    feats[NAN_ROWS, 3] = np.nan
    feats[ZERO_ROWS] = 0
    coords = rng.integers(100, 50_000, size=(300, 2))
    path = tmp_path / "S1.zarr"
    with atomic_zarr(path, {"encoder": "toy", "feature_dim": 16, "n_tiles": 300, "status": "ok", "reason": ""}) as root:
        write_array(root, "features", feats, chunk_rows=64)
        write_array(root, "coords", coords, chunk_rows=300)
    return path, feats, coords


def test_feature_store_text(features, capsys):
    code, out, _ = run(capsys, features[0])
    assert code == 0
    assert "feature store" in out and "complete" in out and "INCOMPLETE" not in out
    assert "(300, 16) float32  chunks (64, 16)" in out and "(300, 2) int64" in out
    assert "status: ok" in out and "encoder: \"toy\"" in out and "provenance: version" in out
    assert "nonfinite_rows: 3" in out


def test_feature_store_json_numbers_match_numpy(features, capsys):
    path, feats, coords = features
    code, out, _ = run(capsys, "--json", path)
    assert code == 0
    [report] = json.loads(out)
    s = report["summary"]
    assert report["kind"] == "features" and report["ok"] and report["complete"]
    assert (s["rows"], s["dim"], s["dtype"]) == (300, 16, "float32")
    assert s["nan"] == len(NAN_ROWS) and s["inf"] == 0 and s["nonfinite_rows"] == len(NAN_ROWS)
    assert s["zero_rows"] == len(ZERO_ROWS)
    good = np.isfinite(feats).all(axis=1)
    norms = np.linalg.norm(feats[good].astype(np.float64), axis=1)
    assert s["row_norm"] == pytest.approx({"min": norms.min(), "mean": norms.mean(), "max": norms.max()})
    assert s["coords_bbox"] == {"x": [coords[:, 0].min(), coords[:, 0].max()],
                                "y": [coords[:, 1].min(), coords[:, 1].max()]}
    node = report["nodes"]["features"]
    assert node["chunks"] == [64, 16] and node["shards"] is None and node["stored_bytes"] > 0
    assert node["summary"]["mean"] == pytest.approx(np.nanmean(feats.astype(np.float64)))
    assert report["attrs"]["encoder"] == "toy" and report["provenance"]["host"]
    assert report["warnings"] == []


@pytest.mark.parametrize("block_bytes", [1, 3 * 96 * 7 * 8, 10**9])
@pytest.mark.parametrize("dtype", ["float16", "float64", "int32"])
def test_chunked_stats_match_numpy_over_whole_array(tmp_path, monkeypatch, block_bytes, dtype):
    monkeypatch.setattr(wi, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(1)
    data = (rng.normal(size=(1000, 7)) * 100).astype(dtype)
    if dtype.startswith("float"):
        data[[0, 500, 999], [1, 2, 6]] = np.nan
        data[77, 0] = np.inf
    arr = zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array("a", shape=data.shape, dtype=dtype,
                                                                           chunks=(96, 7))
    arr[...] = data
    blocks = list(wi.row_blocks(arr))
    assert blocks[0][0] == 0 and blocks[-1][1] == 1000  # contiguous cover, chunk-aligned, last block partial
    assert all(a[1] == b[0] and a[1] % 96 == 0 for a, b in zip(blocks, blocks[1:], strict=False))
    assert len(blocks) == {1: 11, 3 * 96 * 7 * 8: 4, 10**9: 1}[block_bytes]
    stats = wi.array_stats(arr, row_norms=True, column_ranges=True)
    wide = data.astype(np.float64)
    finite = wide[np.isfinite(wide)]
    assert stats["min"] == finite.min() and stats["max"] == finite.max()
    assert stats["mean"] == pytest.approx(finite.mean(), rel=1e-12)
    good = np.isfinite(wide).all(axis=1)
    assert stats["row_norm"]["mean"] == pytest.approx(np.linalg.norm(wide[good], axis=1).mean(), rel=1e-12)
    if dtype == "int32":
        assert stats["column_ranges"] == np.stack([data.min(0), data.max(0)]).T.tolist()
    else:
        assert (stats["nan"], stats["inf"], stats["nonfinite_rows"]) == (3, 1, 4)


def test_sharded_array_blocks_follow_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(wi, "BLOCK_BYTES", 1)
    data = np.arange(1050 * 3, dtype=np.float32).reshape(1050, 3)
    arr = zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array(
        "a", shape=data.shape, dtype=data.dtype, chunks=(50, 3), shards=(200, 3))
    arr[...] = data
    assert list(wi.row_blocks(arr))[-2:] == [(800, 1000), (1000, 1050)]
    stats = wi.array_stats(arr)
    assert (stats["min"], stats["max"], stats["mean"]) == (0, data.max(), pytest.approx(data.mean()))
    node = wi.describe_array(arr, full=False, max_bytes=1 << 30)
    assert node["shards"] == [200, 3] and node["chunks"] == [50, 3]


def test_size_cap_skips_summaries_unless_full(features):
    capped = wi.inspect_store(features[0], max_bytes=1000)
    assert "--full" in capped["nodes"]["features"]["summary"]["skipped"] and "skipped" in capped["summary"]
    assert "use --full" in wi.render(capped)
    full = wi.inspect_store(features[0], full=True, max_bytes=1000)
    assert full["summary"]["nonfinite_rows"] == len(NAN_ROWS)


def test_incomplete_store_exits_1(tmp_path, capsys):
    root = zarr.open_group(str(tmp_path / "half.zarr"), mode="w", zarr_format=3)
    root.attrs.update({"encoder": "toy", "provenance": provenance(), "complete": False})
    write_array(root, "features", np.ones((4, 2), np.float32))
    write_array(root, "coords", np.zeros((4, 2), np.int64))
    no_attr = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    no_attr.create_array("x", shape=(3,), dtype="f4")
    code, out, _ = run(capsys, tmp_path / "half.zarr", tmp_path / "plain.zarr")
    assert code == 1
    assert out.count("INCOMPLETE") == 2 and "complete=False" in out and "no root attr 'complete'" in out
    assert "(4, 2) float32" in out  # still shows what is there
    code, out, _ = run(capsys, "--json", tmp_path / "half.zarr")
    assert code == 1 and json.loads(out)[0]["complete"] is False


def test_writer_temp_dir_is_incomplete(tmp_path, capsys):
    with atomic_zarr(tmp_path / "done.zarr") as root:
        write_array(root, "x", np.ones(3))
    tmp = tmp_path / f"{TMP_PREFIX}done.zarr.host.1.abc"
    (tmp_path / "done.zarr").rename(tmp)
    code, out, _ = run(capsys, tmp)
    assert code == 1 and "INCOMPLETE" in out


def test_missing_path_and_mixed_exit_code(features, tmp_path, capsys):
    missing = tmp_path / "nope" / "S9.zarr"
    code, out, _ = run(capsys, features[0], missing)
    assert code == 1 and f"{missing}: no such file or directory" in out and "feature store" in out
    code, out, err = run(capsys, "--json", missing)
    assert code == 1 and str(missing) in err and json.loads(out)[0]["ok"] is False


def test_damaged_chunk_is_reported_and_the_rest_still_shown(features, capsys, monkeypatch):
    monkeypatch.setattr(wi, "BLOCK_BYTES", 1)  # one chunk per block: the error names the damaged chunk's rows
    path = features[0]
    (path / "features" / "c" / "1" / "0").write_bytes(b"not zstd")
    code, out, _ = run(capsys, path)
    assert code == 1 and "features: rows 64..127 unreadable" in out
    assert "(300, 16) float32" in out and "(300, 2) int64" in out and "WARNING" not in out


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2 and main(["inspect"]) == 2 and main(["frobnicate"]) == 2
    assert main(["inspect", "--help"]) == 0
    capsys.readouterr()


def test_anndata_from_the_expression_writer(tmp_path, capsys):
    obs = pd.DataFrame({"label": pd.Categorical(["a", "b", "a", "b", "a"]), "total": np.arange(5.0)},
                       index=pd.Index([f"P{i}" for i in range(5)], name="patient_id"))
    var = pd.DataFrame({"symbol": ["A", "B", "C"]}, index=pd.Index(["G1", "G2", "G3"], name="gene_id"))
    adata = ad.AnnData(X=np.arange(15, dtype=np.float32).reshape(5, 3), obs=obs, var=var,
                       layers={"counts": sp.csr_matrix(np.eye(5, 3))}, obsm={"pca": np.zeros((5, 2))})
    adata.uns["provenance"] = provenance()
    adata.uns["expression"] = {"values": "counts"}
    write_anndata(adata, tmp_path / "cohort.zarr")
    code, out, _ = run(capsys, "--json", tmp_path / "cohort.zarr")
    assert code == 0
    [report] = json.loads(out)
    s = report["summary"]
    assert report["kind"] == "anndata" and report["complete"]
    assert (s["n_obs"], s["n_vars"]) == (5, 3)
    assert s["obs_columns"] == ["label", "total"] and s["var_columns"] == ["symbol"]
    assert s["X"]["dtype"] == "float32" and s["layers"] == ["counts"] and s["obsm"] == ["pca"]
    assert s["uns"] == ["expression", "provenance"] and report["provenance"]["version"]
    assert report["nodes"]["X"]["summary"]["max"] == 14
    code, out, _ = run(capsys, tmp_path / "cohort.zarr")
    assert "AnnData" in out and "n_obs: 5" in out and "n_vars: 3" in out and "INCOMPLETE" not in out


def test_tiles_store_from_the_tiling_stage(slide_factory, tmp_path, capsys):
    slide = slide_factory(tmp_path, "s1", seed=11, size_um=(1200.0, 900.0))
    result = tile_slide(slide, "s1", tmp_path / "s1.zarr", tmp_path / "s1.png")
    assert result.n_tiles > 0
    coords = zarr.open_group(str(tmp_path / "s1.zarr"), mode="r")["coords"][...]
    code, out, _ = run(capsys, "--json", tmp_path / "s1.zarr")
    [report] = json.loads(out)
    assert code == 0 and report["kind"] == "tiles"
    s = report["summary"]
    assert s["tiles"] == result.n_tiles and s["slide_id"] == "s1"
    assert s["coords_bbox"] == {"x": [coords[:, 0].min(), coords[:, 0].max()],
                                "y": [coords[:, 1].min(), coords[:, 1].max()]}
    assert 0.5 <= s["tissue_fraction"]["min"] <= s["tissue_fraction"]["max"] <= 1
    assert "tiles store" in wi.render(report)


def test_json_has_no_nan(tmp_path):
    with atomic_zarr(tmp_path / "n.zarr", {"note": "all NaN"}) as root:
        write_array(root, "x", np.full((4, 2), np.nan))
    report = wi.inspect_store(tmp_path / "n.zarr")
    assert report["nodes"]["x"]["summary"] == {"min": None, "mean": None, "max": None, "nan": 8, "inf": 0}
    json.loads(wi.to_json([report]))


def test_module_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "wsiomics", "inspect", "--json", str(tmp_path / "x.zarr")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and json.loads(done.stdout)[0]["errors"]
