"""Tasks as plug-ins: a task registered from outside runs through the unchanged stage code."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from test_datasets import _cohort

from wsiomics.datasets import load_fold
from wsiomics.io import atomic_path
from wsiomics.train import evaluate as ev
from wsiomics.train import tasks
from wsiomics.train.methods import METHODS, Method, method_config
from wsiomics.train.roles import EVAL_ROLES
from wsiomics.train.stages import finetune
from wsiomics.train.tasks import StageContext, Task

CFG = {"seed": 0, "device": "cpu", "threads": 1, "num_workers": 0,
       "data": {"batch_size": 4, "max_tokens": 12, "crop": "window", "cache_mb": 64},
       "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0, "n_groups": 4},
       "finetune": {"epochs": 30, "lr": 1e-2, "warmup_epochs": 1, "patience": 0, "min_epochs": 1, "weight_decay": 0.0},
       "methods": {}}


class GeneMean(Task):
    """A toy regression: predict the mean of a patient's genes from the genes (output 0 of the head)."""

    name = "toy_gene_mean"
    summary_metrics = ("mse",)

    def prepare(self, ctx: StageContext):
        self.prepared = ctx.data.fold
        return ctx.data

    def objective(self, ctx: StageContext):
        def mse(model, batch, gen):
            out = model(batch)
            return {"loss": torch.nn.functional.mse_loss(out.logits[:, 0], batch.genes.mean(1))}

        return mse

    def predict(self, model, ctx: StageContext):
        return ev.run_model(model, ctx.data, EVAL_ROLES, ctx.device, ctx.dparams)

    def write(self, ctx: StageContext, results, info, extra):
        rows = [{"patient_id": r.patient.patient_id, "target": float(r.patient.genes.mean())} for r in results]
        table = pd.DataFrame(rows)
        with atomic_path(ctx.out / "toy.tsv") as tmp:
            table.to_csv(tmp, sep="\t", index=False)
        metrics = {"method": ctx.method.name, "fold": ctx.data.fold, "n": len(rows), "training": info}
        ev.write_json(ctx.out / "metrics.json", metrics)
        return metrics


@pytest.fixture
def toy_task(monkeypatch):
    task = GeneMean()
    monkeypatch.setitem(tasks.TASKS, task.name, task)
    monkeypatch.setitem(METHODS, "toy_method", Method("toy_method", "gene_only", task=task.name, modalities=("gene",)))
    return task


def test_a_registered_task_runs_through_the_unchanged_stages(toy_task, tmp_path):
    folds, slides, stores, expr, _ = _cohort(tmp_path / "cohort")
    data = load_fold(folds, 0, slides, None, expr)
    finetune("toy_method", method_config(CFG, "toy_method"), data, tmp_path / "out")
    assert toy_task.prepared == 0
    table = pd.read_csv(tmp_path / "out" / "toy.tsv", sep="\t")
    evaluated = [p for p in data.patients if p.role in EVAL_ROLES and p.genes is not None]
    assert sorted(table["patient_id"]) == sorted(p.patient_id for p in evaluated)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["training"]["epochs"] == 30 and (tmp_path / "out" / "model.pt").exists()
    history = pd.read_csv(tmp_path / "out" / "history.tsv", sep="\t")
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]  # the task's objective was trained
    assert "mse" in tasks.summary_metrics()


def test_unknown_task_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, "bad", Method("bad", "gene_only", task="regress", modalities=("gene",)))
    folds, slides, stores, expr, _ = _cohort(tmp_path / "cohort")
    with pytest.raises(KeyError, match="unknown task 'regress'; known: classify, segment"):
        finetune("bad", method_config(CFG, "bad"), load_fold(folds, 0, slides, None, expr), tmp_path / "out")


def test_classification_refuses_fewer_than_two_classes(tmp_path):
    folds, slides, stores, expr, _ = _cohort(tmp_path / "cohort")
    folds = folds.assign(label="a")
    data = load_fold(folds, 0, slides, None, expr)
    with pytest.raises(ValueError, match="at least two classes"):
        finetune("gene_only", method_config(CFG, "gene_only"), data, tmp_path / "out")
    with pytest.raises(ValueError, match="at least two classes"):
        finetune("linear", method_config(CFG, "linear"), data, tmp_path / "linear")
