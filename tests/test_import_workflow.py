"""The sheet's features_path through the workflow: TRIDENT and CLAM h5 files and a feature store are imported
(never tiled) next to a slide that is tiled and extracted, and the errors of a bad cohort stop it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from test_features_interop import CLAM_COORD_ATTRS, TRIDENT_COORD_ATTRS, random_slide, write_h5
from test_workflow import read_status, snakemake, write_sheet

from wsiomics.io import open_store

pytestmark = pytest.mark.integration
DIM = 96  # test_resnet's width (the workflow tests' encoder)


@pytest.fixture(scope="module")
def slide_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imp") / "cohort"
    cmd = [sys.executable, "-m", "wsiomics.synth", "--out", str(out), "--n-patients", "4", "--slide-width-um", "1500",
           "--slide-height-um", "1000", "--n-genes", "100", "--no-faults", "--fraction-second-slide", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def feature_sheet(folder: Path, slide_cohort: Path, dims=(DIM, DIM, DIM), broken: bool = False) -> Path:
    """One tiled slide (patient P0), a TRIDENT h5 (P1), a CLAM h5 (P2) and a wsiomics store (P3)."""
    first = pd.read_csv(slide_cohort / "samples.tsv", sep="\t", keep_default_na=False).iloc[0]
    trident = folder / "trident" / "features_uni_v1"
    trident.mkdir(parents=True)
    (folder / "clam" / "h5_files").mkdir(parents=True)
    write_h5(trident / "S1.h5", *random_slide(30, dims[0], seed=1), TRIDENT_COORD_ATTRS)
    write_h5(folder / "clam" / "h5_files" / "S2.h5", *random_slide(20, dims[1], seed=2), CLAM_COORD_ATTRS)
    store_h5 = write_h5(folder / "S3.h5", *random_slide(25, dims[2], seed=3), TRIDENT_COORD_ATTRS)
    from wsiomics.features.interop import import_h5

    import_h5(store_h5, folder / "S3.zarr", "test_resnet")
    rows = [{"patient_id": "P0", "slide_id": "S0", "slide_path": str(slide_cohort / first.slide_path),
             "label": "a", "features_path": ""},
            {"patient_id": "P1", "slide_id": "S1", "slide_path": "", "label": "b",
             "features_path": "trident/features_uni_v1/S1.h5"},
            {"patient_id": "P2", "slide_id": "S2", "slide_path": "", "label": "a",
             "features_path": "clam/h5_files/S2.h5"},
            {"patient_id": "P3", "slide_id": "S3", "slide_path": "", "label": "b", "features_path": "S3.zarr"}]
    if broken:  # a CLAM pt-style file: features but no coords
        with h5py.File(folder / "nocoords.h5", "w") as f:
            f.create_dataset("features", data=np.zeros((5, DIM), np.float32))
        rows.append({"patient_id": "P4", "slide_id": "S4", "slide_path": "", "label": "a",
                     "features_path": "nocoords.h5"})
    return write_sheet(folder / "samples.tsv", rows)


def test_imported_slides_skip_tiling_and_join_the_status_table(slide_cohort, tmp_path):
    sheet = feature_sheet(tmp_path, slide_cohort)
    work = tmp_path / "work"
    proc = snakemake("--config", f"samples={sheet}", "--directory", str(work), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    status = read_status(work).set_index("slide_id")
    assert status["status"].eq("ok").all()
    assert status["stage"].to_dict() == {"S0": "", "S1": "imported", "S2": "imported", "S3": "imported"}
    assert status.loc["S1", "source_encoder"] == "uni_v1" and status.loc["S2", "source_encoder"] == ""
    assert status.loc["S3", "features_source"] == str(tmp_path / "S3.zarr")
    assert sorted(p.name for p in (work / "results" / "tiles").iterdir()) == ["S0.zarr"]  # only the slide is tiled
    for sid, n in (("S1", 30), ("S2", 20), ("S3", 25)):
        store = open_store(work / "results" / "features" / "test_resnet" / f"{sid}.zarr")
        assert store["features"].shape == (n, DIM) and store.attrs["encoder"] == "test_resnet"
        assert store.attrs["slide_id"] == sid and store.attrs["patient_id"] == f"P{sid[1]}"
        assert (work / "logs" / "import_features" / "test_resnet" / f"{sid}.log").is_file()
    extraction_logs = "".join(p.read_text() for p in (work / "logs" / "extract_features" / "test_resnet").iterdir())
    assert "S0: ok" in extraction_logs and "S1" not in extraction_logs  # only the slide is extracted
    proc = snakemake("--config", f"samples={sheet}", "--directory", str(work), "-n", cwd=tmp_path)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def test_a_file_of_another_width_or_layout_fails_its_import_with_the_file_and_the_fix(slide_cohort, tmp_path):
    sheet = feature_sheet(tmp_path, slide_cohort, dims=(DIM, 64, DIM), broken=True)
    work = tmp_path / "work"
    proc = snakemake("--config", f"samples={sheet}", "--directory", str(work), "--until", "import_features",
                     cwd=tmp_path, timeout=600)
    assert proc.returncode != 0
    logs = work / "logs" / "import_features" / "test_resnet"
    wrong_width = (logs / "S2.log").read_text()
    assert "S2.h5: 64-wide features, but features.encoder test_resnet gives 96-wide ones" in wrong_width
    assert "nocoords.h5: no 'coords' dataset" in (logs / "S4.log").read_text()
    assert not (work / "results" / "features" / "test_resnet" / "S2.zarr").exists()
    assert (work / "results" / "features" / "test_resnet" / "S1.zarr").exists()  # keep-going: the others import


def test_a_cohort_mixing_widths_under_an_unknown_encoder_stops_at_the_status_table(slide_cohort, tmp_path):
    sheet = feature_sheet(tmp_path, slide_cohort, dims=(DIM, 64, DIM))
    rows = pd.read_csv(sheet, sep="\t", keep_default_na=False).iloc[1:3]  # the two h5 files only
    rows.drop(columns="slide_path").to_csv(sheet, sep="\t", index=False)  # the column may be left out
    work = tmp_path / "work"
    proc = snakemake("--config", f"samples={sheet}", "features={encoder: conch_v15}", "--directory", str(work),
                     cwd=tmp_path, timeout=600)
    assert proc.returncode != 0
    log = (work / "logs" / "slide_status.log").read_text()
    assert "differ in width (64: 1 (" in log and "clam/h5_files/S2.h5" in log
    assert not (work / "results" / "qc" / "slide_status.tsv").exists()
