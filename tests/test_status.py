"""The cohort status table (wsiomics.status): tiling and feature status folded into one row per slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wsiomics.io import atomic_zarr
from wsiomics.status import OK, main, precision_report, status_table


def store(path: Path, **attrs) -> Path:
    with atomic_zarr(path, attrs) as root:
        root.create_array("coords", shape=(attrs.get("n_tiles", 0), 2), dtype=np.int64)
    return path


def cohort(tmp_path: Path, slides: dict[str, tuple[dict, dict]]) -> pd.DataFrame:
    for sid, (tiles, feats) in slides.items():
        store(tmp_path / "tiles" / f"{sid}.zarr", slide_id=sid, patient_id="P" + sid, mpp=0.5, **tiles)
        store(tmp_path / "features" / f"{sid}.zarr", slide_id=sid, encoder="enc", device="cpu", feature_dim=8,
              **feats)
    rows = pd.DataFrame({"slide_id": list(slides), "patient_id": ["P" + s for s in slides]})
    rows.to_csv(tmp_path / "slides.tsv", sep="\t", index=False)
    return rows


def test_a_slide_unreadable_at_extraction_is_not_ok_in_the_status_table(tmp_path):
    rows = cohort(tmp_path, {
        "good": ({"status": OK, "reason": "", "n_tiles": 5}, {"status": OK, "reason": "", "n_tiles": 5,
                                                              "precision": "bf16"}),
        "late": ({"status": OK, "reason": "", "n_tiles": 7}, {"status": "unreadable", "reason": "damaged. Fix: x",
                                                              "n_tiles": 0, "precision": "bf16"}),
        "blank": ({"status": "no_tissue", "reason": "no tissue", "n_tiles": 0},
                  {"status": "no_tissue", "reason": "no tissue", "n_tiles": 0, "precision": "bf16"}),
    })
    table = status_table(rows, tmp_path / "tiles", tmp_path / "features").set_index("slide_id")
    assert table.loc["good", ["status", "stage", "n_tiles", "n_features"]].tolist() == [OK, "", 5, 5]
    late = table.loc["late"]
    assert (late.status, late.stage, late.tiling_status, late.n_tiles, late.n_features) == \
        ("unreadable", "features", OK, 7, 0)
    assert late.reason == "damaged. Fix: x"
    assert table.loc["blank", ["status", "stage", "reason"]].tolist() == ["no_tissue", "tiling", "no tissue"]
    assert precision_report(table.reset_index()) is None
    tiling_only = status_table(rows, tmp_path / "tiles", None).set_index("slide_id")
    assert tiling_only.loc["late", "status"] == OK and tiling_only.loc["late", "features_status"] == ""


def test_mixed_precisions_are_named_with_the_fix(tmp_path, caplog):
    rows = cohort(tmp_path, {
        f"s{i}": ({"status": OK, "reason": "", "n_tiles": 3},
                  {"status": OK, "reason": "", "n_tiles": 3, "precision": "bf16" if i < 4 else "fp32"})
        for i in range(5)})
    table = status_table(rows, tmp_path / "tiles", tmp_path / "features")
    text = precision_report(table)
    assert "bf16: 4 (s0, s1, s2, ...)" in text and "fp32: 1 (s4)" in text and "set features.precision" in text
    out = tmp_path / "qc" / "status.tsv"
    assert main(["--slides", str(tmp_path / "slides.tsv"), "--tiles-dir", str(tmp_path / "tiles"),
                 "--features-dir", str(tmp_path / "features"), "--out", str(out)]) == 0
    assert "different precisions" in caplog.text
    back = pd.read_csv(out, sep="\t", keep_default_na=False)
    assert back["precision"].tolist() == ["bf16"] * 4 + ["fp32"]


def test_a_missing_store_is_an_error_naming_it(tmp_path, capsys):
    cohort(tmp_path, {"a": ({"status": OK, "reason": "", "n_tiles": 1}, {"status": OK, "reason": "", "n_tiles": 1})})
    pd.DataFrame({"slide_id": ["a", "b"], "patient_id": ["Pa", "Pb"]}).to_csv(tmp_path / "slides.tsv", sep="\t",
                                                                               index=False)
    assert main(["--slides", str(tmp_path / "slides.tsv"), "--tiles-dir", str(tmp_path / "tiles"),
                 "--out", str(tmp_path / "s.tsv")]) == 1
    assert "b.zarr" in capsys.readouterr().err


def imported_cohort(tmp_path: Path, dims: dict[str, int], encoders: dict[str, str]) -> list[str]:
    """slide 't' tiled and extracted (8-d); the others imported from h5 files with the given widths/encoders."""
    cohort(tmp_path, {"t": ({"status": OK, "reason": "", "n_tiles": 4}, {"status": OK, "reason": "", "n_tiles": 4})})
    for sid, dim in dims.items():
        store(tmp_path / "features" / f"{sid}.zarr", slide_id=sid, encoder="enc", feature_dim=dim, status=OK,
              reason="", n_tiles=6, mpp=0.25, source_h5=f"/h5/{sid}.h5", source_encoder=encoders.get(sid, ""))
    pd.DataFrame({"slide_id": ["t", *dims], "patient_id": ["Pt", *(f"P{s}" for s in dims)],
                  "features_path": ["", *(f"/h5/{s}.h5" for s in dims)]}).to_csv(tmp_path / "slides.tsv", sep="\t",
                                                                                   index=False)
    return ["--slides", str(tmp_path / "slides.tsv"), "--tiles-dir", str(tmp_path / "tiles"), "--features-dir",
            str(tmp_path / "features"), "--out", str(tmp_path / "qc" / "status.tsv")]


def test_imported_slides_are_ok_without_a_tiles_store(tmp_path):
    args = imported_cohort(tmp_path, {"a": 8, "b": 8}, {"a": "uni_v1"})
    assert main(args) == 0
    table = pd.read_csv(tmp_path / "qc" / "status.tsv", sep="\t", keep_default_na=False).set_index("slide_id")
    assert table.loc["a", ["status", "stage", "tiling_status", "n_tiles", "mpp", "features_source",
                           "source_encoder"]].tolist() == [OK, "imported", "", 6, 0.25, "/h5/a.h5", "uni_v1"]
    assert table.loc["t", ["status", "stage", "features_source"]].tolist() == [OK, "", ""]
    assert table.loc["b", "store"] == "" and not (tmp_path / "tiles" / "a.zarr").exists()


def test_a_cohort_mixing_widths_or_encoders_is_an_error_naming_the_files(tmp_path, capsys):
    assert main(imported_cohort(tmp_path / "w", {"a": 8, "b": 16, "c": 16}, {})) == 1
    err = capsys.readouterr().err
    assert "differ in width (16: 2 (/h5/b.h5, /h5/c.h5); 8: 2 (" in err and "features.encoder" in err
    assert not (tmp_path / "w" / "qc" / "status.tsv").exists()
    assert main(imported_cohort(tmp_path / "e", {"a": 8, "b": 8, "c": 8}, {"a": "uni_v1", "b": "conch_v15"})) == 1
    err = capsys.readouterr().err
    assert "name different encoders (conch_v15: 1 (/h5/b.h5); uni_v1: 1 (/h5/a.h5))" in err
    assert main(imported_cohort(tmp_path / "s", {"a": 8, "b": 8}, {"a": "UNI_v1", "b": "uni_v1"})) == 0
