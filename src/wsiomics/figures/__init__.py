"""Figures of a finished run (``python -m wsiomics.figures``; rule ``figures``): ROC curves, confusion
matrices, loss curves, embedding maps, retrieval curves, tumour and attention maps over the slides'
thumbnails, the QC gallery. Everything is drawn from what the stages wrote under ``results/`` (whatever
methods ran); a figure whose inputs are missing is skipped with a log line.

Each kind of figure is registered here with :func:`register`: its folder ``results/figures/<name>/``,
the report category and subcategory, and the file pattern the Snakemake report shows (its wildcards
become the report's labels). The workflow builds the rule's outputs and ``report(...)`` flags from this
registry, so a later stage adds a figure by dropping a module into this package (it is found by
:func:`kinds`) and a caption ``workflow/report/<name>.rst``; nothing else changes (README "Figures").
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The report's categories, one per stage (shared with the report's captions and other stages' rules).
CATEGORIES = ("QC", "Features", "Expression", "Models", "Segmentation", "Survival", "Few-shot", "Summary")
# Modules of this package that hold no figures.
NOT_FIGURES = frozenset({"__main__", "style", "sources", "params"})


@dataclass(frozen=True)
class FigureKind:
    name: str  # folder results/figures/<name>/ and caption workflow/report/<name>.rst
    category: str  # report category (CATEGORIES)
    subcategory: str  # report subcategory: what the figures are
    pattern: str  # files the report shows, relative to the folder, e.g. "{method}.png"
    draw: Callable[..., list[Path]]  # draw(results: Results, out_dir: Path, params: FigureParams) -> files

    @property
    def wildcards(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.pattern)

    @property
    def labels(self) -> dict[str, str]:
        """The report's label columns: one per wildcard of the pattern."""
        return {w.replace("_", " "): "{" + w + "}" for w in self.wildcards}


FIGURES: dict[str, FigureKind] = {}


def register(name: str, category: str, subcategory: str, pattern: str) -> Callable[[Callable], Callable]:
    """Decorator: ``draw`` makes every figure of kind ``name`` under its folder and returns their paths."""
    if category not in CATEGORIES:
        raise ValueError(f"figure {name}: category {category!r} is not one of {CATEGORIES}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"figure {name!r}: names are lower-case identifiers (they name folders and captions)")
    if not re.search(r"\{\w+\}", pattern):
        raise ValueError(f"figure {name}: the pattern {pattern!r} needs a wildcard (the report lists its files)")

    def wrap(draw: Callable) -> Callable:
        if name in FIGURES and FIGURES[name].draw is not draw:
            raise ValueError(f"figure {name} is registered twice ({FIGURES[name].draw.__module__}, {draw.__module__})")
        FIGURES[name] = FigureKind(name, category, subcategory, pattern, draw)
        return draw

    return wrap


def kinds() -> dict[str, FigureKind]:
    """Every registered figure kind: each module of this package is imported (they import matplotlib
    only when drawing, so the workflow can read the registry while parsing)."""
    for module in pkgutil.iter_modules(__path__):
        if module.name not in NOT_FIGURES:
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(FIGURES.items()))


def report_outputs(root: str = "results/figures") -> dict[str, dict[str, Any]]:
    """What the workflow's rule ``figures`` declares per kind: its folder and the ``report(...)`` arguments."""
    return {k.name: {"path": f"{root}/{k.name}", "caption": f"../report/{k.name}.rst", "category": k.category,
                     "subcategory": k.subcategory, "patterns": [k.pattern], "labels": k.labels}
            for k in kinds().values()}
