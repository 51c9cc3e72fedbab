"""The synthetic feature cohort (python -m wsiomics.synth features): the slide generator's patients and latent
structure, TRIDENT-layout files the importer reads, and determinism."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import cross_val_predict, cross_val_score

from wsiomics.expression.readers import read_gdc_star
from wsiomics.features.interop import import_features
from wsiomics.io import open_store
from wsiomics.samples import load_sample_sheet
from wsiomics.synth.__main__ import main
from wsiomics.synth.cohort import CohortConfig, plan_cohort

SMALL = ["--feature-dim", "64", "--tiles", "64", "--n-genes", "300"]


def generate(out: Path, *extra: str) -> Path:
    assert main(["features", "--out", str(out), *SMALL, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("fc") / "c", "--patients", "240", "--seed", "3",
                    "--unlabelled-fraction", "0.25", "--survival")


@pytest.fixture(scope="module")
def pooled(cohort) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Per patient: truth, mean-pooled features (over all its tiles) and log CPM expression."""
    sheet = load_sample_sheet(cohort / "samples.tsv")
    truth = pd.read_csv(cohort / "patients_truth.tsv", sep="\t").set_index("patient_id")
    feats: dict[str, list[np.ndarray]] = {}
    for r in sheet.itertuples():
        with h5py.File(r.features_path) as f:
            feats.setdefault(r.patient_id, []).append(f["features"][...])
    pids = list(feats)
    x = np.stack([np.concatenate(feats[p]).mean(0) for p in pids])
    paths = sheet.drop_duplicates("patient_id").set_index("patient_id").loc[pids, "expression_path"]
    counts = np.stack([read_gdc_star(p).values[4:] for p in paths])  # without STAR's 4 N_* rows
    genes = np.log1p(counts / counts.sum(1, keepdims=True) * 1e6)
    return truth.loc[pids], x, genes


def probe(x: np.ndarray, y: pd.Series) -> float:
    return cross_val_score(LogisticRegression(max_iter=3000), x, y.to_numpy(), cv=5, scoring="balanced_accuracy").mean()


def factor_corr(x: np.ndarray, y: pd.Series) -> float:
    pred = cross_val_predict(RidgeCV(alphas=np.logspace(-2, 4, 13)), x, y.to_numpy(), cv=5)
    return float(np.corrcoef(pred, y)[0, 1])


def test_tissue_type_is_in_the_image_programme_in_the_genes_and_the_factors_in_both(pooled):
    truth, image, genes = pooled
    assert probe(image, truth.tissue_type) > 0.75  # seen in the image (diluted by mean pooling)
    assert probe(image, truth.programme) < 0.65  # not in the image
    assert probe(genes, truth.programme) > 0.9  # seen in the genes
    for factor in ("latent0", "latent1"):
        assert factor_corr(image, truth[factor]) > 0.6, factor
        assert factor_corr(genes, truth[factor]) > 0.6, factor


def test_the_patients_are_the_slide_generators(cohort):
    truth = pd.read_csv(cohort / "patients_truth.tsv", sep="\t")
    planned, slides = plan_cohort(CohortConfig(n_patients=240, seed=3, faults=False, latent_factors=2))
    cols = ["patient_id", "tissue_type", "programme", "label", "latent0", "latent1"]
    pd.testing.assert_frame_equal(truth[cols], planned[cols])
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", keep_default_na=False)
    assert sheet.slide_id.tolist() == [s.slide_id for s in slides]


def test_unlabelled_share_and_follow_up(cohort):
    sheet = load_sample_sheet(cohort / "samples.tsv")
    per_patient = sheet.drop_duplicates("patient_id")
    assert (per_patient.label == "").sum() == 60  # 25% of 240
    truth = pd.read_csv(cohort / "patients_truth.tsv", sep="\t", keep_default_na=False).set_index("patient_id")
    withheld = per_patient.patient_id[per_patient.label == ""]
    assert not truth.loc[withheld, "labelled"].any() and (truth.loc[withheld, "label"] != "").all()
    assert (per_patient.time != "").all() and set(per_patient.event) == {"0", "1"}


def test_shared_signal_labels_follow_the_factors_and_show_in_both_modalities(tmp_path):
    """``--signal shared``: the feature generator shares the patient plan, so its labels are the factors' signs,
    and a probe finds them (noisily) in mean-pooled features and in expression alike."""
    out = generate(tmp_path / "s", "--patients", "160", "--seed", "2", "--signal", "shared")
    truth = pd.read_csv(out / "patients_truth.tsv", sep="\t").set_index("patient_id")
    quadrant = np.where(truth.latent0 >= 0, "factor0hi", "factor0lo")
    assert (truth.label == pd.Series(quadrant, index=truth.index) + np.where(truth.latent1 >= 0, "_factor1hi",
                                                                               "_factor1lo")).all()
    sheet = load_sample_sheet(out / "samples.tsv").drop_duplicates("patient_id").set_index("patient_id")
    assert (sheet.label == truth.loc[sheet.index, "label"]).all()
    feats: dict[str, list[np.ndarray]] = {}
    for r in load_sample_sheet(out / "samples.tsv").itertuples():
        with h5py.File(r.features_path) as f:
            feats.setdefault(r.patient_id, []).append(f["features"][...])
    pids = list(feats)
    image = np.stack([np.concatenate(feats[p]).mean(0) for p in pids])
    counts = np.stack([read_gdc_star(p).values[4:] for p in sheet.loc[pids, "expression_path"]])
    genes = np.log1p(counts / counts.sum(1, keepdims=True) * 1e6)
    y = truth.loc[pids, "label"]
    assert probe(image, y) > 0.4 and probe(genes, y) > 0.6  # 4 classes, chance 0.25 (seen 0.55 and 0.85)


def test_files_have_tridents_layout_and_import(cohort, tmp_path):
    sheet = load_sample_sheet(cohort / "samples.tsv")
    row = sheet.iloc[0]
    assert row.slide_path == "" and Path(row.features_path).parent.name == "features_synthetic"
    with h5py.File(row.features_path) as f:
        assert f["features"].dtype == np.float32 and f["features"].shape[1] == 64
        assert f["coords"].dtype == np.int64
        attrs = dict(f["coords"].attrs)
    assert {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
            "name"} <= set(attrs) and attrs["name"] == row.slide_id
    import_features(row.features_path, tmp_path / "s.zarr", "synthetic", slide_id=row.slide_id, dtype="float32")
    store = open_store(tmp_path / "s.zarr")
    assert store.attrs["h5_flavor"] == "trident" and store.attrs["source_encoder"] == "synthetic"
    assert store.attrs["patch_size_level0"] == attrs["patch_size_level0"]
    assert np.all(store["coords"][...] % int(attrs["patch_size_level0"]) == 0)  # on the tile grid


def test_same_seed_same_cohort_other_seed_another(tmp_path):
    a, b = generate(tmp_path / "a", "--patients", "8"), generate(tmp_path / "b", "--patients", "8")
    c = generate(tmp_path / "c", "--patients", "8", "--seed", "1")
    assert (a / "samples.tsv").read_text() == (b / "samples.tsv").read_text()
    first = pd.read_csv(a / "samples.tsv", sep="\t").features_path[0]
    with h5py.File(a / first) as fa, h5py.File(b / first) as fb:
        np.testing.assert_array_equal(fa["features"][...], fb["features"][...])
    other = pd.read_csv(c / "samples.tsv", sep="\t").features_path[0]
    with h5py.File(a / first) as fa, h5py.File(c / other) as fc:
        assert fa["features"].shape != fc["features"].shape or not np.array_equal(fa["features"][...],
                                                                                  fc["features"][...])
    for name in pd.read_csv(a / "samples.tsv", sep="\t").expression_path:
        assert (a / name).read_bytes() == (b / name).read_bytes()
