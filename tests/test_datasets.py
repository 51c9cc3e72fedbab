"""Patient datasets: raster order, resolution-free grid positions, crops, streaming cache, padding, modalities."""

from __future__ import annotations

import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from wsiomics.datasets import (
    DatasetError,
    DatasetParams,
    EpochBatches,
    FeatureCache,
    collate,
    load_fold,
    read_slide_record,
)
from wsiomics.io import atomic_zarr, write_array


def write_store(path, coords, feats, step, status="ok"):
    with atomic_zarr(path, attrs={"status": status, "patch_size_level0": step}) as root:
        write_array(root, "features", feats.astype(np.float16), chunk_rows=64)
        write_array(root, "coords", coords.astype(np.int64))
    return path


def grid_coords(n_cols, n_rows, step, shuffle_seed=None):
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    coords = np.stack([cols.ravel(), rows.ravel()], 1) * step
    if shuffle_seed is not None:
        coords = coords[np.random.default_rng(shuffle_seed).permutation(len(coords))]
    return coords


def test_raster_order_and_positions_do_not_depend_on_resolution(tmp_path):
    c20 = grid_coords(5, 4, 224, shuffle_seed=1)
    c40 = c20 * 2  # the same tissue scanned at 40x: level-0 coords and patch size double
    feats = np.arange(len(c20) * 3, dtype=np.float32).reshape(-1, 3)
    s20 = read_slide_record("a", write_store(tmp_path / "a.zarr", c20, feats, 224.0))
    s40 = read_slide_record("b", write_store(tmp_path / "b.zarr", c40, feats, 448.0))
    np.testing.assert_array_equal(s20.positions, s40.positions)
    # raster order: by row, then column
    assert s20.positions[:, 1].tolist() == sorted(s20.positions[:, 1].tolist())
    first_row = s20.positions[s20.positions[:, 1] == 0][:, 0]
    assert first_row.tolist() == [0, 1, 2, 3, 4]
    assert not s20.contiguous
    cache = FeatureCache(1e9)
    whole = cache.read(s20, None)
    np.testing.assert_array_equal(whole, feats[s20.order].astype(np.float16))


def test_cache_tells_apart_two_stores_of_the_same_slide_id(tmp_path):
    """Two cohorts may reuse slide ids (a deploy cohort's refitted baselines read the run's stores and the new
    cohort's in one dataset): the cache is keyed by the store, not the id."""
    coords = grid_coords(3, 2, 224)
    run = read_slide_record("S1", write_store(tmp_path / "run" / "S1.zarr", coords, np.zeros((6, 3)), 224.0))
    new = read_slide_record("S1", write_store(tmp_path / "new" / "S1.zarr", coords, np.ones((6, 3)), 224.0))
    cache = FeatureCache(1e9)
    assert cache.read(run, None).sum() == 0
    assert cache.read(new, None).sum() == 18


def test_failed_slide_is_skipped_and_incomplete_store_is_an_error(tmp_path):
    empty = write_store(tmp_path / "bad.zarr", np.zeros((0, 2)), np.zeros((0, 3)), 224.0, status="unreadable")
    assert read_slide_record("bad", empty) is None
    with pytest.raises(DatasetError, match="no feature store"):
        read_slide_record("missing", tmp_path / "missing.zarr")


def _cohort(tmp_path, n_patients=6, n_genes=5):
    slides, stores = [], tmp_path / "features"
    rng = np.random.default_rng(0)
    for i in range(n_patients):
        pid = f"P{i}"
        if i == n_patients - 1:
            continue  # expression only
        n_slides = 2 if i == 0 else 1
        for k in range(n_slides):
            sid = f"{pid}-S{k}"
            coords = grid_coords(6 + i, 5, 224)
            write_store(stores / f"{sid}.zarr", coords, rng.normal(size=(len(coords), 8)), 224.0)
            slides.append({"patient_id": pid, "slide_id": sid})
    labels = ["a", "b"] * (n_patients // 2)
    folds = pd.DataFrame({"patient_id": [f"P{i}" for i in range(n_patients)], "fold": 0,
                          "role": ["train", "train", "val", "test", "train", "train"][:n_patients],
                          "label": labels})
    with_expr = [f"P{i}" for i in range(n_patients) if i != 1]  # P1: slides only
    x = rng.normal(size=(len(with_expr), n_genes)).astype(np.float32)
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=with_expr), var=pd.DataFrame(index=[f"G{j}" for j in
                                                                                        range(n_genes)]))
    adata.write_zarr(tmp_path / "fold0.zarr")
    return folds, pd.DataFrame(slides), stores, tmp_path / "fold0.zarr", adata


def test_load_fold_modalities_and_slides(tmp_path):
    folds, slides, stores, expr, adata = _cohort(tmp_path)
    data = load_fold(folds, 0, slides, stores, expr)
    by_id = {p.patient_id: p for p in data.patients}
    assert len(data.patients) == 6  # nobody dropped
    assert [s.slide_id for s in by_id["P0"].slides] == ["P0-S0", "P0-S1"]
    assert by_id["P1"].genes is None and by_id["P1"].slides
    assert by_id["P5"].genes is not None and not by_id["P5"].slides
    np.testing.assert_allclose(by_id["P2"].genes, adata[["P2"]].X[0])
    assert data.classes == ["a", "b"] and data.feature_dim == 8 and data.genes == [f"G{j}" for j in range(5)]
    ds = data.dataset(("train", "val", "test"), DatasetParams(max_tokens=10), train=False)
    batch = collate([ds[i] for i in range(len(ds))], data.feature_dim, len(data.genes))
    assert batch.has_image.tolist() == [True, True, True, True, True, False]
    assert batch.has_gene.tolist() == [True, False, True, True, True, True]
    # evaluation sees every token of every slide; padding is masked and has slide index -1
    assert int(batch.token_mask[0].sum()) == 2 * 30
    assert set(batch.slide_index[0].tolist()) == {0, 1}
    assert int(batch.token_mask[1].sum()) == 35
    assert (batch.slide_index[~batch.token_mask] == -1).all()
    assert not batch.token_mask[5].any()


@pytest.mark.parametrize("crop", ["window", "sample"])
def test_training_crops_each_slide_deterministically(tmp_path, crop):
    folds, slides, stores, expr, _ = _cohort(tmp_path)
    data = load_fold(folds, 0, slides, stores, expr)
    params = DatasetParams(max_tokens=7, crop=crop, seed=3)
    ds = data.dataset(("train",), params, train=True)
    item = ds[(0, 0)]  # P0: two slides of 30 tokens -> 7 + 7
    assert len(item.positions) == 14 and item.slide_index.tolist() == [0] * 7 + [1] * 7
    slide = ds.patients[0].slides[0]
    full = ds.cache.read(slide, None)
    idx = [int(np.flatnonzero((slide.positions == p).all(1))[0]) for p in item.positions[:7]]
    assert idx == sorted(idx)  # raster order kept
    if crop == "window":
        assert idx == list(range(idx[0], idx[0] + 7))
    np.testing.assert_array_equal(item.features[:7], full[idx])
    again = data.dataset(("train",), params, train=True)[(0, 0)]
    np.testing.assert_array_equal(item.positions, again.positions)
    other_epoch = ds[(0, 1)]
    assert not np.array_equal(item.positions, other_epoch.positions)


def test_cache_is_bounded_and_streams_large_slides(tmp_path):
    folds, slides, stores, expr, _ = _cohort(tmp_path)
    data = load_fold(folds, 0, slides, stores, expr)
    one_slide = 30 * 8 * 2  # bytes of the smallest slide (fp16)
    cache = FeatureCache(max_bytes=one_slide * 8)
    for p in data.patients:
        for s in p.slides:
            cache.read(s, None)
    assert cache.nbytes <= one_slide * 8
    tiny = FeatureCache(max_bytes=one_slide)  # every slide is larger than a quarter: read from the store
    s = data.patients[0].slides[0]
    rows = np.arange(3, 9)
    np.testing.assert_array_equal(tiny.read(s, rows), cache.read(s, None)[rows])
    assert tiny.nbytes == 0


def test_dataset_pickles_with_an_empty_cache_of_its_own(tmp_path):
    """Spawned DataLoader workers get the dataset pickled: the lock must not stop it, and the parent's cached
    slides must not travel with it (each process fills its own cache)."""
    folds, slides, stores, expr, _ = _cohort(tmp_path)
    data = load_fold(folds, 0, slides, stores, expr)
    ds = data.dataset(("train",), DatasetParams(max_tokens=7, crop="sample", seed=3), train=True)
    item = ds[(0, 2)]
    assert ds.cache.nbytes > 0
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.cache.nbytes == 0 and copy.cache.max_bytes == ds.cache.max_bytes
    again = copy[(0, 2)]
    np.testing.assert_array_equal(again.features, item.features)
    assert copy.cache.nbytes == ds.cache.nbytes and copy.cache.misses == 2  # P0's two slides, read afresh
    copy[(0, 3)]
    assert copy.cache.hits == 2


def test_the_feature_cache_survives_epochs_in_a_persistent_worker(tmp_path):
    """After one epoch the worker holds every slide: the next epoch reads nothing from the stores (they are
    moved away here) and still gives the batches an in-process loader gives."""
    folds, slides, stores, expr, _ = _cohort(tmp_path)
    data = load_fold(folds, 0, slides, stores, expr)
    params = DatasetParams(max_tokens=7, crop="sample", seed=3)
    inline = data.loader(data.dataset(("train",), params, train=True), 2, shuffle=True, seed=0)
    inline.batch_sampler.set_epoch(1)
    expected = list(inline)
    worker = data.loader(data.dataset(("train",), params, train=True), 2, shuffle=True, seed=0, num_workers=1)
    list(worker)  # epoch 0 fills the worker's cache
    shutil.move(stores, tmp_path / "moved")
    worker.batch_sampler.set_epoch(1)
    got = list(worker)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.features, b.features) and torch.equal(a.patient_index, b.patient_index)


def test_epoch_batches_shuffle_per_epoch_and_cover_everyone():
    sampler = EpochBatches(10, 4, seed=0, shuffle=True)
    first = [k for b in sampler for k in b]
    sampler.set_epoch(1)
    second = [k for b in sampler for k in b]
    assert sorted(i for i, _ in first) == list(range(10)) and len(sampler) == 3
    assert [i for i, _ in first] != [i for i, _ in second]
    assert {e for _, e in second} == {1}


def test_mismatched_feature_dims_are_an_error(tmp_path):
    folds, slides, stores, expr, _ = _cohort(tmp_path)
    coords = grid_coords(3, 3, 224)
    write_store(stores / "P2-S0.zarr", coords, np.zeros((9, 4)), 224.0)
    with pytest.raises(DatasetError, match="same encoder"):
        load_fold(folds, 0, slides, stores, expr)
