"""The task interface: what a method is fine-tuned for, in one place.

A task owns its targets (read from the fold's data, the sheet or annotations), the size of the model's head,
the objective, the evaluation of the trained model and the files it writes, and the metrics the cohort
summary reports. The stage code (:mod:`wsiomics.train.stages`) runs the same short path for every task:
``prepare`` -> fit the network (or a scikit-learn estimator) on ``training_data`` with ``objective`` ->
``predict`` -> ``write``. A new task is a subclass registered with :func:`register_task`; no stage code
changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch

from wsiomics.datasets import DatasetParams, FoldData

if TYPE_CHECKING:
    from wsiomics.train.evaluate import PatientResult
    from wsiomics.train.loop import Objective
    from wsiomics.train.methods import Method


@dataclass
class StageContext:
    """One method's stage on one fold: its resolved configuration, data, output folder and run settings."""

    method: Method
    cfg: dict[str, Any]  # the stage's configuration (train.<stage>.model merged over train.model)
    data: FoldData
    out: Path  # results/models/<method>/fold<k>
    device: torch.device
    seed: int
    dparams: DatasetParams
    pretrained: Path | None = None  # the checkpoint a fine-tune starts from
    inputs: dict[str, Any] = field(default_factory=dict)  # task inputs given to the stage (sheet, annotations)
    found: dict[str, Any] = field(default_factory=dict)  # what the task's prepare() found, for its write()


class Task:
    """Base class: override what differs. The defaults train on every ``train``/``val`` patient."""

    name: ClassVar[str] = ""
    # metrics.json keys the cohort summary reports for methods of this task (mean and std over folds)
    summary_metrics: ClassVar[tuple[str, ...]] = ()
    # the initial (pretrained or random) network's retrieval and linear probe are reported beside the task's
    embedding_evaluations: ClassVar[bool] = False
    history_title: ClassVar[str] = "fine-tuning"  # the loss curve's title
    needs_labels: ClassVar[bool] = False  # the workflow skips the task's methods on a cohort without labels

    def prepare(self, ctx: StageContext) -> FoldData:
        """The fold's data with this task's targets attached and checked (a clear error when unusable)."""
        return ctx.data

    def head_outputs(self, data: FoldData, cfg: dict[str, Any]) -> int:
        """Width of the model's output head."""
        return max(2, len(data.classes))

    def training_data(self, ctx: StageContext) -> FoldData:
        """The patients the network trains (``train``) and early-stops (``val``) on, plus the evaluated ones."""
        return ctx.data

    def objective(self, ctx: StageContext) -> Objective:
        raise NotImplementedError

    def predict(self, model: torch.nn.Module, ctx: StageContext) -> list[PatientResult]:
        """The trained network's outputs for the evaluated (``test``, ``heldout``) patients."""
        raise NotImplementedError

    def write(self, ctx: StageContext, results: list[PatientResult], info: dict[str, Any],
              extra: dict[str, Any]) -> dict[str, Any]:
        """Write the task's output files and ``metrics.json`` (``info``: training; ``extra``: more metrics)."""
        raise NotImplementedError

    # The cohort summary (wsiomics.summary) pools every fold's test patients and bootstraps them. A task gives it
    # records and a statistic; the summary resamples patients and recomputes the statistic. The first of
    # summary_metrics is the task's primary metric (the one that picks the best baseline).

    def patient_records(self, fold_dir: Path, metrics: dict[str, Any]) -> dict[str, pd.DataFrame]:
        """The fold's test records behind the pooled summary, by kind (e.g. ``classification``, ``retrieval``):
        one table per kind with a ``patient_id`` column (the bootstrap's unit; a patient may have several
        rows, e.g. one per slide), optionally ``stratum`` (patients are resampled within each stratum) and
        whatever :meth:`pooled_statistic` needs. ``fold_dir`` holds the fold's ``metrics.json`` (``metrics``,
        already read). The summary adds a ``fold`` column. Default: the embedding evaluations, if the task has
        them (retrieval and the linear probe per test patient, from ``metrics.json``)."""
        if not self.embedding_evaluations:
            return {}
        from wsiomics.train.embedding_evaluation import embedding_records

        return embedding_records(metrics)

    def pooled_statistic(self, kind: str, records: pd.DataFrame) -> dict[str, float | None]:
        """Summary metrics (keys of ``summary_metrics``) over records of one kind pooled over folds, or any
        resample of them (rows repeat when a patient is drawn twice); None where undefined."""
        from wsiomics.train.embedding_evaluation import embedding_statistic

        return embedding_statistic(kind, records)

    def bootstrap_statistic(self, kind: str, records: pd.DataFrame,
                            weights: np.ndarray) -> dict[str, np.ndarray] | None:
        """Optional fast path: :meth:`pooled_statistic` on B resamples at once, ``weights`` (B, rows) being how
        often each row is drawn; (B,) per metric, NaN where undefined. None: the summary calls
        :meth:`pooled_statistic` on each resample. Default: the embedding evaluations' closed forms."""
        from wsiomics.train.embedding_evaluation import embedding_bootstrap

        return embedding_bootstrap(kind, records, weights) if self.embedding_evaluations else None

    def pooled_metrics(self, metrics_paths: list[Path]) -> dict[str, Any]:
        """Summary columns computed over every fold's test patients together, from the files beside each
        fold's ``metrics.json`` (none by default)."""
        return {}


def sheet_input(ctx: StageContext, key: str, read: Callable[[str], Any], columns: str) -> Any:
    """The task input ``key`` as given to the stage (tests, other callers), else ``read`` from the sample sheet
    (``--samples``), which then must be there: ``columns`` says what the task reads from it."""
    if ctx.inputs.get(key) is not None:
        return ctx.inputs[key]
    if not ctx.inputs.get("samples"):
        raise ValueError(f"{ctx.method.name} is a {ctx.method.task} method: it needs the sample sheet (its {columns}); "
                         "pass --samples")
    return read(ctx.inputs["samples"])


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if not task.name:
        raise ValueError(f"{type(task).__name__} has no name")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def summary_metrics() -> tuple[str, ...]:
    """Every registered task's summary metrics, each once, in registration order."""
    return tuple(dict.fromkeys(k for task in TASKS.values() for k in task.summary_metrics))
