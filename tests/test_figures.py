"""The figures stage (wsiomics.figures): each kind on a small synthetic results folder, ROC points by hand,
recall@k against the evaluation's recall, missing inputs skipped with a log line, the registry's report flags."""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from wsiomics.figures import CATEGORIES, kinds, report_outputs
from wsiomics.figures.__main__ import draw_all, main
from wsiomics.figures.curves import pooled_recall, roc_points
from wsiomics.figures.params import FigureParams
from wsiomics.figures.sources import Results
from wsiomics.train.evaluate import retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def _store(path: Path, attrs: dict, **arrays) -> None:
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update(attrs)
    for name, value in arrays.items():
        if value.dtype.kind in "OU":
            arr = g.create_array(name, shape=value.shape, dtype=str)
            arr[:] = value.astype(object)
        else:
            g.create_array(name, data=value)


def make_results(root: Path, slide_path: Path | None = None) -> Path:
    """Two folds of a classification method ``clf`` (predictions, histories of two stages, embeddings,
    attention), a segmentation method ``seg`` (tumour maps, Dice), the sheet views and QC pictures."""
    rng = np.random.default_rng(0)
    patients = [f"P{i:02d}" for i in range(12)]
    labels = [CLASSES[i % 3] for i in range(12)]
    (root / "sheet").mkdir(parents=True)
    pd.DataFrame({"patient_id": patients, "label": labels}).to_csv(root / "sheet/patients.tsv", sep="\t", index=False)
    slides = [f"{p}-S1" for p in patients]
    pd.DataFrame({"slide_id": slides, "patient_id": patients}).to_csv(root / "sheet/slides.tsv", sep="\t", index=False)
    coords = np.array([[x * 224, y * 224] for y in range(3) for x in range(4)], np.int64)
    for sid in slides:
        attrs = {"slide_id": sid, "patch_size_level0": 224.0, "read_level": 0, "read_size": 224,
                 "slide_path": str(slide_path) if slide_path else ""}
        _store(root / "tiles" / f"{sid}.zarr", attrs, coords=coords)
    (root / "qc" / "tiles").mkdir(parents=True)
    for sid in slides[:3]:
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "qc/tiles" / f"{sid}.png")
    for fold in (0, 1):
        test = list(range(fold, 12, 2))
        d = root / "models/clf" / f"fold{fold}"
        (d / "pretrain").mkdir(parents=True)
        probs = rng.dirichlet(np.ones(3), len(test))
        table = pd.DataFrame({"patient_id": [patients[i] for i in test], "fold": fold, "role": "test",
                              "label": [labels[i] for i in test],
                              "predicted": [CLASSES[j] for j in probs.argmax(1)],
                              **{f"prob_{c}": probs[:, k] for k, c in enumerate(CLASSES)}})
        table.to_csv(d / "predictions.tsv", sep="\t", index=False)
        epochs = np.arange(1, 6)
        pd.DataFrame({"epoch": epochs, "train_loss": 1 / epochs, "val_loss": 1.2 / epochs + 0.01 * epochs}).to_csv(
            d / "history.tsv", sep="\t", index=False)
        pd.DataFrame({"epoch": epochs, "train_loss": 2 / epochs, "train_mpm": 1 / epochs}).to_csv(
            d / "pretrain/history.tsv", sep="\t", index=False)
        ids = np.array([patients[i] for i in test], dtype=object)
        _store(d / "embeddings.zarr", {}, patient_id=ids, role=np.array(["test"] * len(test), dtype=object),
               image=rng.normal(size=(len(test), 8)).astype(np.float32),
               gene=rng.normal(size=(len(test), 8)).astype(np.float32))
        for i in test:
            _store(d / "attention" / f"{slides[i]}.zarr", {"slide_id": slides[i], "patient_id": patients[i]},
                   coords=coords, attention=rng.random(len(coords)).astype(np.float32))
        s = root / "models/seg" / f"fold{fold}"
        for i in test[:2]:
            _store(s / "tumour" / f"{slides[i]}.zarr", {"slide_id": slides[i], "patient_id": patients[i]},
                   coords=coords, tumour_prob=rng.random(len(coords)).astype(np.float32))
        (s / "metrics.json").write_text(json.dumps({"dice_per_slide": {slides[i]: 0.1 * i for i in test[:2]}}))
    return root


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"


def test_roc_points_hand_case():
    # binary: scores 0.1 (neg), 0.4 (pos), 0.35 (neg), 0.8 (pos); thresholds 0.8, 0.4, 0.35, 0.1 give
    # (fpr, tpr) = (0, .5), (0, 1), (.5, 1), (1, 1) after the (0, 0) start; AUC 1.
    labels = ["n", "p", "n", "p"]
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    curves = roc_points(labels, probs, ["n", "p"])
    assert list(curves) == ["p"]
    fpr, tpr, auc = curves["p"]
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1, 1])
    assert auc == pytest.approx(1.0)
    from sklearn.metrics import roc_curve

    sk_fpr, sk_tpr, _ = roc_curve([0, 1, 0, 1], probs[:, 1], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    # three classes: one-vs-rest per class and the macro mean of the AUCs
    labels = ["a", "b", "c", "a"]
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    curves = roc_points(labels, probs, CLASSES)
    # class a: positives score 0.7, 0.2; negatives 0.5, 0.1 -> AUC 3/4 (0.7 beats both, 0.2 beats 0.1)
    assert curves["a"][2] == pytest.approx(0.75)
    np.testing.assert_allclose(curves["a"][0], [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(curves["a"][1], [0, 0.5, 0.5, 1, 1])
    # class b: positive 0.3 against 0.2, 0.3, 0.5 -> (1 + 0.5) / 3
    assert curves["b"][2] == pytest.approx(0.5)
    assert curves["c"][2] == pytest.approx(1.0)
    assert curves["macro"][2] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert curves["macro"][0][0] == 0 and curves["macro"][1][-1] == pytest.approx(1.0)


def test_pooled_recall_agrees_with_the_evaluation(tmp_path):
    results = Results(make_results(tmp_path / "results"))
    emb = results.embeddings("clf", "finetune")
    curve = pooled_recall(emb, None)
    per_fold = []
    for _, part in emb.groupby("fold"):
        found = retrieval_metrics(np.stack(part["image"].to_list()), np.stack(part["gene"].to_list()),
                                  patient_ids=part["patient_id"].tolist())
        per_fold.append(found["retrieval_per_patient"])
    for k in (1, 5):
        hits = np.concatenate([f[f"recall_i2g@{k}"] for f in per_fold])
        assert curve["i2g"][k - 1] == pytest.approx(hits.mean())
    assert curve["i2g"][-1] == pytest.approx(1.0) and curve["chance"][0] == pytest.approx(1 / 6)


def test_every_kind_writes_valid_figures(tmp_path, slide_factory, caplog):
    (tmp_path / "slides").mkdir()
    slide = slide_factory(tmp_path / "slides", "s", seed=3)
    results = Results(make_results(tmp_path / "results", slide))
    out = tmp_path / "figures"
    with caplog.at_level(logging.INFO, logger="wsiomics.figures"):
        written = draw_all(results, out, FigureParams(top_tiles=2, tumour_slides=3))
    expected = {"roc": ["clf.png", "clf.svg"], "confusion": ["clf.png"],
                "loss": ["clf/finetune.png", "clf/finetune.svg", "clf/pretrain.png", "clf/pretrain.svg"],
                "retrieval": ["i2g.png", "i2g.svg", "g2i.png", "g2i.svg"], "embedding_map": ["clf.png"],
                "qc_gallery": ["page1.png"]}
    for name, files in expected.items():
        assert sorted(str(p.relative_to(out / name)) for p in written[name]) == sorted(files), name
    assert len(written["attention"]) == 3  # one slide per class
    assert len(written["tumour_map"]) == 3
    for paths in written.values():
        for p in paths:
            if p.suffix == ".png":
                _check_png(p)
            else:
                assert ET.parse(p).getroot().tag.endswith("svg")
    assert not any(p.name.startswith(".tmp-") for p in out.rglob("*"))  # atomic writes leave no temporaries
    # the segmentation method has no predictions: logged, not drawn
    assert "seg: no predictions.tsv" in caplog.text


def test_missing_inputs_are_skipped_with_a_log_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="wsiomics.figures"):
        assert main(["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "figures")]) == 0
    assert not [p for p in (tmp_path / "figures").rglob("*") if p.is_file()]
    assert {p.name for p in (tmp_path / "figures").iterdir()} == set(kinds())  # every output folder exists
    assert "no model figures" in caplog.text and "qc_gallery: no tiling QC picture" in caplog.text
    # a slide whose file is gone: the attention map is drawn without the H&E, and says so
    root = make_results(tmp_path / "results", Path(tmp_path / "gone.svs"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wsiomics.figures"):
        written = draw_all(Results(root), tmp_path / "f2", FigureParams(), only=("attention",))
    assert len(written["attention"]) == 3 and "not available; drawn without the H&E" in caplog.text


def test_registry_gives_every_kind_a_caption_and_a_category():
    outputs = report_outputs()
    assert {"roc", "confusion", "loss", "embedding_map", "retrieval", "tumour_map", "attention",
            "qc_gallery"} <= set(outputs)
    for name, spec in outputs.items():
        assert spec["category"] in CATEGORIES
        assert (REPO / "workflow" / "rules" / spec["caption"]).resolve().is_file(), f"caption of {name} missing"
        assert spec["path"] == f"results/figures/{name}"
        assert set(spec["labels"].values()) == {f"{{{w}}}" for w in kinds()[name].wildcards}


def test_reading_the_registry_imports_no_plotting_or_stage_library():
    """The workflow reads the registry while parsing, with the launcher's Python (tests/test_workflow.py)."""
    import subprocess
    import sys

    code = ("import sys; from wsiomics.figures import report_outputs; report_outputs(); "
            "print(sorted(m for m in ('matplotlib', 'sklearn', 'scanpy', 'anndata', 'zarr', 'torch', 'openslide', "
            "'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_km_pools_folds_split_at_each_folds_training_median(tmp_path):
    from wsiomics.figures.survival import draw_km, risk_groups

    root = tmp_path / "results"
    for fold, shift in ((0, 0.0), (1, 10.0)):  # fold 1's risks are on another scale: its own median splits it
        d = root / "models/surv" / f"fold{fold}"
        d.mkdir(parents=True)
        pd.DataFrame({"patient_id": [f"F{fold}P{i}" for i in range(8)],
                      "role": ["train"] * 4 + ["test"] * 4,
                      "risk": np.array([1, 2, 3, 4, 0.5, 2.4, 2.6, 9]) + shift,
                      "time": [10, 20, 30, 40, 100, 90, 15, 5], "event": [1, 1, 0, 1, 0, 1, 1, 1]}).to_csv(
            d / "risks.tsv", sep="\t", index=False)
    results = Results(root)
    groups = risk_groups(results, "surv")
    assert groups["high"].tolist() == [False, False, True, True] * 2  # training median 2.5 (+ shift)
    written = draw_km(results, tmp_path / "km", FigureParams())
    assert [p.name for p in written] == ["surv.png", "surv.svg"]
    _check_png(written[0])
