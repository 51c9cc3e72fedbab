"""Training stages end to end on a tiny on-disk cohort: output contract, seeding, leakage, missing modality."""

from __future__ import annotations

import json
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from test_datasets import grid_coords, write_store

from wsiomics.datasets import load_fold
from wsiomics.train.methods import METHODS, method_config
from wsiomics.train.stages import finetune, pretrain

N_GENES = 12
TRAIN_CFG = {
    "seed": 0, "device": "cpu", "threads": 1, "num_workers": 0,
    "data": {"batch_size": 4, "max_tokens": 12, "crop": "window", "cache_mb": 64},
    "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0, "n_groups": 4,
              "gene_grouping": "contiguous", "fusion_dim": 16, "head": "linear", "mask_length": 4,
              "decoder_depth": 1, "triplet_margin": 0.3, "triplet_weight": 1.0, "positives": "label",
              "use_mpm": True, "use_triplet": True},
    "pretrain": {"epochs": 3, "lr": 3e-3, "encoder_lr_scale": 1.0, "weight_decay": 0.0, "warmup_epochs": 1,
                 "min_lr_ratio": 0.1, "grad_clip": 1.0, "patience": 0, "min_epochs": 1, "label_smoothing": 0.0},
    "finetune": {"epochs": 25, "lr": 1e-2, "encoder_lr_scale": 0.5, "weight_decay": 0.0, "warmup_epochs": 1,
                 "min_lr_ratio": 0.1, "grad_clip": 1.0, "patience": 0, "min_epochs": 1, "label_smoothing": 0.0},
    "methods": {},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """16 patients, label = a shift in the image features and in the first genes. P14 has expression only,
    P15 has slides only; P13's only slide failed tiling."""
    root = tmp_path_factory.mktemp("train_cohort")
    rng = np.random.default_rng(0)
    slides, expr_ids, expr_rows, rows = [], [], [], []
    roles = ["train"] * 9 + ["val"] * 3 + ["test"] * 4
    for i in range(16):
        pid, label = f"P{i:02d}", "ab"[i % 2]
        shift = 1.5 if label == "b" else -1.5
        rows.append({"patient_id": pid, "fold": 0, "role": roles[(i * 7) % 16], "label": label})
        if i != 14:
            sid = f"{pid}-S0"
            slides.append({"patient_id": pid, "slide_id": sid})
            coords = grid_coords(5, 4, 448 if i % 3 == 0 else 224)
            feats = rng.normal(size=(len(coords), 6)) + shift * (i != 13)
            step = 448.0 if i % 3 == 0 else 224.0
            write_store(root / "features" / f"{sid}.zarr", coords, feats, step,
                        status="ok" if i != 13 else "no_tissue")
        if i != 15:
            g = rng.normal(size=N_GENES)
            g[:3] += shift
            expr_ids.append(pid)
            expr_rows.append(g)
    folds = pd.DataFrame(rows)
    adata = ad.AnnData(X=np.array(expr_rows, np.float32), obs=pd.DataFrame(index=expr_ids),
                       var=pd.DataFrame(index=[f"G{j}" for j in range(N_GENES)]))
    adata.write_zarr(root / "fold0.zarr")
    return folds, pd.DataFrame(slides), root / "features", root / "fold0.zarr"


def _data(cohort, modalities=("image", "gene")):
    folds, slides, features, expr = cohort
    return load_fold(folds, 0, slides, features if "image" in modalities else None,
                     expr if "gene" in modalities else None)


def test_gimp_pretrain_then_finetune_writes_the_contract(cohort, tmp_path):
    cfg = method_config(TRAIN_CFG, "gimp")
    data = _data(cohort)
    out = tmp_path / "gimp" / "fold0"
    info = pretrain("gimp", cfg, data, out)
    assert info["epochs"] == 3
    state = torch.load(out / "pretrain" / "model.pt", weights_only=True)
    assert state["metadata"]["method"] == "gimp" and state["metadata"]["classes"] == ["a", "b"]
    assert (out / "pretrain" / "loss_curve.png").stat().st_size > 1000
    finetune("gimp", cfg, data, out, pretrained=out / "pretrain" / "model.pt")

    pred = pd.read_csv(out / "predictions.tsv", sep="\t")
    test_ids = sorted(p.patient_id for p in data.role("test"))
    assert list(pred.columns) == ["patient_id", "fold", "role", "label", "predicted", "prob_a", "prob_b"]
    assert sorted(pred["patient_id"]) == test_ids and set(pred["role"]) == {"test"}
    np.testing.assert_allclose(pred[["prob_a", "prob_b"]].sum(1), 1.0, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "auc_macro", "f1_macro", "n_test"):
        assert key in metrics
    assert metrics["n_test"] == len(test_ids)
    emb = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    assert list(emb["patient_id"][:]) == test_ids
    assert emb["image"].shape == (len(test_ids), 16) and emb["gene"].shape[0] == emb["fused"].shape[0] == len(test_ids)
    # attention per test slide, coords exactly as in the feature store, weights summing to one
    for p in data.role("test"):
        for s in p.slides:
            att = zarr.open_group(str(out / "attention" / f"{s.slide_id}.zarr"), mode="r")
            stored = zarr.open_array(f"{s.store}/coords", mode="r")[:]
            np.testing.assert_array_equal(att["coords"][:], stored)
            assert abs(float(att["attention"][:].sum()) - 1.0) < 1e-4
    history = pd.read_csv(out / "history.tsv", sep="\t")
    assert len(history) == 25 and {"train_loss", "val_loss", "lr"} <= set(history.columns)
    assert not (out / ".state").exists()  # finished stages leave no training state behind


def _perturb_test_patients(data, rng):
    """A copy of ``data`` whose test patients have other genes and slides that are other patients' slides."""
    donors = [s for p in data.role("train") for s in p.slides]
    patients = []
    for p in data.patients:
        if p.role == "test":
            p = replace(p, genes=None if p.genes is None else rng.normal(size=p.genes.shape).astype(np.float32),
                        slides=[donors[(i + len(patients)) % len(donors)] for i in range(len(p.slides))])
        patients.append(p)
    return replace(data, patients=patients)


def test_no_test_patient_reaches_pretraining_or_fine_tuning(cohort, tmp_path):
    """Perturbing the test patients' features and genes leaves the trained weights bit-equal."""
    cfg = method_config(TRAIN_CFG, "gimp")
    cfg["pretrain"]["epochs"], cfg["finetune"]["epochs"] = 2, 2
    data = _data(cohort)
    perturbed = _perturb_test_patients(data, np.random.default_rng(5))
    assert any(not np.array_equal(a.genes, b.genes) for a, b in zip(data.role("test"), perturbed.role("test"),
                                                                   strict=True) if a.genes is not None)
    weights = []
    for name, d in (("a", data), ("b", perturbed)):
        out = tmp_path / name
        pretrain("gimp", cfg, d, out)
        finetune("gimp", cfg, d, out, pretrained=out / "pretrain" / "model.pt")
        paths = {"pretrain": out / "pretrain" / "model.pt", "finetune": out / "model.pt"}
        weights.append({stage: torch.load(path, weights_only=True)["model"] for stage, path in paths.items()})
    for stage in ("pretrain", "finetune"):
        for k, v in weights[0][stage].items():
            assert torch.equal(v, weights[1][stage][k]), (stage, k)
    pa = pd.read_csv(tmp_path / "a" / "predictions.tsv", sep="\t")
    pb = pd.read_csv(tmp_path / "b" / "predictions.tsv", sep="\t")
    assert not np.allclose(pa["prob_a"], pb["prob_a"])  # the perturbation reached the test patients' predictions


def _with_unlabelled(cohort, ids=("P01", "P05", "P08")):
    """The cohort with some of its train patients (slides and expression) unlabelled, as the splits make them."""
    folds, slides, features, expr = cohort
    unlabelled = folds.patient_id.isin(ids)
    assert (folds.role[unlabelled] == "train").all()
    folds = folds.assign(role=folds.role.where(~unlabelled, "unlabelled"), label=folds.label.where(~unlabelled, ""))
    return load_fold(folds, 0, slides, features, expr)


def _perturbed(data, role, rng):
    """A copy of ``data`` whose ``role`` patients have other genes and other patients' (train) slides."""
    donors = [s for p in data.role("train") for s in p.slides]
    patients = []
    for p in data.patients:
        if p.role == role:
            p = replace(p, genes=rng.normal(size=p.genes.shape).astype(np.float32),
                        slides=[donors[(i + len(patients)) % len(donors)] for i in range(len(p.slides))])
        patients.append(p)
    return replace(data, patients=patients)


@pytest.mark.parametrize("name", ["gimp", "mgi"])
def test_unlabelled_patients_pretrain_under_pool_all_and_test_patients_never(cohort, tmp_path, name):
    """Pretraining weights are bit-equal when the test patients' features and genes change (pool all), and
    differ when the unlabelled patients' do; under pool labelled, and in fine-tuning, the unlabelled patients
    change nothing. GiMP pretrains with class-balanced batches (the unlabelled patients have no class)."""
    cfg = method_config(TRAIN_CFG, name)
    cfg["pretrain"].update(epochs=2, classes_per_batch=2)
    cfg["finetune"]["epochs"] = 2
    data = _with_unlabelled(cohort)
    rng = np.random.default_rng(3)
    variants = {"base": data, "test": _perturbed(data, "test", rng), "unlabelled": _perturbed(data, "unlabelled", rng)}

    def weights(pool, variant, stages=("pretrain",)):
        c = {**cfg, "pretrain": {**cfg["pretrain"], "pool": pool}}
        out = tmp_path / pool / variant
        pretrain(name, c, variants[variant], out)
        found = {"pretrain": torch.load(out / "pretrain" / "model.pt", weights_only=True)}
        if "finetune" in stages:
            finetune(name, c, variants[variant], out, pretrained=out / "pretrain" / "model.pt")
            found["finetune"] = torch.load(out / "model.pt", weights_only=True)
        return found

    def same(a, b, stage):
        return all(torch.equal(v, b[stage]["model"][k]) for k, v in a[stage]["model"].items())

    base = weights("all", "base")
    assert set(base["pretrain"]["metadata"]["train_patients"]) == {p.patient_id for p in data.role(
        "train", "unlabelled")}
    assert same(base, weights("all", "test"), "pretrain")
    assert not same(base, weights("all", "unlabelled"), "pretrain")
    labelled = weights("labelled", "base", ("pretrain", "finetune"))
    assert labelled["pretrain"]["metadata"]["train_patients"] == [p.patient_id for p in data.role("train")]
    moved = weights("labelled", "unlabelled", ("pretrain", "finetune"))
    assert same(labelled, moved, "pretrain") and same(labelled, moved, "finetune")
    with pytest.raises(ValueError, match="pool is 'some'.*all, labelled"):
        pretrain(name, {**cfg, "pretrain": {**cfg["pretrain"], "pool": "some"}}, data, tmp_path / "bad")


def test_cca_aligns_the_pretraining_pool(cohort, tmp_path):
    """cca's PCA + CCA fit takes the unlabelled patients under pool all (as MGI's pretraining) and not under
    pool labelled; the test patients' canonical scores move only with what the fit saw."""
    cfg = method_config(TRAIN_CFG, "cca")
    data = _with_unlabelled(cohort)
    moved = _perturbed(data, "unlabelled", np.random.default_rng(1))

    def scores(pool, d):
        out = tmp_path / f"{pool}{id(d)}"
        info = finetune("cca", {**cfg, "pretrain": {**cfg["pretrain"], "pool": pool}}, d, out)
        return info["fit_patients"], zarr.open_group(str(out / "embeddings.zarr"), mode="r")["image"][:]

    paired = [p for p in data.patients if p.slides and p.genes is not None]
    n_all, base = scores("all", data)
    assert n_all == sum(p.role in ("train", "unlabelled") for p in paired)
    assert not np.allclose(base, scores("all", moved)[1])
    n_labelled, labelled = scores("labelled", data)
    assert n_labelled == sum(p.role == "train" for p in paired) == n_all - 3
    np.testing.assert_array_equal(labelled, scores("labelled", moved)[1])


def test_a_killed_job_resumes_but_changed_data_trains_afresh(cohort, tmp_path, monkeypatch):
    """A state left by a killed job is resumed on the same data; after the data changed (a patient's genes
    re-normalised, say) the job trains from scratch instead of scoring the old weights."""
    from wsiomics.train import loop
    from wsiomics.train import stages as run_module

    cfg = method_config(TRAIN_CFG, "gene_only")
    cfg["finetune"]["epochs"] = 3
    data = _data(cohort, ("gene",))
    out = tmp_path / "gene_only"
    monkeypatch.setattr(run_module, "clear_state", lambda path: None)  # as if killed after the last epoch
    finetune("gene_only", cfg, data, out)
    saves = []
    real = loop._save_state
    monkeypatch.setattr(loop, "_save_state", lambda path, state: (saves.append(state["epoch"]), real(path, state)))
    finetune("gene_only", {**cfg, "threads": 2}, data, out)
    assert saves == []  # same data: the finished state is resumed, nothing retrained
    changed = replace(data, patients=[replace(p, genes=p.genes + 0.5) if p.role == "train" and p.genes is not None
                                      else p for p in data.patients])
    finetune("gene_only", cfg, changed, out)
    assert saves == [0, 1, 2]
    monkeypatch.undo()
    finetune("gene_only", cfg, changed, out)
    assert not (out / ".state").exists()


@pytest.mark.parametrize("name", ["image_only", "gene_only", "late_fusion", "linear"])
def test_baselines_learn_the_signal_and_predict_everyone(cohort, tmp_path, name):
    cfg = method_config(TRAIN_CFG, name)
    data = _data(cohort, METHODS[name].modalities)
    out = tmp_path / name
    finetune(name, cfg, data, out)
    metrics = json.loads((out / "metrics.json").read_text())
    pred = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert len(pred) == len(data.role("test"))  # missing-modality patients are predicted, not dropped
    assert metrics["balanced_accuracy"] >= 0.75, metrics


def test_same_seed_same_metrics_and_missing_modalities_train(cohort, tmp_path):
    cfg = method_config(TRAIN_CFG, "gimp_no_pretrain")
    cfg["finetune"]["epochs"] = 4
    data = _data(cohort)
    kinds = {(bool(p.slides), p.genes is not None) for p in data.role("train")}
    assert {(True, False), (False, True)} & kinds  # the training set holds patients missing a modality
    finetune("gimp_no_pretrain", cfg, data, tmp_path / "a")
    finetune("gimp_no_pretrain", cfg, data, tmp_path / "b")
    a = pd.read_csv(tmp_path / "a" / "predictions.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "b" / "predictions.tsv", sep="\t")
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "a" / "metrics.json").read_text() != ""
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    ma["training"].pop("seconds"), mb["training"].pop("seconds")
    assert ma == mb


def test_stage_model_settings_apply_to_their_stage_only(cohort, tmp_path):
    """train.finetune.model (here dropout) changes the fine-tuned network, not the pretrained one, and the
    pretrained checkpoint still loads into it."""
    from wsiomics.train.build import build_model
    from wsiomics.train.stages import stage_config

    cfg = method_config({**TRAIN_CFG, "methods": {"gimp": {"finetune": {"model": {"dropout": 0.4}}}}}, "gimp")
    cfg["pretrain"]["epochs"], cfg["finetune"]["epochs"] = 1, 1
    data = _data(cohort)
    out = tmp_path / "gimp"
    pretrain("gimp", cfg, data, out)
    finetune("gimp", cfg, data, out, pretrained=out / "pretrain" / "model.pt")
    pre = torch.load(out / "pretrain" / "model.pt", weights_only=True)["metadata"]["config"]["model"]
    fine = torch.load(out / "model.pt", weights_only=True)["metadata"]["config"]["model"]
    assert pre["dropout"] == 0.0 and fine["dropout"] == 0.4
    rates = {m.p for m in build_model(METHODS["gimp"], stage_config(cfg, "finetune"), data).modules()
             if isinstance(m, torch.nn.Dropout)}
    assert 0.4 in rates and stage_config(cfg, "pretrain") is cfg


def _relabel(cohort, labels):
    """The cohort with every patient's label from ``labels(patient row)``."""
    folds, *rest = cohort
    return (folds.assign(label=[labels(r) for r in folds.itertuples()]), *rest)


@pytest.mark.parametrize("labels", ["none", "one_class"])
@pytest.mark.parametrize("name", ["linear", "image_only", "gimp"])
def test_finetune_refuses_a_cohort_with_fewer_than_two_classes(cohort, tmp_path, name, labels):
    """Labels are optional in the sheet: classification on fewer than two classes is refused up front, with
    the sheet's column and the fix named, instead of crashing (linear) or training a one-class model."""
    relabelled = _relabel(cohort, (lambda r: "") if labels == "none" else (lambda r: "a"))
    data = _data(relabelled, METHODS[name].modalities)
    with pytest.raises(ValueError, match=r"at least two classes.*label column") as info:
        finetune(name, method_config(TRAIN_CFG, name), data, tmp_path)
    assert ("no labels" in str(info.value)) == (labels == "none")
    assert not (tmp_path / "metrics.json").exists()


def test_finetune_refuses_a_fold_that_trains_on_one_class(cohort, tmp_path):
    """Two classes in the cohort, but every labelled train and val patient has the same one (here: the b
    patients of train and val lost their label, as a class of one patient in the fold that tests it): also
    refused, naming the split settings. b among train or val alone is enough (linear fits on both)."""
    relabelled = _relabel(cohort, lambda r: "" if r.role in ("train", "val") and r.label == "b" else r.label)
    with pytest.raises(ValueError, match=r"at least two classes.*train and val patients.*splits"):
        finetune("linear", method_config(TRAIN_CFG, "linear"), _data(relabelled), tmp_path)
    val_only = _relabel(cohort, lambda r: "" if r.role == "train" and r.label == "b" else r.label)
    finetune("linear", method_config(TRAIN_CFG, "linear"), _data(val_only), tmp_path)
    assert (tmp_path / "metrics.json").exists()
