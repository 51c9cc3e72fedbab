"""Survival: the losses and c-index against hand computations, and the survival methods end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from test_datasets import grid_coords, write_store

from wsiomics.datasets import load_fold
from wsiomics.models.survival import bin_index, cox_nll, discrete_time_nll, discrete_time_risk, time_bins
from wsiomics.train.methods import METHODS, method_config
from wsiomics.train.stages import finetune, pretrain
from wsiomics.train.tasks.survival import read_outcomes, survival_metrics


def test_discrete_time_nll_equals_the_hand_computed_likelihood():
    logits = torch.tensor([[0.2, -0.4, 1.0], [-1.0, 0.5, 0.0]])
    h = torch.sigmoid(logits).tolist()
    # patient 0: event in bin 1 -> survived bin 0, event in bin 1; patient 1: censored in bin 2 -> survived 0..2
    expected = (-(math.log(1 - h[0][0]) + math.log(h[0][1]))
                - (math.log(1 - h[1][0]) + math.log(1 - h[1][1]) + math.log(1 - h[1][2]))) / 2
    got = discrete_time_nll(logits, torch.tensor([1, 2]), torch.tensor([1.0, 0.0]))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # an event in bin 0 only needs the first hazard
    first = discrete_time_nll(logits[:1], torch.tensor([0]), torch.tensor([1.0]))
    assert float(first) == pytest.approx(-math.log(h[0][0]))


def test_discrete_time_risk_orders_patients_by_hazard():
    low, high = torch.full((1, 4), -3.0), torch.full((1, 4), 1.0)
    assert float(discrete_time_risk(high)) > float(discrete_time_risk(low))
    s = torch.cumprod(1 - torch.sigmoid(high), 1)
    assert float(discrete_time_risk(high)) == pytest.approx(-float(s.sum()))


def test_cox_partial_likelihood_with_breslow_ties():
    eta = torch.tensor([0.5, -0.2, 1.0, 0.3])
    times = torch.tensor([2.0, 2.0, 5.0, 1.0])
    events = torch.tensor([1.0, 1.0, 0.0, 0.0])  # two tied events at t=2; patient 3 censored before them
    denom = math.log(math.exp(0.5) + math.exp(-0.2) + math.exp(1.0))  # Breslow: both tied events share the set
    expected = -((0.5 - denom) + (-0.2 - denom)) / 2
    assert float(cox_nll(eta, times, events)) == pytest.approx(expected, rel=1e-6)
    assert float(cox_nll(eta, times, torch.zeros(4))) == 0.0


def test_time_bins_are_quantiles_of_event_times():
    cuts = time_bins(np.array([10.0, 20.0, 30.0, 40.0, 50.0]), 4)
    np.testing.assert_allclose(cuts, [20.0, 30.0, 40.0])
    bins = bin_index(torch.tensor([5.0, 20.0, 35.0, 99.0]), torch.tensor(cuts, dtype=torch.float32))
    assert bins.tolist() == [0, 1, 2, 3]


def test_harrell_c_index_by_hand_with_ties_and_censoring():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    event = np.array([1, 0, 1, 1, 0])
    risk = np.array([0.9, 0.1, 0.5, 0.5, 0.2])
    # comparable pairs: (0,1) (0,2) (0,3) (0,4) (2,3) (2,4) (3,4) -- an event before the other's time
    # concordant: risk_i > risk_j: 0>1, 0>2, 0>3, 0>4, 2>4, 3>4 -> 6; (2,3) tied risk -> 0.5
    expected = 6.5 / 7
    train = (np.array([1.0, 2.0, 3.0, 6.0]), np.array([1, 1, 0, 1]), np.array([0.3, 0.2, 0.1, 0.0]))
    found = survival_metrics(*train, time, event, risk)
    assert found["c_index"] == pytest.approx(expected)
    assert found["n_events"] == 3 and found["n_test"] == 5


def test_sheet_outcomes_come_from_the_checked_sheet(tmp_path):
    from wsiomics.samples import SampleSheetError

    for name in ("a.tsv", "b.tsv", "c.tsv"):
        (tmp_path / name).write_text("gene_id\tunstranded\n")
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("patient_id\tslide_id\tslide_path\texpression_path\ttime\tevent\n"
                     "A\t\t\ta.tsv\t100\t1\nB\t\t\tb.tsv\t-5\t0\nC\t\t\tc.tsv\t\t\n")
    with pytest.raises(SampleSheetError, match="time '-5' is not a number >= 0"):
        read_outcomes(sheet)
    sheet.write_text("patient_id\tslide_id\tslide_path\texpression_path\ttime\tevent\n"
                     "A\t\t\ta.tsv\t100\t1\nC\t\t\tc.tsv\t\t\n")
    assert read_outcomes(sheet).to_dict("index") == {"A": {"time": 100.0, "event": 1}}


def test_a_deploy_sheet_without_follow_up_has_none_and_a_bad_one_is_its_error(tmp_path):
    """Deployment reads follow-up where the new sheet has it: none at all is an empty table, but a bad value
    stays the sheet's error (it was once read as "no follow-up")."""
    from wsiomics.samples import SampleSheetError
    from wsiomics.train.deploy import deploy_outcomes

    (tmp_path / "a.tsv").write_text("gene_id\tunstranded\n")
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("patient_id\tslide_id\tslide_path\texpression_path\ttime\tevent\nA\t\t\ta.tsv\t\t\n")
    assert deploy_outcomes(sheet).empty
    with pytest.raises(ValueError, match="no patient has survival data"):
        read_outcomes(sheet)
    sheet.write_text("patient_id\tslide_id\tslide_path\texpression_path\ttime\tevent\nA\t\t\ta.tsv\t-5\t1\n")
    with pytest.raises(SampleSheetError, match="time '-5'"):
        deploy_outcomes(sheet)


CFG = {"seed": 0, "device": "cpu", "threads": 1, "num_workers": 0,
       "data": {"batch_size": 4, "max_tokens": 12, "crop": "window", "cache_mb": 64},
       "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0, "n_groups": 4, "fusion_dim": 16,
                 "mask_length": 4, "embed_dim": 8, "genes_per_token": 2, "d_state": 4},
       "pretrain": {"epochs": 2, "lr": 3e-3, "warmup_epochs": 1, "patience": 0, "min_epochs": 1},
       "finetune": {"epochs": 30, "lr": 3e-3, "encoder_lr_scale": 0.5, "warmup_epochs": 1, "patience": 0,
                    "min_epochs": 1, "weight_decay": 0.0},
       "survival": {"loss": "nll", "n_bins": 4}, "methods": {}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """60 patients; a per-patient factor z shifts the patch features and the genes and sets the hazard
    (exp(2 z)); uniform censoring. Roles: 36 train, 8 val, 16 test."""
    root = tmp_path_factory.mktemp("survival")
    rng = np.random.default_rng(3)
    n = 60
    z = rng.normal(size=n)
    slides, rows, genes = [], [], []
    roles = ["train"] * 36 + ["val"] * 8 + ["test"] * 16
    for i in range(n):
        pid, sid = f"P{i:02d}", f"P{i:02d}-S0"
        coords = grid_coords(4, 3, 224)
        write_store(root / "features" / f"{sid}.zarr", coords, rng.normal(size=(len(coords), 6)) + z[i], 224.0)
        slides.append({"patient_id": pid, "slide_id": sid})
        g = rng.normal(size=8)
        g[:4] += 2 * z[i]
        genes.append(g)
        t, censor = rng.exponential(400.0 * np.exp(-2.0 * z[i])), rng.uniform(100, 1500)
        rows.append((pid, roles[(i * 7) % n], "ab"[i % 2], min(t, censor), int(t <= censor)))
    table = pd.DataFrame(rows, columns=["patient_id", "role", "label", "time", "event"])
    folds = table[["patient_id", "role", "label"]].assign(fold=0)[["patient_id", "fold", "role", "label"]]
    ad.AnnData(X=np.array(genes, np.float32), obs=pd.DataFrame(index=table["patient_id"]),
               var=pd.DataFrame(index=[f"G{j}" for j in range(8)])).write_zarr(root / "fold0.zarr")
    outcomes = table.set_index("patient_id")[["time", "event"]]
    return folds, pd.DataFrame(slides), root / "features", root / "fold0.zarr", outcomes


@pytest.mark.parametrize(("name", "loss"), [("gene_only_survival", "nll"), ("late_fusion_survival", "cox"),
                                            ("coxph", "nll")])
def test_survival_methods_write_risks_metrics_and_km(cohort, tmp_path, name, loss):
    folds, slides, stores, expr, outcomes = cohort
    cfg = method_config({**CFG, "survival": {"loss": loss, "n_bins": 4}}, name)
    modalities = METHODS[name].modalities
    data = load_fold(folds, 0, slides, stores if "image" in modalities else None,
                     expr if "gene" in modalities else None)
    finetune(name, cfg, data, tmp_path, outcomes=outcomes)
    risks = pd.read_csv(tmp_path / "risks.tsv", sep="\t")
    assert list(risks.columns) == ["patient_id", "role", "risk", "time", "event"]
    test = risks[risks["role"] == "test"]
    assert sorted(test["patient_id"]) == sorted(p.patient_id for p in data.role("test"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["c_index"] == pytest.approx(survival_metrics(
        *[risks[risks.role.isin(["train", "val"])][c].to_numpy() for c in ("time", "event", "risk")],
        *[test[c].to_numpy() for c in ("time", "event", "risk")])["c_index"])
    assert metrics["c_index"] >= 0.6, metrics  # z sets the hazard and shifts the features and genes; chance 0.5
    assert (tmp_path / "km.png").stat().st_size > 1000 and "km_logrank_p" in metrics


def test_without_model_selection_the_val_patients_train(cohort, tmp_path):
    """select: last picks no epoch on val, so the val patients join the training patients (bins included)."""
    folds, slides, stores, expr, outcomes = cohort
    data = load_fold(folds, 0, slides, None, expr)
    fit = outcomes.loc[[p.patient_id for p in data.role("train", "val")]]
    for select, n_train, used in (("val", 36, data.role("train")), ("last", 44, data.role("train", "val"))):
        own = {"gene_only_survival": {"finetune": {"epochs": 2, "select": select}}}
        cfg = method_config({**CFG, "methods": own}, "gene_only_survival")
        finetune("gene_only_survival", cfg, data, tmp_path / select, outcomes=outcomes)
        metrics = json.loads((tmp_path / select / "metrics.json").read_text())
        assert metrics["training"]["train_patients"] == n_train
        events = fit.loc[[p.patient_id for p in used]].query("event == 1")["time"].to_numpy()
        np.testing.assert_allclose(metrics["bins"], time_bins(events, 4), rtol=1e-6)
    assert len(fit) == 44


@pytest.mark.parametrize("name", ["gene_only_survival", "image_only_survival", "late_fusion_survival",
                                  "gimp_survival", "mgi_survival"])
def test_survival_networks_select_no_epoch_on_a_few_val_patients(cohort, tmp_path, name):
    """By default a survival fine-tune keeps its last epoch and trains on train + val: the classification
    default (early stopping on val) is left as it is."""
    from wsiomics.train import stages

    folds, slides, stores, expr, outcomes = cohort
    data = load_fold(folds, 0, slides, None, expr)
    ctx = stages.fold_context(METHODS[name], method_config(CFG, name), data, tmp_path, "finetune",
                              inputs={"outcomes": outcomes})
    ctx.data = stages.get_task("survival").prepare(ctx)
    assert not stages._optim(ctx.cfg["finetune"])[1]  # select on val: no
    fit = stages.get_task("survival").training_data(ctx)
    assert len(fit.role("train")) == 44 and not fit.role("val")
    assert stages._optim(method_config(CFG, name.removesuffix("_survival"))["finetune"])[1]


def test_gimp_survival_starts_from_gimps_pretrained_encoders(cohort, tmp_path):
    from wsiomics.train import stages

    folds, slides, stores, expr, outcomes = cohort
    data = load_fold(folds, 0, slides, stores, expr)
    pretrain("gimp", method_config(CFG, "gimp"), data, tmp_path / "gimp")
    checkpoint = torch.load(tmp_path / "gimp" / "pretrain" / "model.pt", weights_only=True)["model"]
    model, _, initialised = stages.initial_model(stages.fold_context(
        METHODS["gimp_survival"], method_config(CFG, "gimp_survival"), data, tmp_path / "s", "finetune",
        tmp_path / "gimp" / "pretrain" / "model.pt"))
    assert initialised
    own = model.state_dict()
    encoder = [k for k in own if k.startswith(("image_encoder.", "gene_encoder."))]
    assert encoder and all(torch.equal(own[k], checkpoint[k]) for k in encoder)
    assert own["head.weight"].shape[0] == 4 and checkpoint["head.weight"].shape[0] == 2  # a new survival head
    finetune("gimp_survival", method_config(CFG, "gimp_survival"), data, tmp_path / "s",
             pretrained=tmp_path / "gimp" / "pretrain" / "model.pt", outcomes=outcomes)
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["c_index"] is not None


def test_coxph_fits_a_small_fold(cohort, tmp_path):
    """Fewer training patients than PCA components in the inner cross-validation's folds: still fits."""
    from dataclasses import replace

    folds, slides, stores, expr, outcomes = cohort
    data = load_fold(folds, 0, slides, stores, expr)
    small = replace(data, patients=[p for p in data.patients if p.role == "test"]
                    + [p for p in data.patients if p.role != "test"][:20])
    finetune("coxph", method_config(CFG, "coxph"), small, tmp_path, outcomes=outcomes)
    history = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert history["pca_components"].iloc[0] < 16


def test_summary_pools_the_folds_test_patients(tmp_path):
    from wsiomics.train.evaluate import summarize

    paths = []
    for fold, (risk, time, event) in enumerate([([2.0, 1.0], [10.0, 20.0], [1, 1]), ([2.5, 3.0], [30.0, 5.0], [0, 1])]):
        d = tmp_path / f"fold{fold}"
        d.mkdir()
        pd.DataFrame({"patient_id": [f"F{fold}a", f"F{fold}b"], "role": "test", "risk": risk, "time": time,
                      "event": event}).to_csv(d / "risks.tsv", sep="\t", index=False)
        (d / "metrics.json").write_text(json.dumps({"method": "coxph", "fold": fold, "c_index": 1.0}))
        paths.append(str(d / "metrics.json"))
    row = summarize(paths).set_index("method").loc["coxph"]
    # pairs within a fold only (each fold's risks come from its own model): fold 0: F0a (t=10, event) before
    # F0b, 2 > 1 concordant; fold 1: F1b (t=5, event) before F1a, 3 > 2.5 concordant -> 2 of 2. Across folds
    # F0b (1) vs F1a (2.5) would have been discordant.
    assert row["c_index_pooled"] == pytest.approx(1.0) and row["c_index_mean"] == 1.0


def _breslow_by_hand(eta: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """The negative log partial likelihood (Breslow ties), averaged over events, written out patient by patient."""
    terms = [eta[i] - math.log(sum(math.exp(eta[j]) for j in range(len(eta)) if time[j] >= time[i]))
             for i in range(len(eta)) if event[i] == 1]
    return -sum(terms) / len(terms)


@pytest.mark.parametrize("name", ["gene_only_survival", "image_only_survival", "late_fusion_survival",
                                  "gimp_survival", "mgi_survival"])
def test_survival_fine_tunes_take_the_whole_cohort_per_step(cohort, tmp_path, name):
    """The survival networks train on one batch of every training patient (train + val under select: last):
    the Cox loss of a step is then the partial likelihood over the whole cohort's risk sets, not over 4 patients
    (train.data.batch_size) with one or two events; the classification methods keep their batches."""
    from wsiomics.train import stages

    folds, slides, stores, expr, outcomes = cohort
    modalities = METHODS[name].modalities
    data = load_fold(folds, 0, slides, stores if "image" in modalities else None,
                     expr if "gene" in modalities else None)
    cfg = method_config({**CFG, "survival": {"loss": "cox", "n_bins": 4}}, name)
    ctx = stages.fold_context(METHODS[name], cfg, data, tmp_path, "finetune", inputs={"outcomes": outcomes})
    task = stages.get_task("survival")
    ctx.data = task.prepare(ctx)
    train_loader, _ = stages._loaders(task.training_data(ctx), ctx.cfg, ctx.dparams, ctx.seed, "finetune")
    batches = list(train_loader)
    assert len(batches) == 1 and batches[0].outcomes.shape[0] == 44
    classify = method_config(CFG, name.removesuffix("_survival"))
    assert stages._loaders(data, classify, ctx.dparams, ctx.seed, "finetune")[0].batch_sampler.batch_size == 4
    if name != "late_fusion_survival":
        return
    torch.manual_seed(0)
    model = stages.build_model(METHODS[name], ctx.cfg, ctx.data).eval()
    batch = batches[0]
    loss = task.objective(ctx)(model, batch, torch.Generator())["loss"]
    eta = model(batch).logits[:, 0].detach().double().numpy()
    time, event = batch.outcomes[:, 0].double().numpy(), batch.outcomes[:, 1].numpy()
    assert float(loss) == pytest.approx(_breslow_by_hand(eta, time, event), rel=1e-5)


def test_an_ensemble_scores_the_mean_of_its_members(cohort, tmp_path):
    """finetune.members: 2 trains the member of members: 1 (seed s) and one from seed s + 100, and its risk
    (Cox: the log-risk) is the mean of theirs."""
    folds, slides, stores, expr, outcomes = cohort
    data = load_fold(folds, 0, slides, None, expr)
    risks = {}
    for tag, seed, members in (("a", 0, 1), ("b", 100, 1), ("ab", 0, 2)):
        own = {"gene_only_survival": {"finetune": {"epochs": 3, "members": members}}}
        cfg = method_config({**CFG, "seed": seed, "survival": {"loss": "cox", "n_bins": 4}, "methods": own},
                            "gene_only_survival")
        finetune("gene_only_survival", cfg, data, tmp_path / tag, outcomes=outcomes)
        risks[tag] = pd.read_csv(tmp_path / tag / "risks.tsv", sep="\t").set_index("patient_id")["risk"]
    assert not np.allclose(risks["a"], risks["b"])
    np.testing.assert_allclose(risks["ab"], (risks["a"] + risks["b"]) / 2, rtol=1e-4, atol=1e-5)
    metrics = json.loads((tmp_path / "ab" / "metrics.json").read_text())
    assert metrics["training"]["members"] == 2
    assert not list((tmp_path / "ab" / ".state").glob("*.pt"))  # every member's resumable state is cleared


def test_config_yaml_fine_tunes_survival_networks_with_a_full_batch_cox_loss():
    """The shipped defaults (config.yaml): every survival network fine-tunes on the Cox partial likelihood over
    one batch of all its training patients; its classification sibling keeps train.data.batch_size."""
    import yaml

    from wsiomics.train.tasks.survival import settings

    train = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())["train"]
    for name in ("gene_only_survival", "image_only_survival", "late_fusion_survival", "gimp_survival",
                 "mgi_survival"):
        cfg = method_config(train, name)
        assert settings(cfg)[0] == "cox" and cfg["finetune"]["batch_size"] == "all", name
        assert "batch_size" not in method_config(train, name.removesuffix("_survival"))["finetune"]
