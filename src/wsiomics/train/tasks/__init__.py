"""Tasks as plug-ins (:mod:`wsiomics.train.tasks.base`): each module defines and registers one task."""

from wsiomics.train.tasks import classify, segment, survival  # noqa: F401  (registers the built-in tasks)
from wsiomics.train.tasks.base import TASKS, StageContext, Task, get_task, register_task, summary_metrics

__all__ = ["TASKS", "StageContext", "Task", "get_task", "register_task", "summary_metrics"]
