"""Tumour segmentation: soft Dice, per-tile targets through the data path, the segmenter, outputs contract."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from shapely.geometry import box, mapping
from test_datasets import grid_coords, write_store

from wsiomics.datasets import DatasetParams, load_fold
from wsiomics.models.batch import Batch
from wsiomics.models.segmentation import SegmenterConfig, TumourSegmenter, soft_dice_loss
from wsiomics.models.slide_transformer import SlideTransformerConfig
from wsiomics.train.evaluate import dice_score, segmentation_metrics
from wsiomics.train.methods import deep_merge, method_config
from wsiomics.train.stages import finetune, pretrain
from wsiomics.train.tasks.segment import attach_tumour_labels

N_GENES = 12
FEATURE_DIM = 32
STEP = 224
CFG = {
    "seed": 0, "device": "cpu", "threads": 1, "num_workers": 0,
    "data": {"batch_size": 4, "max_tokens": 64, "crop": "window", "cache_mb": 64},
    "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0, "head": "linear",
              "gene_encoder": "mamba", "genes_per_token": 3, "d_state": 4, "d_conv": 2, "expand": 2,
              "bidirectional": False, "embed_dim": 8, "projection": "linear", "temperature": 0.07,
              "seg_conditioning": "film", "seg_decoder_depth": 1, "dice_weight": 1.0},
    "pretrain": {"epochs": 3, "lr": 1e-3, "encoder_lr_scale": 1.0, "weight_decay": 0.0, "warmup_epochs": 1,
                 "min_lr_ratio": 0.1, "grad_clip": 1.0, "patience": 0, "min_epochs": 1, "label_smoothing": 0.0},
    "finetune": {"epochs": 20, "lr": 1e-2, "encoder_lr_scale": 0.5, "weight_decay": 0.0, "warmup_epochs": 1,
                 "min_lr_ratio": 0.1, "grad_clip": 1.0, "patience": 0, "min_epochs": 1, "label_smoothing": 0.0},
    "segmentation": {"classes": ["Tumor"], "include_unclassified": False, "min_fraction": 0.5, "threshold": 0.5},
    "methods": {},
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_soft_dice_equals_the_hand_computed_value():
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.5, 0.5, 0.7], [0.3, 0.3, 0.3]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    valid = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    # row 0: 2*(0.9+0.6)=3, sum p = 1.7, sum t = 2 -> dice (3+1)/(3.7+1); row 1: (0+1)/(1+0+1); row 2: no entry
    expected = ((1 - 4 / 4.7) + (1 - 0.5)) / 2
    assert float(soft_dice_loss(probs, target, valid)) == pytest.approx(expected, abs=1e-6)
    assert float(soft_dice_loss(probs[:1], target[:1], eps=0.0)) == pytest.approx(1 - 3 / 3.7, abs=1e-6)
    assert float(soft_dice_loss(probs, target, torch.zeros_like(valid))) == 0.0
    assert dice_score(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5
    assert dice_score(np.zeros(3), np.zeros(3)) == 1.0  # nothing to find, nothing found
    m = segmentation_metrics({"a": (np.array([0.9, 0.1]), np.array([1.0, 0.0])),
                              "b": (np.array([0.9, 0.9]), np.array([1.0, 0.0]))})
    # a: 1.0; b: 2*1/(2+1); pooled: 2*2/(3+2)
    assert m["dice_mean"] == pytest.approx((1 + 2 / 3) / 2) and m["dice_pooled"] == pytest.approx(0.8)


def _batch(b=2, length=6, d=FEATURE_DIM, targets=True):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 4:] = False
    tt = torch.randint(0, 2, (b, length), generator=g).float().masked_fill(~mask, float("nan"))
    return Batch(features=torch.randn(b, length, d, generator=g), positions=torch.rand(b, length, 2, generator=g),
                 slide_index=torch.where(mask, 0, -1), token_mask=mask, genes=torch.randn(b, N_GENES, generator=g),
                 has_image=torch.ones(b, dtype=torch.bool), has_gene=torch.tensor([True, False][:b]),
                 labels=torch.zeros(b, dtype=torch.long), patient_index=torch.arange(b),
                 tile_targets=tt if targets else None)


@pytest.mark.parametrize("conditioning", ["film", "cross_attention", None])
def test_segmenter_shapes_gene_conditioning_and_loss(conditioning):
    torch.manual_seed(0)
    cfg = SegmenterConfig(image=SlideTransformerConfig(in_dim=FEATURE_DIM, dim=16, depth=1, heads=2, dropout=0.0),
                          n_genes=N_GENES, use_genes=conditioning is not None, conditioning=conditioning or "film",
                          gene_encoder="mlp", gene={"dim": 16, "hidden": (16,)}, embed_dim=8, heads=2, dropout=0.0)
    model = TumourSegmenter(cfg).eval()
    batch = _batch()
    out = model(batch)
    assert out.tile_logits.shape == (2, 6) and bool((out.tile_logits[1, 4:] == 0).all())
    assert hasattr(model, "gene_encoder") == (conditioning is not None)
    losses = model.segmentation_loss(batch)
    assert {"loss", "bce", "dice"} <= set(losses) and losses["loss"].requires_grad
    if conditioning == "cross_attention":  # genes reach the tile logits of the patient who has them
        other = _batch()
        other.genes[0, :4] += 3.0
        assert not torch.allclose(model(other).tile_logits[0], out.tile_logits[0])
        other.genes[1, :4] += 3.0  # patient 1 has no expression: its genes are ignored
        assert torch.allclose(model(other).tile_logits[1], out.tile_logits[1])
    with pytest.raises(ValueError, match="per-tile targets"):
        model.segmentation_loss(_batch(targets=False))


# ---------------------------------------------------------------- end to end


def _annotation(path, geom):
    feature = {"type": "Feature", "geometry": mapping(geom),
               "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))


def make_cohort(root):
    """16 patients, one 8 x 6 slide each (P03 and P04 have two); the tumour is a rectangle whose tiles have shifted
    features. Unannotated: P01's slide (train) and P09's slide (test). P14 has no slides."""
    rng = np.random.default_rng(2)
    direction = rng.normal(size=FEATURE_DIM)
    direction /= np.linalg.norm(direction)
    roles = ["train"] * 9 + ["val"] * 3 + ["test"] * 4
    rows, slides, annotations, expr_ids, expr_rows = [], [], {}, [], []
    for i in range(16):
        pid = f"P{i:02d}"
        rows.append({"patient_id": pid, "fold": 0, "role": roles[(i * 7) % 16], "label": "ab"[i % 2]})
        for k in range(2 if i in (3, 4) else (0 if i == 14 else 1)):
            sid = f"{pid}-S{k}"
            coords = grid_coords(8, 6, STEP, shuffle_seed=i + 10 * k)  # stored rows not in raster order
            x0, y0 = rng.integers(0, 4) * STEP, rng.integers(0, 3) * STEP
            tumour = box(x0 + 10, y0 - 5, x0 + 3.6 * STEP, y0 + 2.5 * STEP)
            inside = np.array([box(x, y, x + STEP, y + STEP).intersection(tumour).area >= STEP * STEP / 2
                               for x, y in coords])
            feats = rng.normal(size=(len(coords), FEATURE_DIM)) + 4.0 * inside[:, None] * direction
            write_store(root / "features" / f"{sid}.zarr", coords, feats, float(STEP))
            slides.append({"patient_id": pid, "slide_id": sid})
            if sid not in ("P01-S0", "P09-S0"):
                _annotation(root / f"{sid}.geojson", tumour)
                annotations[sid] = str(root / f"{sid}.geojson")
        expr_ids.append(pid)
        expr_rows.append(rng.normal(size=N_GENES))
    adata = ad.AnnData(X=np.array(expr_rows, np.float32), obs=pd.DataFrame(index=expr_ids),
                       var=pd.DataFrame(index=[f"G{j}" for j in range(N_GENES)]))
    adata.write_zarr(root / "fold0.zarr")
    return pd.DataFrame(rows), pd.DataFrame(slides), root / "features", root / "fold0.zarr", annotations


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("seg_cohort"))


def _data(cohort, genes=True):
    folds, slides, features, expr, _ = cohort
    return load_fold(folds, 0, slides, features, expr if genes else None)


def test_tile_targets_travel_through_the_dataset_in_raster_order(cohort):
    data = _data(cohort)
    annotations = cohort[-1]
    report = attach_tumour_labels(data, annotations)
    assert "P01-S0" in report["unannotated"] and len(report["annotated"]) == len(annotations)
    p03 = next(p for p in data.patients if p.patient_id == "P03")
    slide = p03.slides[0]
    coords = zarr.open_array(f"{slide.store}/coords", mode="r")[:]
    # targets are in raster order: row r of the raster is stored row order[r]
    from wsiomics.annotations import read_annotation, tile_labels

    stored = tile_labels(coords, STEP, read_annotation(annotations[slide.slide_id]).tumour)
    np.testing.assert_array_equal(slide.targets, stored[slide.order])
    ds = data.dataset(["train", "val", "test"], DatasetParams(max_tokens=10_000), train=False)
    index = [p.patient_id for p in ds.patients]
    batch = data.loader(ds, 16, shuffle=False).__iter__().__next__()
    t = batch.tile_targets
    assert t is not None and t.shape == batch.token_mask.shape
    assert bool(torch.isnan(t[~batch.token_mask]).all())  # padding has no target
    assert bool(torch.isnan(t[index.index("P01")][batch.token_mask[index.index("P01")]]).all())  # unannotated
    row = index.index("P03")
    np.testing.assert_array_equal(t[row, :48].numpy(), p03.slides[0].targets)
    # a dataset without any targets has none in its batches (every other method's data path is unchanged)
    plain = _data(cohort).dataset(["train"], DatasetParams(), train=False)
    assert _data(cohort).loader(plain, 4, shuffle=False).__iter__().__next__().tile_targets is None


@pytest.mark.slow
def test_image_seg_and_mgi_seg_learn_and_write_the_contract(cohort, tmp_path, monkeypatch):
    from wsiomics.train import stages as run_module

    folds, slides, features, expr, annotations = cohort
    results = {}
    mgi_cfg = deep_merge(method_config(CFG, "mgi"), {"pretrain": {"epochs": 2}})
    pretrain("mgi", mgi_cfg, _data(cohort), tmp_path / "mgi")
    initial = {}  # each segmenter's weights as training starts
    real_fit = run_module.fit

    def fit(model, *args, **kwargs):
        initial[kwargs["desc"].split()[0]] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(run_module, "fit", fit)
    for name in ("image_seg", "mgi_seg"):
        cfg = method_config(CFG, name)
        data = _data(cohort, genes=name != "image_seg")
        pretrained = tmp_path / "mgi" / "pretrain" / "model.pt" if name == "mgi_seg" else None
        out = tmp_path / name
        finetune(name, cfg, data, out, pretrained=pretrained, annotations=annotations)
        metrics = json.loads((out / "metrics.json").read_text())
        results[name] = metrics
        test_slides = [s for p in data.role("test") for s in p.slides]
        assert metrics["skipped_slides"] == ["P09-S0"]
        assert set(metrics["dice_per_slide"]) == {s.slide_id for s in test_slides} - {"P09-S0"}
        assert metrics["n_slides"] == len(test_slides) - 1
        for s in test_slides:  # every test slide has a map, annotated or not
            store = zarr.open_group(str(out / "tumour" / f"{s.slide_id}.zarr"), mode="r")
            np.testing.assert_array_equal(store["coords"][:], zarr.open_array(f"{s.store}/coords", mode="r")[:])
            prob = store["tumour_prob"][:]
            assert prob.shape == (s.n_tokens,) and prob.min() >= 0.0 and prob.max() <= 1.0
            assert (out / "tumour" / f"{s.slide_id}.png").stat().st_size > 1000
        assert metrics["dice_mean"] >= 0.8 and metrics["dice_pooled"] >= 0.8, (name, metrics)
    # mgi_seg starts from MGI's pretrained encoders, tensor for tensor; its decoder is new
    mgi = torch.load(tmp_path / "mgi" / "pretrain" / "model.pt", weights_only=True)["model"]
    start = initial["mgi_seg"]
    encoder_keys = [k for k in start if k.split(".")[0] in ("image_encoder", "gene_encoder")]
    assert any(k.startswith("gene_encoder.") for k in encoder_keys)
    for k in encoder_keys:
        assert torch.equal(start[k], mgi[k]), k
    assert not all(torch.equal(start[k], initial["image_seg"][k]) for k in encoder_keys if k in initial["image_seg"])
    assert not any(k.startswith("gene_encoder.") for k in torch.load(tmp_path / "image_seg" / "model.pt",
                                                                       weights_only=True)["model"])
