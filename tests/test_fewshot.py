"""The few-shot protocol: seeded class-balanced draws from training patients only, the probe on a hand-checkable
case, the fold stage on a tiny cohort (pretrained, untrained, pooled), the summary's CI and the curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_train import TRAIN_CFG, _data, cohort  # noqa: F401  (cohort: the module fixture)
from test_train_workflow import dry_run, sheet  # noqa: F401  (sheet: the module fixture)

from wsiomics.fewshot import (
    FEWSHOT_COLUMNS,
    SUMMARY_COLUMNS,
    FewshotParams,
    draw_patients,
    fewshot_table,
    probe_scores,
    read_tables,
    summarize,
    write_summary,
)

ROLES = ["train"] * 12 + ["val"] * 4 + ["test"] * 6 + ["unlabelled"] * 3 + ["heldout"] * 2


def _cohort(seed: int = 0):
    """27 patients of 2 classes; the train role holds 6 of each (plus one unlabelled), the other roles some of
    both. Embedding ``signal``: the class plus noise; ``noise``: noise only."""
    rng = np.random.default_rng(seed)
    labels = ["a", "b"] * 6 + ["a", "b"] * 2 + ["a", "b"] * 3 + ["a", "b", "a"] + ["a", "b"]
    labels = [*labels]
    roles = list(ROLES)
    labels[11], roles[11] = "", "train"  # a training patient without a label
    y = np.array([1.0 if v == "b" else -1.0 if v == "a" else 0.0 for v in labels])
    signal = np.stack([y * 2 + rng.normal(0, 0.3, len(y)), rng.normal(size=len(y))], 1)
    noise = rng.normal(size=(len(y), 3))
    return labels, roles, {"signal": signal, "noise": noise}


def test_draws_are_seeded_class_balanced_and_from_labelled_training_patients_only():
    labels, roles, _ = _cohort()
    labels_arr = np.array(labels, dtype=object)
    pool = (np.array(roles) == "train") & (labels_arr != "")
    first = draw_patients(labels, pool, ["a", "b"], 3, 0, seed=7)
    assert np.array_equal(first, draw_patients(labels, pool, ["a", "b"], 3, 0, seed=7))  # reproducible
    others = {tuple(draw_patients(labels, pool, ["a", "b"], 3, d, seed=7)) for d in range(10)}
    assert len(others) > 3  # draws differ from each other
    assert not np.array_equal(first, draw_patients(labels, pool, ["a", "b"], 3, 0, seed=8))  # the seed matters
    for d in range(10):
        idx = draw_patients(labels, pool, ["a", "b"], 3, d, seed=7)
        assert sorted(labels_arr[idx]) == ["a"] * 3 + ["b"] * 3  # class-balanced
        assert set(np.array(roles)[idx]) == {"train"} and "" not in set(labels_arr[idx])
        assert len(set(idx)) == 6  # without replacement
    # class b has 5 labelled training patients (one of its 6 lost its label): k = 6 cannot be drawn
    assert draw_patients(labels, pool, ["a", "b"], 5, 0, seed=7) is not None
    assert draw_patients(labels, pool, ["a", "b"], 6, 0, seed=7) is None


def test_table_draws_from_training_patients_only_whatever_the_other_roles_hold():
    """Swapping the embeddings of every non-train patient except the test ones (val, unlabelled, heldout) for
    garbage, or giving them labels, changes nothing: they never enter a draw."""
    labels, roles, emb = _cohort()
    params = FewshotParams(k=(1, 2, 4), draws=3)
    base = fewshot_table(emb, labels, roles, params, seed=0)
    assert list(base.columns) == FEWSHOT_COLUMNS
    other = np.isin(roles, ["val", "unlabelled", "heldout"])
    rng = np.random.default_rng(5)
    changed = {name: np.where(other[:, None], rng.normal(50, 10, size=x.shape), x) for name, x in emb.items()}
    labels2 = ["b" if o else v for v, o in zip(labels, other, strict=True)]
    pd.testing.assert_frame_equal(base, fewshot_table(changed, labels2, roles, params, seed=0))
    # but the training patients do matter
    train = np.array(roles) == "train"
    moved = {name: np.where(train[:, None], rng.normal(size=x.shape), x) for name, x in emb.items()}
    assert not fewshot_table(moved, labels, roles, params, seed=0)["balanced_accuracy"].equals(
        base["balanced_accuracy"])


def test_table_rows_counts_and_the_signal_beats_noise():
    labels, roles, emb = _cohort()
    table = fewshot_table(emb, labels, roles, FewshotParams(k=(1, 2, 4, 8), draws=5), seed=0)
    # k = 8 is skipped: class b has 5 labelled training patients
    assert sorted(table["k"].unique()) == [1, 2, 4]
    assert len(table) == 3 * 5 * 2
    assert (table["n_train"] == 2 * table["k"]).all() and (table["n_test"] == 6).all()
    assert set(table["embedding"]) == {"signal", "noise"} and set(table["draw"]) == set(range(5))
    means = table.groupby(["embedding", "k"])["balanced_accuracy"].mean()
    assert means["signal", 4] > 0.95 and means["noise", 4] < 0.75
    assert means["signal"].mean() > means["noise"].mean() + 0.2
    assert table.equals(fewshot_table(emb, labels, roles, FewshotParams(k=(1, 2, 4, 8), draws=5), seed=0))


def test_patients_without_every_embedding_are_left_out_of_draws_and_test():
    labels, roles, emb = _cohort()
    emb = {k: v.copy() for k, v in emb.items()}
    emb["noise"][12 + 4] = np.nan  # the first test patient lacks an embedding
    table = fewshot_table(emb, labels, roles, FewshotParams(k=(1,), draws=2), seed=0)
    assert (table["n_test"] == 5).all()


def test_probe_scores_a_hand_checkable_case():
    """One dimension, class a below zero and b above: the probe's boundary lies between the two training
    points, so every test point on the right side is right (1.0), the reversed labels all wrong (0.0)."""
    x_train = np.array([[-1.0], [1.0]])
    x_test = np.array([[-3.0], [-0.5], [0.5], [3.0]])
    right = probe_scores(x_train, ["a", "b"], x_test, ["a", "a", "b", "b"], ["a", "b"])
    assert right["balanced_accuracy"] == 1.0 and right["auc_macro"] == 1.0 and right["n_test"] == 4
    wrong = probe_scores(x_train, ["a", "b"], x_test, ["b", "b", "a", "a"], ["a", "b"])
    assert wrong["balanced_accuracy"] == 0.0 and wrong["auc_macro"] == 0.0
    # half: the outer two right, the inner two wrong -> balanced accuracy 0.5; AUC ranks 3 of 4 pairs right
    half = probe_scores(x_train, ["a", "b"], x_test, ["a", "b", "a", "b"], ["a", "b"])
    assert half["balanced_accuracy"] == 0.5 and half["auc_macro"] == 0.75


def test_bad_inputs_are_clear_errors():
    labels, roles, emb = _cohort()
    with pytest.raises(ValueError, match="embedding 'signal' has shape"):
        fewshot_table({"signal": emb["signal"][:5]}, labels, roles, FewshotParams(), seed=0)
    with pytest.raises(ValueError, match="at least 1 patient per class"):
        FewshotParams(k=(0, 2))
    with pytest.raises(ValueError, match="draws"):
        FewshotParams(draws=0)
    assert FewshotParams(k=("1", "4")).k == (1, 4)  # from the command line's comma-separated list


def _fold_table(tmp_path, method, fold, values):
    rows = [{"k": k, "draw": d, "embedding": e, "balanced_accuracy": v, "auc_macro": v, "n_train": 2 * k,
             "n_test": 6} for (k, d, e), v in values.items()]
    path = tmp_path / "models" / method / f"fold{fold}" / "fewshot.tsv"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows, columns=FEWSHOT_COLUMNS).to_csv(path, sep="\t", index=False)
    return path


def test_summary_pools_folds_and_draws_with_a_t_interval_and_draws_the_curves(tmp_path):
    a = _fold_table(tmp_path, "gimp", 0, {(1, 0, "image"): 0.5, (1, 1, "image"): 0.7, (2, 0, "image"): 0.9,
                                          (1, 0, "pooled_features"): 0.6})
    b = _fold_table(tmp_path, "gimp", 1, {(1, 0, "image"): 0.6, (1, 1, "image"): 0.8, (2, 0, "image"): 1.0,
                                          (1, 0, "pooled_features"): 0.6})
    summary = summarize(read_tables([a, b]))
    assert list(summary.columns) == SUMMARY_COLUMNS
    row = summary[(summary["embedding"] == "image") & (summary["k"] == 1)].iloc[0]
    # values 0.5, 0.7, 0.6, 0.8: mean 0.65, sd 0.129099, t(0.975, 3) = 3.182446 -> half-width 0.205426
    assert row["n"] == 4 and row["n_folds"] == 2 and row["n_train_mean"] == 2
    assert row["balanced_accuracy_mean"] == pytest.approx(0.65)
    assert row["balanced_accuracy_ci_low"] == pytest.approx(0.65 - 0.205426, abs=1e-5)
    assert row["balanced_accuracy_ci_high"] == pytest.approx(0.65 + 0.205426, abs=1e-5)
    same = summary[summary["embedding"] == "pooled_features"].iloc[0]  # no spread: a zero-width interval
    assert same["balanced_accuracy_ci_low"] == pytest.approx(0.6) == same["balanced_accuracy_ci_high"]
    assert list(summary["embedding"]) == ["image", "image", "pooled_features"]  # the documented order, then k
    write_summary([a, b], tmp_path / "fewshot")
    assert (tmp_path / "fewshot" / "curves.png").stat().st_size > 5000
    assert (tmp_path / "fewshot" / "curves.svg").read_text().lstrip().startswith("<?xml")
    assert len(pd.read_csv(tmp_path / "fewshot" / "summary.tsv", sep="\t")) == 3


def test_a_table_from_elsewhere_is_a_clear_error(tmp_path):
    path = tmp_path / "gimp" / "fold0" / "fewshot.tsv"
    path.parent.mkdir(parents=True)
    pd.DataFrame({"k": [1]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match="columns .* missing"):
        read_tables([path])
    with pytest.raises(ValueError, match="expected results/models"):
        read_tables([tmp_path / "gimp" / "fewshot.tsv"])


def test_probe_standardises_with_every_training_patient_not_the_two_drawn():
    """At k = 1 a dimension on which the two drawn patients happen to agree (dim 1: ±0.01) would be blown up to
    the size of the one that tells the classes apart (dim 0: ±1) by their own statistics; the fold's training
    patients (std 1 on both) keep it small, and the test point is classed by dim 0."""
    x_train, x_test = np.array([[-1.0, 0.01], [1.0, -0.01]]), np.array([[-0.5, -0.05], [0.5, 0.05]])
    population = np.random.default_rng(0).normal(size=(200, 2))
    own = probe_scores(x_train, ["a", "b"], x_test, ["a", "b"], ["a", "b"])
    fold = probe_scores(x_train, ["a", "b"], x_test, ["a", "b"], ["a", "b"], x_scale=population)
    assert own["balanced_accuracy"] == 0.0 and fold["balanced_accuracy"] == 1.0


# ---------------------------------------------------------------- the stage on a tiny on-disk cohort


@pytest.fixture(scope="module")
def pretrained(cohort, tmp_path_factory):  # noqa: F811
    """gimp and mgi_mlp_genes pretrained on the tiny cohort, for 1 and for 2 epochs."""
    from wsiomics.train.methods import deep_merge, method_config
    from wsiomics.train.stages import pretrain

    root = tmp_path_factory.mktemp("fewshot_models")
    data = _data(cohort)
    out = {}
    for name in ("gimp", "mgi_mlp_genes"):
        for epochs in (1, 2):
            cfg = deep_merge(method_config(TRAIN_CFG, name), {"pretrain": {"epochs": epochs}})
            pretrain(name, cfg, data, root / f"{name}{epochs}")
            out[name, epochs] = (cfg, root / f"{name}{epochs}" / "pretrain" / "model.pt")
    return data, out


@pytest.mark.parametrize("name", ["gimp", "mgi_mlp_genes"])
def test_stage_probes_the_pretrained_the_untrained_network_and_pooled_features(pretrained, tmp_path, name):
    from wsiomics.fewshot import EMBEDDING_ORDER, fold_embeddings, run_fold

    data, models = pretrained
    cfg, path = models[name, 1]
    table = run_fold(name, cfg, data, path, tmp_path, FewshotParams(k=(1, 2), draws=2))
    written = pd.read_csv(tmp_path / "fewshot.tsv", sep="\t")
    assert list(written.columns) == FEWSHOT_COLUMNS and len(written) == len(table) == 2 * 2 * 7
    assert list(dict.fromkeys(written["embedding"])) == list(EMBEDDING_ORDER)
    # the test patients with a slide and expression (a patient without either is left out of every probe)
    complete_test = [p for p in data.role("test") if p.slides and p.genes is not None]
    assert (written["n_test"] == len(complete_test)).all()
    assert written["balanced_accuracy"].between(0, 1).all()

    patients, one = fold_embeddings(name, cfg, data, path, tmp_path)
    _, two = fold_embeddings(name, models[name, 2][0], data, models[name, 2][1], tmp_path)
    assert {p.role for p in patients} == {"train", "test"}  # val never embedded, never drawn
    for emb in ("fused", "image", "gene"):  # the untrained network is the same whatever the checkpoint
        np.testing.assert_array_equal(one[emb + "_no_pretrain"], two[emb + "_no_pretrain"])
        assert not np.allclose(np.nan_to_num(one[emb]), np.nan_to_num(two[emb]))
    lacks_slide = np.array([not p.slides for p in patients])
    assert lacks_slide.any()  # P14 (expression only) trains; P15 (no expression) is a val patient
    assert np.isnan(one["image"][lacks_slide]).all() and np.isnan(one["pooled_features"][lacks_slide]).all()
    assert np.isfinite(one["fused"]).all()  # the fused embedding has the missing-modality token


def test_the_untrained_network_is_the_one_pretraining_started_from(cohort, tmp_path, monkeypatch):  # noqa: F811
    """A pretraining that takes no step saves the network it started from; the stage's ``*_no_pretrain``
    embeddings are that network's, and so equal the "pretrained" ones of this checkpoint."""
    from wsiomics.fewshot import fold_embeddings
    from wsiomics.train import stages
    from wsiomics.train.loop import FitResult
    from wsiomics.train.methods import method_config

    cfg, data = method_config(TRAIN_CFG, "gimp"), _data(cohort)
    monkeypatch.setattr(stages, "fit", lambda *a, **k: FitResult([{"epoch": 0, "train_loss": 0.0}], 0, False))
    stages.pretrain("gimp", cfg, data, tmp_path)
    _, emb = fold_embeddings("gimp", cfg, data, tmp_path / "pretrain" / "model.pt", tmp_path)
    for name in ("fused", "image", "gene"):
        np.testing.assert_array_equal(emb[name], emb[name + "_no_pretrain"])


@pytest.mark.parametrize("name", ["gimp", "mgi_mlp_genes"])
def test_image_embedding_is_the_slide_encoder_alone(pretrained, tmp_path, name):
    """``image`` is what a slide without RNA gets: removing every patient's genes leaves it bit-equal (and the
    gene embeddings, which no patient then has, leave the probes)."""
    from dataclasses import replace

    from wsiomics.fewshot import fold_embeddings

    data, models = pretrained
    cfg, path = models[name, 1]
    _, full = fold_embeddings(name, cfg, data, path, tmp_path)
    no_genes = replace(data, patients=[replace(p, genes=None) for p in data.patients])
    _, slides_only = fold_embeddings(name, cfg, no_genes, path, tmp_path)
    for emb in ("image", "image_no_pretrain", "pooled_features"):
        np.testing.assert_array_equal(full[emb], slides_only[emb])
    assert "gene" not in slides_only and "gene_no_pretrain" not in slides_only
    assert not np.allclose(full["fused"], slides_only["fused"])  # the fused one does read the genes


def test_stage_refuses_a_method_without_pretraining(pretrained, tmp_path):
    from wsiomics.fewshot import fold_embeddings

    data, models = pretrained
    with pytest.raises(ValueError, match="no pretraining stage"):
        fold_embeddings("gimp_no_pretrain", models["gimp", 1][0], data, models["gimp", 1][1], tmp_path)


def test_fewshot_settings_are_not_part_of_a_methods_training_configuration():
    """train.fewshot reaches only the fewshot rule: changing k must not change (and so rerun, or fail to resume)
    every training job, whose command line and resume key carry the method's resolved configuration."""
    from wsiomics.train.methods import method_config

    a = method_config({**TRAIN_CFG, "fewshot": {"k": [1, 2], "draws": 10, "c": 1.0}}, "gimp")
    b = method_config({**TRAIN_CFG, "fewshot": {"k": [4], "draws": 3, "c": 0.1}}, "gimp")
    assert a == b and "fewshot" not in a


@pytest.mark.parametrize("test_classes", [("a", "b", "c"), ("a", "c")])
def test_probe_metrics_follow_the_evaluation_definitions(test_classes):
    """Balanced accuracy and macro AUC as evaluate.classification_metrics defines them (one-vs-rest over the
    classes present among the test patients), here with three classes and with one absent from the test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from wsiomics.train.evaluate import classification_metrics

    rng = np.random.default_rng(3)
    centre = {"a": (0, 0), "b": (2, 0), "c": (0, 2)}
    y_train = ["a", "b", "c"] * 3
    y_test = [test_classes[i % len(test_classes)] for i in range(12)]
    x_train = np.array([centre[v] for v in y_train]) + rng.normal(0, 1.0, (9, 2))
    x_test = np.array([centre[v] for v in y_test]) + rng.normal(0, 1.0, (12, 2))
    found = probe_scores(x_train, y_train, x_test, y_test, ["a", "b", "c"], c=0.5)
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=0.5, max_iter=5000).fit(scaler.transform(x_train), [ord(v) - 97 for v in y_train])
    expected = classification_metrics(y_test, model.predict_proba(scaler.transform(x_test)), ["a", "b", "c"])
    assert 0 < expected["balanced_accuracy"] < 1  # not a trivial case
    assert found["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert found["auc_macro"] == pytest.approx(expected["auc_macro"])


# ---------------------------------------------------------------- the rule in the workflow


@pytest.mark.integration
def test_rule_runs_per_pretrained_method_and_fold_and_feeds_the_summary(sheet, tmp_path):  # noqa: F811
    import re

    proc = dry_run(sheet, tmp_path, "train={run: [gimp, mgi_mlp_genes, gimp_no_pretrain, linear, cca]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    runs = [line for line in out.splitlines() if "python -m wsiomics.fewshot run " in line]
    jobs = sorted(re.search(r"--method (\S+) --fold (\d)", c).groups() for c in runs)
    # the planned methods with a pretraining stage (from the registry), every fold; none of the others
    assert jobs == [("gimp", "0"), ("gimp", "1"), ("mgi_mlp_genes", "0"), ("mgi_mlp_genes", "1")], jobs
    for c in runs:
        method, fold = re.search(r"--method (\S+) --fold (\d)", c).groups()
        assert f"--pretrained results/models/{method}/fold{fold}/pretrain/model.pt" in c
        assert "--k 1,2,4,8,16 --draws 10 --c 1.0" in c and "--features" in c and "--expression" in c
    summary = [line for line in out.splitlines() if "python -m wsiomics.fewshot summarize " in line]
    assert len(summary) == 1 and summary[0].count("fewshot.tsv") == 4
    assert "--out-dir results/fewshot" in summary[0]


@pytest.mark.integration
def test_an_empty_k_turns_the_protocol_off_and_its_settings_rerun_no_training_job(sheet, tmp_path):  # noqa: F811
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("train:\n  run: [gimp]\n  fewshot: {k: [], draws: 3}\n")
    proc = dry_run(sheet, tmp_path / "work", "--configfile", str(overlay))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "wsiomics.fewshot" not in out
    training = [line for line in out.splitlines() if "python -m wsiomics.train " in line]
    assert any("pretrain --method gimp" in line for line in training)
    assert not any('"fewshot"' in line for line in training)  # the training jobs' configs leave it out


@pytest.mark.integration
def test_fewshot_jobs_ask_a_gpu_unless_their_device_is_cpu(sheet, tmp_path):  # noqa: F811
    """The demo (config.yaml: train.fewshot.device cpu) runs them beside the training jobs, which hold the one
    `gpu` slot; with the device left to train.device ("") they ask for the GPU as training does."""
    from test_train_workflow import job_resources

    demo = job_resources(sheet, tmp_path / "a", "train={run: [gimp]}")
    assert {res.get("gpu") for rule, _, res in demo if rule == "fewshot"} == {"0"}
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("train:\n  run: [gimp]\n  fewshot: {device: ''}\n")
    gpu_site = job_resources(sheet, tmp_path / "b", "--configfile", str(overlay))
    assert {res.get("gpu") for rule, _, res in gpu_site if rule == "fewshot"} == {"1"}
