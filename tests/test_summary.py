"""results/models/summary.tsv: mean and std over folds per method, and every deep method paired with linear."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from wsiomics.train.__main__ import main

# balanced accuracy per fold: image_only beats linear on folds 0 and 2 (2 of 3, mean +0.1); gimp wins one fold
# by a wide margin but loses the other two (mean +0.0333 > 0, yet 1 of 3: not a win); gene_only loses all three
BA = {"linear": (0.70, 0.80, 0.60), "image_only": (0.90, 0.70, 0.80), "gimp": (1.00, 0.70, 0.50),
      "gene_only": (0.60, 0.75, 0.55)}
PRE = ["method", "n_folds", "balanced_accuracy_mean", "balanced_accuracy_std", "accuracy_mean", "accuracy_std"]


def _write_metrics(root, method, fold, ba, **extra):
    path = root / method / f"fold{fold}" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"method": method, "fold": fold, "balanced_accuracy": ba, "accuracy": ba, **extra}))
    return str(path)


@pytest.fixture
def metrics(tmp_path):
    paths = [_write_metrics(tmp_path, m, k, ba) for m, values in BA.items() for k, ba in enumerate(values)]
    # a segmentation method has no balanced accuracy: nothing to pair
    paths += [_write_metrics(tmp_path, "image_seg", k, None, dice_mean=0.8) for k in range(3)]
    return paths


def test_deep_methods_are_paired_with_linear_over_folds(metrics, tmp_path, caplog):
    out = tmp_path / "summary.tsv"
    with caplog.at_level(logging.WARNING):
        assert main(["summarize", "--out", str(out), *metrics]) == 0
    table = pd.read_csv(out, sep="\t").set_index("method")
    # the existing layout first, unchanged; the comparison columns after it
    assert list(table.reset_index().columns[:len(PRE)]) == PRE
    assert table.loc["image_only", "balanced_accuracy_mean"] == pytest.approx(0.8)
    diff = table["balanced_accuracy_vs_linear_mean"]
    assert diff["image_only"] == pytest.approx(0.1, abs=1e-4)
    assert diff["gimp"] == pytest.approx(0.1 / 3, abs=1e-4) and diff["gene_only"] == pytest.approx(-0.4 / 6, abs=1e-4)
    assert table.loc["image_only", "folds_won_vs_linear"] == 2 and table.loc["gimp", "folds_won_vs_linear"] == 1
    assert table.loc["gene_only", "folds_won_vs_linear"] == 0
    assert (table.loc[["image_only", "gimp", "gene_only"], "n_folds_vs_linear"] == 3).all()
    assert table.loc["image_only", "beats_linear"] == True  # noqa: E712 (read back as a bool column with NaN)
    assert table.loc["gimp", "beats_linear"] == False and table.loc["gene_only", "beats_linear"] == False  # noqa: E712
    for method in ("linear", "image_seg"):  # nothing to compare: empty cells
        assert table.loc[method, ["balanced_accuracy_vs_linear_mean", "beats_linear"]].isna().all(), method
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert any(w.startswith("gimp does not beat linear") and "1 of 3" in w for w in warned), warned
    assert any(w.startswith("gene_only does not beat linear") and "0 of 3" in w for w in warned), warned


def test_pairing_uses_only_the_folds_both_have(tmp_path, caplog):
    paths = [_write_metrics(tmp_path, "linear", k, ba) for k, ba in enumerate((0.5, 0.6, 0.7))]
    paths += [_write_metrics(tmp_path, "late_fusion", k, ba) for k, ba in ((0, 0.6), (2, 0.6))]  # fold 1 missing
    out = tmp_path / "summary.tsv"
    assert main(["summarize", "--out", str(out), *paths]) == 0
    row = pd.read_csv(out, sep="\t").set_index("method").loc["late_fusion"]
    assert row["n_folds_vs_linear"] == 2 and row["folds_won_vs_linear"] == 1
    assert row["balanced_accuracy_vs_linear_mean"] == pytest.approx(0.0, abs=1e-9)
    assert row["beats_linear"] == False  # noqa: E712 (a draw is not a win)
