"""The Snakemake workflow, run for real: lint, a cohort in its own work directory, faults, re-runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from wsiomics.synth.__main__ import main as synth_main

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

pytestmark = pytest.mark.integration


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wf") / "cohort"
    synth_main(["--out", str(out), "--n-patients", "4", "--slide-width-um", "1600", "--slide-height-um", "1200",
                "--n-genes", "100", "--seed", "7"])
    return out


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "--directory", str(work))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_lint_is_clean():
    proc = subprocess.run([SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "good condition" in proc.stdout + proc.stderr


def test_cohort_runs_in_its_own_work_directory(run, cohort):
    status = pd.read_csv(run / "results" / "qc" / "slide_status.tsv", sep="\t", keep_default_na=False)
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", keep_default_na=False)
    slide_ids = [s for s in sheet.slide_id if s]
    assert sorted(status.slide_id) == sorted(slide_ids)
    by_status = status.groupby("status").slide_id.apply(sorted).to_dict()
    assert {k: len(v) for k, v in by_status.items() if k != "ok"} == {"no_mpp": 1, "no_tissue": 1, "unreadable": 1}
    assert len(by_status["ok"]) == len(slide_ids) - 3
    for slide_id in slide_ids:
        assert (run / "results" / "tiles" / f"{slide_id}.zarr" / "zarr.json").exists()
        assert (run / "results" / "qc" / "tiles" / f"{slide_id}.png").exists()
        assert (run / "logs" / "tile" / f"{slide_id}.log").exists()
        assert (run / "benchmarks" / "tile" / f"{slide_id}.tsv").exists()
    assert status.loc[status.status == "ok", "n_tiles"].astype(int).gt(0).all()


def test_rerun_is_a_no_op(run, cohort):
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "--directory", str(run), "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def test_fixed_slide_is_retiled_on_rerun(cohort, tmp_path):
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", keep_default_na=False)
    good = sheet[sheet.slide_id.str.endswith("DX1")].iloc[0]
    slide = tmp_path / "fixme.svs"
    slide.write_bytes((cohort / good.slide_path).read_bytes()[:3000])
    one = pd.DataFrame([{"patient_id": "P1", "slide_id": "fixme", "slide_path": str(slide)}])
    one.to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    args = ("--config", f"samples={tmp_path / 'samples.tsv'}", "--directory", str(tmp_path / "work"))
    assert snakemake(*args).returncode == 0
    status = pd.read_csv(tmp_path / "work" / "results" / "qc" / "slide_status.tsv", sep="\t")
    assert status.status.tolist() == ["unreadable"]
    shutil.copy(cohort / good.slide_path, slide)  # the user replaces the broken file
    proc = snakemake(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = pd.read_csv(tmp_path / "work" / "results" / "qc" / "slide_status.tsv", sep="\t")
    assert status.status.tolist() == ["ok"] and status.n_tiles[0] > 0


def test_strict_mode_fails_on_a_bad_slide(cohort, tmp_path):
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "strict=true", "--directory", str(tmp_path))
    assert proc.returncode != 0
    assert "strict" in proc.stdout + proc.stderr


def test_sheet_problems_fail_before_any_job(cohort, tmp_path):
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", keep_default_na=False)
    sheet["slide_path"] = [str(cohort / p) if p else "" for p in sheet.slide_path]
    sheet["expression_path"] = [str(cohort / p) if p else "" for p in sheet.expression_path]
    sheet["annotation_path"] = [str(cohort / p) if p else "" for p in sheet.annotation_path]
    sheet.loc[1, "slide_id"] = sheet.loc[0, "slide_id"]  # duplicate
    sheet.loc[2, "slide_path"] = str(tmp_path / "missing.svs")  # missing file
    sheet.loc[3, "slide_id"] = "bad id/with slash"  # unsafe name
    sheet.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    proc = snakemake("--config", f"samples={tmp_path / 'bad.tsv'}", "--directory", str(tmp_path / "work"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "3 problems" in out and "already used" in out and "missing.svs" in out and "bad id/with slash" in out
    assert not (tmp_path / "work" / "results").exists()


def test_config_typo_is_rejected(cohort, tmp_path):
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "stirct=true", "--directory", str(tmp_path),
                     "-n")
    assert proc.returncode != 0 and "stirct" in proc.stdout + proc.stderr


def test_demo_dry_run_from_a_fresh_directory(tmp_path):
    proc = snakemake("--directory", str(tmp_path), "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "synth_cohort" in out


def test_adding_mpp_to_the_sheet_retiles_the_slide(cohort, tmp_path):
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", keep_default_na=False)
    no_mpp = sheet[sheet.slide_id.str.endswith("DX8")].iloc[0]  # the generator's slide without MPP metadata
    row = {"patient_id": "P1", "slide_id": "nompp", "slide_path": str(cohort / no_mpp.slide_path), "mpp": ""}
    args = ("--config", f"samples={tmp_path / 'samples.tsv'}", "--directory", str(tmp_path / "work"))
    pd.DataFrame([row]).to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    assert snakemake(*args).returncode == 0
    status = pd.read_csv(tmp_path / "work" / "results" / "qc" / "slide_status.tsv", sep="\t")
    assert status.status.tolist() == ["no_mpp"] and "'mpp' column" in status.reason[0]
    pd.DataFrame([{**row, "mpp": "0.5"}]).to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    proc = snakemake(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = pd.read_csv(tmp_path / "work" / "results" / "qc" / "slide_status.tsv", sep="\t")
    assert status.status.tolist() == ["ok"] and status.mpp_source[0] == "sample_sheet"
