"""Deployment (python -m wsiomics.train predict): a tiny run's fold models applied to a new cohort.

The run: 16 patients, two folds, label = a shift in the image features and in the first genes; fold models
trained by the real stages. The new cohort: 8 patients of the same classes, two without RNA, two without slides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from test_datasets import grid_coords
from test_train import TRAIN_CFG

from wsiomics.expression.cohort import write_anndata
from wsiomics.expression.normalize import NormalizeParams, normalize_fold
from wsiomics.io import atomic_zarr, write_array
from wsiomics.splits import SplitParams, make_splits
from wsiomics.train.__main__ import main as train_main
from wsiomics.train.deploy import DeployError, ensemble, predict
from wsiomics.train.methods import method_config
from wsiomics.train.stages import finetune, load_inputs

N_GENES = 12
N_FOLDS = 3
ROOT = Path(__file__).resolve().parents[1]
IDENTITY = {"encoder": "toy_encoder", "weights": {"source": "hub", "name": "toy", "sha256": "ab" * 32},
            "target_mpp": 0.5}


def feature_store(path: Path, feats: np.ndarray, **identity) -> Path:
    attrs = {"status": "ok", "patch_size_level0": 224.0, **IDENTITY, **identity}
    with atomic_zarr(path, attrs=attrs) as root:
        write_array(root, "features", feats.astype(np.float16), chunk_rows=64)
        write_array(root, "coords", grid_coords(4, 3, 224).astype(np.int64))
    return path


def cohort(root: Path, prefix: str, n: int, rng: np.random.Generator, no_rna=(), no_slide=()):
    """A sheet (features_path stores, dummy expression files), its raw counts AnnData and the labels."""
    rows, counts, ids = [], [], []
    (root / "rna").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pid, label = f"{prefix}{i:02d}", "ab"[i % 2]
        shift = 1.5 if label == "b" else -1.5
        rna = ""
        if i not in no_rna:
            lam = np.full(N_GENES, 200.0)
            lam[:3] *= np.exp(shift)
            counts.append(rng.poisson(lam))
            ids.append(pid)
            rna = f"rna/{pid}.tsv"
            (root / rna).write_text("placeholder: the test hands the counts over as cohort.zarr\n")
        if i in no_slide:
            rows.append({"patient_id": pid, "slide_id": "", "features_path": "", "label": label,
                         "expression_path": rna})
            continue
        sid = f"{pid}-S0"
        store = feature_store(root / "features" / f"{sid}.zarr", rng.normal(size=(12, 6)) + shift)
        rows.append({"patient_id": pid, "slide_id": sid, "features_path": str(store), "label": label,
                     "expression_path": rna})
    pd.DataFrame(rows).to_csv(root / "samples.tsv", sep="\t", index=False)
    raw = ad.AnnData(X=None, obs=pd.DataFrame(index=pd.Index(ids, name="patient_id")),
                     var=pd.DataFrame(index=pd.Index([f"ENSG{j:011d}" for j in range(N_GENES)], name="gene_id")),
                     layers={"counts": np.array(counts, dtype=np.int32)})
    raw.uns["expression"] = {"values": "counts"}
    write_anndata(raw, root / "cohort.zarr")
    return root / "samples.tsv"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The trained run (gene_only, image_only, late_fusion, linear on every fold) and the new cohort."""
    root = tmp_path_factory.mktemp("deploy")
    rng = np.random.default_rng(0)
    train_sheet = cohort(root / "run", "T", 16, rng)
    sheet = pd.read_csv(train_sheet, sep="\t", dtype=str)
    folds = make_splits(sheet.drop_duplicates("patient_id")[["patient_id", "label"]],
                        SplitParams(n_folds=N_FOLDS, val_fraction=0.2, seed=0))
    folds.to_csv(root / "run" / "folds.tsv", sep="\t", index=False)
    raw = ad.read_zarr(root / "run" / "cohort.zarr")
    for k in range(N_FOLDS):
        write_anndata(normalize_fold(raw, folds, k, NormalizeParams(gene_selection="all")),
                      root / "run" / "expression" / f"fold{k}.zarr")
    for name in ("gene_only", "image_only", "late_fusion", "linear"):
        cfg = method_config(TRAIN_CFG, name)
        for k in range(N_FOLDS):
            data = _run_fold(root, name, k)
            finetune(name, cfg, data, root / "run" / "models" / name / f"fold{k}")
    deploy_sheet = cohort(root / "new", "N", 8, np.random.default_rng(1), no_rna=(0, 3), no_slide=(1, 6))
    return root, deploy_sheet


def _run_fold(root: Path, method: str, fold: int):
    from wsiomics.train.methods import get_method

    return load_inputs(str(root / "run" / "folds.tsv"), str(root / "run" / "samples.tsv"),
                       str(root / "run" / "features"), str(root / "run" / "expression" / f"fold{fold}.zarr"),
                       fold, get_method(method))


def _predict(run, method: str, out: Path, sheet: Path | None = None, **over):
    root, deploy_sheet = run
    sheet = sheet or deploy_sheet
    kwargs = dict(features=root / "new" / "features", expression=root / "new" / "cohort.zarr",
                  fold_expression=root / "run" / "expression", train_features=root / "run" / "features",
                  train_folds=root / "run" / "folds.tsv", train_samples=root / "run" / "samples.tsv")
    kwargs.update(over)
    return predict(method, method_config(TRAIN_CFG, method), root / "run" / "models" / method, N_FOLDS, sheet,
                   out, **kwargs)


def _probs(table: pd.DataFrame) -> list[str]:
    return [c for c in table if c.startswith("prob_")]


@pytest.mark.parametrize("method", ["late_fusion", "linear"])
def test_ensemble_is_the_mean_of_the_fold_models(run, tmp_path, method):
    metrics = _predict(run, method, tmp_path / method)
    table = pd.read_csv(tmp_path / method / "predictions.tsv", sep="\t", keep_default_na=False)
    folds = pd.read_csv(tmp_path / method / "fold_predictions.tsv", sep="\t", keep_default_na=False)
    assert list(table.columns) == ["patient_id", "label", "predicted", "prob_a", "prob_b", "modalities"]
    assert list(folds.columns) == ["patient_id", "fold", "label", "predicted", "prob_a", "prob_b", "modalities"]
    assert sorted(folds["fold"].unique()) == list(range(N_FOLDS)) and len(folds) == N_FOLDS * len(table)
    probs = _probs(table)
    mean = folds.groupby("patient_id")[probs].mean()
    np.testing.assert_allclose(table.set_index("patient_id")[probs].to_numpy(float), mean.to_numpy(float), atol=1e-5)
    assert (table["predicted"] == mean.idxmax(axis=1).str.removeprefix("prob_").to_numpy()).all()
    # the fold models are not all the same model: the mean is a mean of different things
    by_fold = folds.pivot(index="patient_id", columns="fold", values="prob_a")
    assert not np.allclose(by_fold[0], by_fold[1]) and not np.allclose(by_fold[1], by_fold[2])
    assert not np.allclose(by_fold.mean(1), by_fold.median(1))  # three folds: a mean, not a median
    assert metrics["ensemble"]["balanced_accuracy"] >= 0.75  # the label is a strong shift in both modalities
    assert set(metrics["ensemble"]["by_modalities"]) == {"image+gene", "image", "gene"}
    assert json.loads((tmp_path / method / "metrics.json").read_text())["n_patients"] == 8


@pytest.mark.parametrize("method", ["late_fusion", "image_only", "linear"])
def test_deploying_to_the_run_cohort_reproduces_each_folds_test_predictions(run, tmp_path, method):
    """The fold models as deployed (a network from model.pt; linear refitted on the fold's training patients)
    are the models the run evaluated: on the run's own cohort, each fold's predictions of its test patients equal
    the run's predictions.tsv."""
    root, _ = run
    _predict(run, method, tmp_path, sheet=root / "run" / "samples.tsv", features=root / "run" / "features",
             expression=root / "run" / "cohort.zarr")
    assert_reproduces_fold_tests(tmp_path / "fold_predictions.tsv", root / "run" / "models" / method)


def assert_reproduces_fold_tests(fold_predictions: Path, models: Path) -> None:
    """Each fold's deployed predictions of its test patients equal the run's ``predictions.tsv`` of that fold."""
    ours = pd.read_csv(fold_predictions, sep="\t", keep_default_na=False)
    for k in range(N_FOLDS):
        theirs = pd.read_csv(models / f"fold{k}" / "predictions.tsv", sep="\t")
        theirs = theirs[theirs["role"] == "test"].set_index("patient_id")
        mine = ours[ours["fold"] == k].set_index("patient_id").loc[theirs.index]
        np.testing.assert_allclose(mine[_probs(theirs)].to_numpy(float), theirs[_probs(theirs)].to_numpy(float),
                                   atol=2e-6)
        assert (mine["predicted"] == theirs["predicted"]).all()


def test_a_fine_tuned_ensemble_of_members_deploys_as_the_run_evaluated_it(run, tmp_path):
    """``finetune.members: 2`` saves a MeanEnsemble in model.pt; deploy rebuilds both members (it used to build
    one network and fail on the ensemble's weights) and reproduces the run's test predictions."""
    import copy

    root, _ = run
    cfg = copy.deepcopy(method_config(TRAIN_CFG, "late_fusion"))
    cfg["finetune"]["members"] = 2
    models = tmp_path / "run_models" / "late_fusion"
    for k in range(N_FOLDS):
        finetune("late_fusion", cfg, _run_fold(root, "late_fusion", k), models / f"fold{k}")
    out = tmp_path / "deploy"
    predict("late_fusion", cfg, models, N_FOLDS, root / "run" / "samples.tsv", out, features=root / "run" / "features",
            expression=root / "run" / "cohort.zarr", fold_expression=root / "run" / "expression",
            train_features=root / "run" / "features", train_folds=root / "run" / "folds.tsv",
            train_samples=root / "run" / "samples.tsv")
    assert_reproduces_fold_tests(out / "fold_predictions.tsv", models)


def test_a_refitted_baseline_reads_the_new_cohorts_slides_when_their_ids_are_the_runs(run, tmp_path):
    """cca reads the run's training patients and the deploy patients in one dataset: a deploy cohort whose
    patient and slide ids repeat the run's (another hospital's numbering) is predicted from its own features."""
    root, _ = run
    same_ids = cohort(tmp_path / "same", "T", 8, np.random.default_rng(1), no_rna=(0, 3), no_slide=(1, 6))
    own_ids = cohort(tmp_path / "own", "N", 8, np.random.default_rng(1), no_rna=(0, 3), no_slide=(1, 6))
    tables = []
    for sheet in (same_ids, own_ids):
        _predict(run, "cca", sheet.parent / "out", sheet=sheet, features=sheet.parent / "features",
                 expression=sheet.parent / "cohort.zarr")
        table = pd.read_csv(sheet.parent / "out" / "fold_predictions.tsv", sep="\t", keep_default_na=False)
        tables.append(table.assign(patient_id=table["patient_id"].str[1:]).set_index(["fold", "patient_id"]))
    probs = _probs(tables[0])
    np.testing.assert_allclose(tables[0][probs].to_numpy(float), tables[1].loc[tables[0].index, probs].to_numpy(float),
                               atol=1e-9)


def test_cca_refitted_for_deployment_is_the_runs_own_with_unlabelled_patients(tmp_path):
    """cca fits its projections on the fold's train and unlabelled patients (train.pretrain.pool: all): the
    deploy refit keeps the unlabelled ones too, so on the run's own cohort it predicts as the run did."""
    from wsiomics.train.methods import get_method

    rng = np.random.default_rng(3)
    sheet = cohort(tmp_path / "run", "U", 20, rng)
    rows = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    rows.loc[rows["patient_id"].isin(["U16", "U17", "U18", "U19"]), "label"] = ""  # unlabelled: pretraining only
    rows.to_csv(sheet, sep="\t", index=False)
    folds = make_splits(rows[["patient_id", "label"]], SplitParams(n_folds=N_FOLDS, val_fraction=0.2, seed=0))
    assert (folds["role"] == "unlabelled").any()
    folds.to_csv(tmp_path / "run" / "folds.tsv", sep="\t", index=False)
    raw = ad.read_zarr(tmp_path / "run" / "cohort.zarr")
    cfg = method_config(TRAIN_CFG, "cca")
    for k in range(N_FOLDS):
        write_anndata(normalize_fold(raw, folds, k, NormalizeParams(gene_selection="all")),
                      tmp_path / "run" / "expression" / f"fold{k}.zarr")
        data = load_inputs(str(tmp_path / "run" / "folds.tsv"), str(sheet), str(tmp_path / "run" / "features"),
                           str(tmp_path / "run" / "expression" / f"fold{k}.zarr"), k, get_method("cca"))
        finetune("cca", cfg, data, tmp_path / "run" / "models" / "cca" / f"fold{k}")
    run = tmp_path / "run"
    predict("cca", cfg, run / "models" / "cca", N_FOLDS, sheet, tmp_path / "out", features=run / "features",
            expression=run / "cohort.zarr", fold_expression=run / "expression", train_features=run / "features",
            train_folds=run / "folds.tsv", train_samples=sheet)
    ours = pd.read_csv(tmp_path / "out" / "fold_predictions.tsv", sep="\t", keep_default_na=False)
    for k in range(N_FOLDS):
        theirs = pd.read_csv(run / "models" / "cca" / f"fold{k}" / "predictions.tsv", sep="\t")
        theirs = theirs[theirs["role"] == "test"].set_index("patient_id")
        mine = ours[ours["fold"] == k].set_index("patient_id").loc[theirs.index]
        np.testing.assert_allclose(mine[_probs(theirs)].to_numpy(float), theirs[_probs(theirs)].to_numpy(float),
                                   atol=1e-6)


def test_ensemble_averages_only_the_folds_that_predicted():
    folds = pd.DataFrame({"patient_id": ["A", "A", "B", "B"], "fold": [0, 1, 0, 1], "label": ["x", "x", "y", "y"],
                          "predicted": ["x", "y", "", ""], "prob_x": [0.9, 0.3, np.nan, np.nan],
                          "prob_y": [0.1, 0.7, np.nan, np.nan], "modalities": ["gene", "gene", "", ""]})
    table = ensemble(folds, ["x", "y"]).set_index("patient_id")
    assert table.loc["A", "prob_x"] == pytest.approx(0.6) and table.loc["A", "predicted"] == "x"
    assert np.isnan(table.loc["B", "prob_x"])
    assert table.loc["B", "predicted"] == "" and table.loc["B", "modalities"] == ""


def test_modality_fallbacks(run, tmp_path):
    """Without RNA: image only; without slides: genes only; a single-modality method lists the patients it
    cannot predict with empty probabilities."""
    outs = {}
    for method in ("late_fusion", "image_only", "gene_only", "linear"):
        _predict(run, method, tmp_path / method)
        outs[method] = pd.read_csv(tmp_path / method / "predictions.tsv", sep="\t", keep_default_na=False,
                                   index_col="patient_id")
    expected = {"N00": "image", "N03": "image", "N01": "gene", "N06": "gene"}
    for method in ("late_fusion", "linear"):
        got = outs[method]["modalities"].to_dict()
        assert got == {p: expected.get(p, "image+gene") for p in got}
    image_only, gene_only = outs["image_only"], outs["gene_only"]
    assert (image_only.loc[["N01", "N06"], "prob_a"] == "").all() and (image_only.loc[["N01", "N06"], "predicted"]
                                                                       == "").all()
    assert set(image_only.drop(["N01", "N06"])["modalities"]) == {"image"}
    assert (gene_only.loc[["N00", "N03"], "modalities"] == "").all()
    assert set(gene_only.drop(["N00", "N03"])["modalities"]) == {"gene"}
    # attention maps of the deploy slides (network methods), per fold
    assert sorted(p.name for p in (tmp_path / "image_only" / "attention" / "fold0").iterdir()) == sorted(
        f"N{i:02d}-S0.zarr" for i in range(8) if i not in (1, 6))


def test_deploy_genes_use_each_folds_training_transform(run, tmp_path):
    """The deploy cohort's RNA is z-scored with the fold's fitted means/stds (training patients), not its own."""
    from wsiomics.train.deploy import fold_genes

    root, _ = run
    raw = ad.read_zarr(root / "new" / "cohort.zarr")
    genes, _ = fold_genes(raw, root / "run" / "expression" / "fold0.zarr")
    fitted = ad.read_zarr(root / "run" / "expression" / "fold0.zarr").uns["normalization"]
    x = np.asarray(raw.layers["counts"], float)
    lognorm = np.log1p(x / x.sum(1, keepdims=True) * 1e6)
    np.testing.assert_allclose(genes.to_numpy(), (lognorm - fitted["means"]) / fitted["stds"], rtol=1e-4, atol=1e-4)
    assert not np.allclose(genes.to_numpy().mean(0), 0.0, atol=1e-3)  # not re-centred on the new cohort


@pytest.mark.parametrize("attr, value, named", [
    ("encoder", "uni_v1", "encoder"),
    ("weights", {"source": "hub", "name": "toy", "sha256": "cd" * 32}, "weights_sha256"),
    ("weights", {"source": "random", "name": "", "sha256": None}, "weights_sha256"),
    ("target_mpp", 0.25, "target_mpp"),
])
def test_features_of_another_encoder_are_refused(run, tmp_path, attr, value, named):
    root, sheet = run
    other = tmp_path / "features"
    for store in sorted((root / "new" / "features").glob("*.zarr")):
        feats = zarr.open_array(f"{store}/features", mode="r")[:].astype(np.float32)
        feature_store(other / store.name, feats, **{attr: value})
    with pytest.raises(DeployError) as e:
        _predict(run, "image_only", tmp_path / "out", features=other)
    message = str(e.value)
    assert named in message and str(root / "run" / "features") in message and str(other) in message
    shown = value["sha256"] if attr == "weights" else value  # random weights: None against the run's digest
    trained = IDENTITY["weights"]["sha256"] if attr == "weights" else IDENTITY[attr]
    assert repr(shown) in message and repr(trained) in message
    assert not (tmp_path / "out" / "predictions.tsv").exists()


def test_cli_refuses_a_mismatched_encoder_with_the_message(run, tmp_path, capsys):
    root, sheet = run
    other = tmp_path / "features"
    for store in sorted((root / "new" / "features").glob("*.zarr")):
        feature_store(other / store.name, zarr.open_array(f"{store}/features", mode="r")[:].astype(np.float32),
                      encoder="conch_v1")
    rc = train_main(["predict", "--method", "image_only", "--models-dir", str(root / "run" / "models" / "image_only"),
                     "--n-folds", str(N_FOLDS), "--samples", str(sheet), "--features", str(other),
                     "--train-features", str(root / "run" / "features"), "--config",
                     json.dumps(method_config(TRAIN_CFG, "image_only")), "--out-dir", str(tmp_path / "out")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "conch_v1" in err and "toy_encoder" in err


def test_rule_predict_in_a_dry_run_with_deploy_set(tmp_path):
    """With deploy set, the default target asks for every classification method's predictions and every
    segmentation method's tumour maps, made by rules predict and predict_tumour from the new cohort's own tiles
    and features (results/deploy/<name>/...), whose slide ids are the run's own (another seed of the generator):
    no collision."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    small = ["--n-patients", "4", "--slide-width-um", "600", "--slide-height-um", "500", "--n-genes", "50"]
    for name, seed in (("run_cohort", "0"), ("hospital", "2")):
        subprocess.run([sys.executable, "-m", "wsiomics.synth", "--out", str(tmp_path / name), *small, "--seed", seed,
                        "--genome-seed", "0"], check=True, env=env, capture_output=True)
    overlay = tmp_path / "deploy.yaml"
    overlay.write_text(f"samples: {tmp_path / 'run_cohort' / 'samples.tsv'}\nsplits:\n  n_folds: 2\n"
                       f"deploy:\n  name: hospital\n  samples: {tmp_path / 'hospital' / 'samples.tsv'}\n"
                       "train:\n  run: [linear, image_only, mgi_seg]\n")
    work = tmp_path / "work"
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
                           "--configfile", str(overlay), "-n", "-p", "-c1"], env=env, capture_output=True, text=True)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    predicts = [line for line in text.splitlines() if "python -m wsiomics.train predict" in line]
    assert sorted(line.split("--method ")[1].split()[0] for line in predicts) == ["image_only", "linear", "mgi_seg"]
    seg = next(line for line in predicts if "--method mgi_seg" in line)
    assert "--out-dir results/deploy/hospital/mgi_seg" in seg and "--models-dir results/models/mgi_seg" in seg
    assert "--expression results/deploy/hospital/expression/cohort.zarr" in seg
    assert "rule predict_tumour:" in text and "results/deploy/hospital/mgi_seg/tumour_slides.tsv" in text
    linear = next(line for line in predicts if "--method linear" in line)
    assert "--fold-expression results/expression" in linear and "--train-folds results/splits/folds.tsv" in linear
    assert "--expression results/deploy/hospital/expression/cohort.zarr" in linear
    assert "--features results/deploy/hospital/features/resnet50_trunc" in linear
    slide = "TCGA-SY-0001-01Z-00-DX1"  # in both cohorts: its deploy tiles and features are stores of their own
    assert f"--out results/deploy/hospital/tiles/{slide}.zarr" in text
    assert f"--out results/deploy/hospital/features/resnet50_trunc/{slide}.zarr" in text
    assert f"--out results/tiles/{slide}.zarr" in text
    assert str(tmp_path / "hospital" / "slides") in text and "expression cohort --samples" in text


def test_rule_predict_risks_deploys_the_survival_networks_in_a_dry_run(tmp_path):
    """With deploy set and survival methods in train.run, the default target asks for each survival network's
    risks.tsv (rule predict_risks, after the fold's risks.tsv); coxph, a refitted baseline, is not deployed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    small = ["--n-patients", "8", "--slide-width-um", "600", "--slide-height-um", "500", "--n-genes", "50"]
    for name, seed in (("run_cohort", "0"), ("hospital", "2")):
        subprocess.run([sys.executable, "-m", "wsiomics.synth", "--out", str(tmp_path / name), *small, "--seed", seed,
                        "--genome-seed", "0", "--survival"], check=True, env=env, capture_output=True)
    overlay = tmp_path / "deploy.yaml"
    overlay.write_text(f"samples: {tmp_path / 'run_cohort' / 'samples.tsv'}\nsplits:\n  n_folds: 2\n"
                       f"deploy:\n  name: hospital\n  samples: {tmp_path / 'hospital' / 'samples.tsv'}\n"
                       "train:\n  run: [late_fusion_survival, coxph]\n")
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                           str(tmp_path / "work"), "--configfile", str(overlay), "-n", "-p", "-c1"], env=env,
                          capture_output=True, text=True)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    predicts = [line for line in text.splitlines() if "python -m wsiomics.train predict" in line]
    assert [line.split("--method ")[1].split()[0] for line in predicts] == ["late_fusion_survival"]
    assert "rule predict_risks:" in text and "results/deploy/hospital/late_fusion_survival/risks.tsv" in text


def test_deploy_name_without_samples_is_refused(tmp_path):
    overlay = tmp_path / "deploy.yaml"
    overlay.write_text("deploy:\n  name: hospital\n")
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                           str(tmp_path / "work"), "--configfile", str(overlay), "-n", "-c1"],
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
    assert done.returncode != 0
    assert "deploy: name ('hospital') and samples ('') go together" in done.stdout + done.stderr


# ---------------------------------------------------------------- segmentation: tumour maps of the deploy slides


def seg_cohort(root: Path, prefix: str, n: int, rng: np.random.Generator, annotated: int) -> Path:
    """One slide per patient on a 4 x 3 tile grid; the left two tile columns are tumour (their features shifted)
    and the first ``annotated`` slides say so in a GeoJSON annotation."""
    from shapely.geometry import box, mapping

    rows = []
    tumour = grid_coords(4, 3, 224)[:, 0] < 448
    for i in range(n):
        pid = f"{prefix}{i:02d}"
        sid = f"{pid}-S0"
        store = feature_store(root / "features" / f"{sid}.zarr", rng.normal(size=(12, 6)) + 2.5 * tumour[:, None])
        note = ""
        if i < annotated:
            note = str(root / "annotations" / f"{sid}.geojson")
            Path(note).parent.mkdir(parents=True, exist_ok=True)
            Path(note).write_text(json.dumps({"type": "FeatureCollection", "features": [
                {"type": "Feature", "geometry": mapping(box(0, 0, 448, 672)),
                 "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
        rows.append({"patient_id": pid, "slide_id": sid, "features_path": str(store), "label": "ab"[i % 2],
                     "annotation_path": note, "expression_path": ""})
    pd.DataFrame(rows).to_csv(root / "samples.tsv", sep="\t", index=False)
    return root / "samples.tsv"


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """image_seg fine-tuned on every fold of a 12-patient run; a new cohort of 5 slides, 3 of them annotated."""
    from test_segmentation import CFG as SEG_CFG

    from wsiomics.train.methods import get_method

    root = tmp_path_factory.mktemp("deploy_seg")
    sheet = seg_cohort(root / "run", "T", 12, np.random.default_rng(0), annotated=12)
    rows = pd.read_csv(sheet, sep="\t", dtype=str)
    folds = make_splits(rows[["patient_id", "label"]], SplitParams(n_folds=N_FOLDS, val_fraction=0.2, seed=0))
    folds.to_csv(root / "run" / "folds.tsv", sep="\t", index=False)
    cfg = method_config(SEG_CFG, "image_seg")
    for k in range(N_FOLDS):
        data = load_inputs(str(root / "run" / "folds.tsv"), str(sheet), str(root / "run" / "features"), None, k,
                           get_method("image_seg"))
        finetune("image_seg", cfg, data, root / "run" / "models" / "image_seg" / f"fold{k}", samples=str(sheet))
    new = seg_cohort(root / "new", "N", 5, np.random.default_rng(1), annotated=3)
    return root, cfg, new


def _tumour(path: Path) -> np.ndarray:
    return zarr.open_group(path, mode="r")["tumour_prob"][:]


def test_segmentation_deploys_the_fold_ensembles_tumour_maps(seg_run, tmp_path):
    """Every deploy slide gets the fine-tune's tumour map (zarr + PNG) of the mean over the fold models'
    probabilities, a row in tumour_slides.tsv, and Dice where the deploy sheet annotates it."""
    root, cfg, sheet = seg_run
    common = dict(features=root / "new" / "features", train_features=root / "run" / "features")
    metrics = predict("image_seg", cfg, root / "run" / "models" / "image_seg", N_FOLDS, sheet, tmp_path / "all",
                      **common)
    slides = [f"N{i:02d}-S0" for i in range(5)]
    assert sorted(p.stem for p in (tmp_path / "all" / "tumour").glob("*.png")) == slides
    per_fold = []
    for k in range(N_FOLDS):  # each fold model alone: a models folder whose only fold is fold k
        alone = tmp_path / f"alone{k}"
        (alone / "fold0").mkdir(parents=True)
        (alone / "fold0" / "model.pt").symlink_to(root / "run" / "models" / "image_seg" / f"fold{k}" / "model.pt")
        predict("image_seg", cfg, alone, 1, sheet, tmp_path / f"out{k}", **common)
        per_fold.append([_tumour(tmp_path / f"out{k}" / "tumour" / f"{s}.zarr") for s in slides])
    for i, s in enumerate(slides):
        ensemble_map = _tumour(tmp_path / "all" / "tumour" / f"{s}.zarr")
        np.testing.assert_allclose(ensemble_map, np.mean([f[i] for f in per_fold], axis=0), atol=1e-6)
    assert not np.allclose(per_fold[0][0], per_fold[1][0])  # three models, not one
    ens = metrics["ensemble"]
    assert sorted(ens["dice_per_slide"]) == slides[:3] and ens["skipped_slides"] == slides[3:]
    assert ens["dice_mean"] > 0.8  # the tumour tiles are a strong shift
    assert set(metrics["folds"]) == {str(k) for k in range(N_FOLDS)}
    table = pd.read_csv(tmp_path / "all" / "tumour_slides.tsv", sep="\t", keep_default_na=False)
    assert table["slide_id"].tolist() == slides and (table["modalities"] == "image").all()
    assert table["dice"].iloc[3:].eq("").all() and (table["n_tiles"] == 12).all()
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["n_slides"] == 5


def test_deployed_tumour_maps_of_the_run_cohort_are_the_runs_own(seg_run, tmp_path):
    """Fold 0's model deployed to the run's own slides maps fold 0's test slides exactly as the run did."""
    root, cfg, _ = seg_run
    predict("image_seg", cfg, root / "run" / "models" / "image_seg", 1, root / "run" / "samples.tsv", tmp_path,
            features=root / "run" / "features", train_features=root / "run" / "features")
    theirs = sorted((root / "run" / "models" / "image_seg" / "fold0" / "tumour").glob("*.zarr"))
    assert theirs
    for store in theirs:
        np.testing.assert_allclose(_tumour(tmp_path / "tumour" / store.name), _tumour(store), atol=1e-6)
        assert (zarr.open_group(tmp_path / "tumour" / store.name, mode="r")["coords"][:]
                == zarr.open_group(store, mode="r")["coords"][:]).all()


# ---------------------------------------------------------------- survival: the ensemble risk of the deploy patients


def _with_follow_up(sheet: Path, rng: np.random.Generator) -> pd.DataFrame:
    """time and event columns for the sheet: label b dies sooner. Returns the outcomes per patient."""
    rows = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    pts = rows.drop_duplicates("patient_id").set_index("patient_id")
    time = {p: float(np.round(rng.exponential(200.0 if pts.at[p, "label"] == "b" else 900.0))) + 1 for p in pts.index}
    event = {p: int(i % 4 != 3) for i, p in enumerate(pts.index)}
    rows["time"], rows["event"] = rows["patient_id"].map(time), rows["patient_id"].map(event)
    rows.to_csv(sheet, sep="\t", index=False)
    return pd.DataFrame({"time": time, "event": event}).rename_axis("patient_id")


@pytest.fixture(scope="module")
def surv_run(run, tmp_path_factory):
    """late_fusion_survival (Cox head) fine-tuned on every fold of the deploy run's cohort, with follow-up."""
    root, _ = run
    cfg = method_config({**TRAIN_CFG, "survival": {"loss": "cox", "n_bins": 4}}, "late_fusion_survival")
    models = tmp_path_factory.mktemp("surv") / "late_fusion_survival"
    outcomes = pd.read_csv(root / "run" / "samples.tsv", sep="\t", dtype=str)["patient_id"].drop_duplicates()
    rng = np.random.default_rng(5)
    labels = {p: "ab"[int(p[1:]) % 2] for p in outcomes}
    outcomes = pd.DataFrame({"time": [float(np.round(rng.exponential(200.0 if labels[p] == "b" else 900.0))) + 1
                                      for p in outcomes], "event": 1}, index=pd.Index(outcomes, name="patient_id"))
    for k in range(N_FOLDS):
        finetune("late_fusion_survival", cfg, _run_fold(root, "late_fusion_survival", k), models / f"fold{k}",
                 outcomes=outcomes)
    return cfg, models


def test_survival_deploys_the_mean_risk_percentile_over_the_folds(run, surv_run, tmp_path):
    """Each fold's risk is placed among its fitted patients' risks (the run's risks.tsv); the ensemble risk is
    the mean of those places; c-index where the deploy sheet has follow-up; modalities as classification."""
    from scipy.stats import percentileofscore

    root, _ = run
    cfg, models = surv_run
    sheet = root / "new" / "samples_follow_up.tsv"  # beside the deploy sheet: its relative paths hold
    sheet.write_text((root / "new" / "samples.tsv").read_text())
    _with_follow_up(sheet, np.random.default_rng(6))
    metrics = predict("late_fusion_survival", cfg, models, N_FOLDS, sheet, tmp_path / "out",
                      features=root / "new" / "features", expression=root / "new" / "cohort.zarr",
                      fold_expression=root / "run" / "expression", train_features=root / "run" / "features")
    table = pd.read_csv(tmp_path / "out" / "risks.tsv", sep="\t", keep_default_na=False).set_index("patient_id")
    folds = pd.read_csv(tmp_path / "out" / "fold_risks.tsv", sep="\t")
    assert list(table.columns) == ["risk", "time", "event", "modalities"]
    expected = {}
    for k, part in folds.groupby("fold"):
        ref = pd.read_csv(models / f"fold{k}" / "risks.tsv", sep="\t")
        ref = ref.loc[ref["role"].isin(["train", "val"]), "risk"].to_numpy(float)
        for pid, risk in zip(part["patient_id"], part["risk"], strict=True):
            expected.setdefault(pid, []).append(percentileofscore(ref, risk, kind="mean") / 100.0)
    for pid, values in expected.items():
        assert float(table.at[pid, "risk"]) == pytest.approx(np.mean(values), abs=1e-5)
    assert table.loc[["N00", "N03"], "modalities"].tolist() == ["image", "image"]  # no RNA
    assert table.loc[["N01", "N06"], "modalities"].tolist() == ["gene", "gene"]  # no slides
    assert metrics["ensemble"]["n_test"] == 8 and metrics["ensemble"]["c_index"] is not None
    assert set(metrics["folds"]) == {str(k) for k in range(N_FOLDS)}
    assert set(metrics["ensemble"]["by_modalities"]) == {"image+gene", "image", "gene"}


def test_deployed_survival_risks_of_the_run_cohort_are_the_runs_own(run, surv_run, tmp_path):
    root, _ = run
    cfg, models = surv_run
    predict("late_fusion_survival", cfg, models, N_FOLDS, root / "run" / "samples.tsv", tmp_path,
            features=root / "run" / "features", expression=root / "run" / "cohort.zarr",
            fold_expression=root / "run" / "expression", train_features=root / "run" / "features")
    ours = pd.read_csv(tmp_path / "fold_risks.tsv", sep="\t")
    for k in range(N_FOLDS):
        theirs = pd.read_csv(models / f"fold{k}" / "risks.tsv", sep="\t").set_index("patient_id")
        mine = ours[ours["fold"] == k].set_index("patient_id").loc[theirs.index]
        np.testing.assert_allclose(mine["risk"].to_numpy(float), theirs["risk"].to_numpy(float), rtol=1e-5,
                                   atol=1e-6)
    table = pd.read_csv(tmp_path / "risks.tsv", sep="\t")
    assert table["time"].isna().all() and "ensemble" not in json.loads((tmp_path / "metrics.json").read_text())
