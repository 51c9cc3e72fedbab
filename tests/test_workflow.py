"""The Snakemake workflow, run for real: lint, a cohort in its own work directory, faults, strict mode, re-runs.

Every snakemake and generator call is a subprocess with a timeout. The whole module takes about a minute
on 2 cores; the tests are marked ``integration`` but run in the default ``pytest`` invocation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
FAULTS = {"no_mpp": 1, "no_tissue": 1, "unreadable": 1}  # what the generator's faults give
# A tiny timm CNN instead of the demo's ResNet-50, so feature extraction costs seconds, not minutes.
FAST_FEATURES = "features={encoder: test_resnet, num_workers: 0, batch_size: 32}"
# These tests are about tiling, features, expression and re-runs; training has its own tests.
_SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())["properties"]
NO_TRAINING = ["train={run: []}"] if "train" in _SCHEMA else []

pytestmark = pytest.mark.integration


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """The repo's Snakefile on 2 cores with FAST_FEATURES; ``args`` usually carry --config ... and --directory ..."""
    args = list(args)
    if "--config" in args:
        args[args.index("--config") + 1:args.index("--config") + 1] = [FAST_FEATURES, *NO_TRAINING]
    else:
        args = ["--config", FAST_FEATURES, *NO_TRAINING, *args]
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def read_status(work: Path) -> pd.DataFrame:
    return pd.read_csv(work / "results" / "qc" / "slide_status.tsv", sep="\t", keep_default_na=False)


def write_sheet(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A small synthetic cohort with the generator's faults, written by its command line."""
    out = tmp_path_factory.mktemp("wf") / "cohort"
    # 6 patients: with 3 folds every fold keeps >= 2 training patients with expression to normalise on
    cmd = [sys.executable, "-m", "wsiomics.synth", "--out", str(out), "--n-patients", "6", "--slide-width-um", "2000",
           "--slide-height-um", "1500", "--n-genes", "200", "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sheet(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "samples.tsv", sep="\t", keep_default_na=False)


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory) -> Path:
    """The cohort run from outside the repository, with the Snakefile given by path."""
    work = tmp_path_factory.mktemp("work")
    # ~1 min on 2 quiet cores; the generous timeout is for a machine shared with other heavy runs
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "--directory", str(work), cwd=work.parent,
                     timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return work


def test_lint_is_clean():
    proc = subprocess.run([SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Lints for" not in out and "good condition" in out


def test_cohort_runs_in_its_own_work_directory(run, sheet):
    status = read_status(run)
    slide_ids = [s for s in sheet.slide_id if s]
    assert sorted(status.slide_id) == sorted(slide_ids)  # one row per slide; expression-only rows have none
    counts = status.status.value_counts().to_dict()
    assert {k: v for k, v in counts.items() if k != "ok"} == FAULTS
    assert counts["ok"] == len(slide_ids) - sum(FAULTS.values())
    assert status.loc[status.status == "ok", "n_tiles"].astype(int).gt(0).all()
    for slide_id in slide_ids:
        assert (run / "results" / "tiles" / f"{slide_id}.zarr" / "zarr.json").is_file()
        assert (run / "results" / "qc" / "tiles" / f"{slide_id}.png").is_file()
        assert (run / "logs" / "tile" / f"{slide_id}.log").is_file()
        assert (run / "benchmarks" / "tile" / f"{slide_id}.tsv").is_file()
    # The sheet's mpp column reaches the job: the generator's slide without metadata but with an override.
    overridden = sheet[sheet.mpp != ""].slide_id.tolist()
    assert overridden
    assert status.set_index("slide_id").loc[overridden, "mpp_source"].eq("sample_sheet").all()


def test_every_slide_gets_a_feature_store(run, sheet):
    """ok slides: one feature row per tile, in the tiles store's order; the others: an empty store with the status."""
    import zarr

    status = read_status(run).set_index("slide_id")
    for slide_id, row in status.iterrows():
        store = zarr.open_group(str(run / "results" / "features" / "test_resnet" / f"{slide_id}.zarr"), mode="r")
        tiles = zarr.open_group(str(run / "results" / "tiles" / f"{slide_id}.zarr"), mode="r")
        assert store.attrs["complete"] and store.attrs["status"] == row.status == row.features_status
        assert row.stage == ("" if row.status == "ok" else "tiling") and row.tiling_status == row.status
        assert row.precision == store.attrs["precision"] and row.encoder == "test_resnet"
        assert store.attrs["encoder"] == "test_resnet" and store.attrs["weights"]["source"] == "random"
        assert store["features"].shape == (int(row.n_tiles), 96)
        assert (store["coords"][...] == tiles["coords"][...]).all()
    # the config's slides_per_job: one log per batch of slides, naming each slide it encoded
    logs = "".join(p.read_text() for p in (run / "logs" / "extract_features" / "test_resnet").glob("b*.log"))
    assert all(f"{slide_id}: " in logs for slide_id in status.index)


def test_rerun_is_a_no_op(run, cohort):
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "--directory", str(run), "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def test_sheet_problems_fail_before_any_job(cohort, sheet, tmp_path):
    bad = sheet.copy()
    for col in ("slide_path", "annotation_path", "expression_path"):
        bad[col] = [str(cohort / p) if p else "" for p in bad[col]]
    bad.loc[1, "slide_id"] = bad.loc[0, "slide_id"]  # duplicate
    bad.loc[2, "slide_path"] = str(tmp_path / "missing.svs")  # missing file
    bad.loc[3, "slide_id"] = "bad id/with slash"  # unsafe name
    bad.loc[4, "mpp"] = "fast"  # not a number
    bad.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    work = tmp_path / "work"
    proc = snakemake("--config", f"samples={tmp_path / 'bad.tsv'}", "--directory", str(work))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "4 problems" in out, out[-3000:]
    for expected in ("row 3, column 'slide_id'", "already used on row 2", "missing.svs", "bad id/with slash",
                     "mpp 'fast'", "No job was started"):
        assert expected in out, expected
    assert not (work / "results").exists() and not (work / "logs").exists()


def test_missing_sheet_is_reported(tmp_path):
    proc = snakemake("--config", f"samples={tmp_path / 'nope.tsv'}", "--directory", str(tmp_path / "work"), "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "nope.tsv" in out and "does not exist" in out


def test_strict_mode_fails_on_a_bad_slide(cohort, sheet, tmp_path):
    good = sheet[(sheet.slide_id != "") & (sheet.mpp == "")].iloc[0]
    broken = sheet[sheet.slide_id.str.endswith("DX6")].iloc[0]  # the generator's truncated slide
    rows = [{"patient_id": r.patient_id, "slide_id": r.slide_id, "slide_path": str(cohort / r.slide_path)}
            for r in (good, broken)]
    samples = write_sheet(tmp_path / "samples.tsv", rows)
    work = tmp_path / "work"
    proc = snakemake("--config", f"samples={samples}", "strict=true", "--directory", str(work), "--keep-going",
                     "--show-failed-logs")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "strict mode" in out and broken.slide_id in out
    assert not (work / "results" / "qc" / "slide_status.tsv").exists()
    assert (work / "results" / "tiles" / f"{good.slide_id}.zarr").is_dir()  # independent slides still ran
    assert not (work / "results" / "tiles" / f"{broken.slide_id}.zarr").exists()


def test_fixed_slide_is_retiled_on_rerun(cohort, sheet, tmp_path):
    good = sheet[(sheet.slide_id != "") & (sheet.mpp == "")].iloc[0]
    slide = tmp_path / "fixme.tiff"
    slide.write_bytes((cohort / good.slide_path).read_bytes()[:3000])  # a transfer cut short
    samples = write_sheet(tmp_path / "samples.tsv", [{"patient_id": "P1", "slide_id": "fixme",
                                                      "slide_path": str(slide)}])
    args = ("--config", f"samples={samples}", "--directory", str(tmp_path / "work"))
    assert snakemake(*args).returncode == 0
    assert read_status(tmp_path / "work").status.tolist() == ["unreadable"]
    shutil.copy(cohort / good.slide_path, slide)  # the user replaces the broken file
    proc = snakemake(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = read_status(tmp_path / "work")
    assert status.status.tolist() == ["ok"] and int(status.n_tiles[0]) > 0


def test_config_overrides_reach_the_command_line(cohort, tmp_path):
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "tiling={patch_size: 256, mask: {dark_max: 40}}",
                     "--directory", str(tmp_path), "-n", "-p")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "--patch-size 256" in out and "--mask-dark-max 40" in out
    assert "--target-mpp 0.5" in out and "--no-allow-upsampling" in out  # defaults of keys not overridden
    assert "--strict" not in out


def test_config_typo_is_rejected(cohort, tmp_path):
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "stirct=true", "--directory", str(tmp_path),
                     "-n")
    assert proc.returncode != 0 and "stirct" in proc.stdout + proc.stderr


def test_demo_dry_run_from_a_fresh_directory(tmp_path):
    """The default config: the demo cohort does not exist yet, so the DAG starts with the checkpoint."""
    proc = snakemake("--directory", str(tmp_path), "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "synth_cohort" in out
    assert not (tmp_path / "results").exists()


def test_demo_checkpoint_generates_the_cohort_then_tiles_it(tmp_path):
    """A real run of the demo path (small cohort): checkpoint synth_cohort first, then one tile job per slide."""
    # 6 patients: 3 folds keep >= 2 training patients for the expression normalisation
    small = "synth={n_patients: 6, slide_width_um: 1200, slide_height_um: 1000, n_genes: 50, faults: false}"
    proc = snakemake("--config", small, "--directory", str(tmp_path), timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Updating checkpoint dependencies" in out
    sheet = pd.read_csv(tmp_path / "results" / "demo_cohort" / "samples.tsv", sep="\t", keep_default_na=False)
    status = read_status(tmp_path)
    assert sorted(status.slide_id) == sorted(s for s in sheet.slide_id if s)
    assert status.status.eq("ok").all()
    proc = snakemake("--config", small, "--directory", str(tmp_path), "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def planned(*args: str) -> set[str]:
    """Rules of the jobs a dry run would start (its 'Job stats' table), without the target rule `all` and the
    report's jobs (figures, report_landing), which follow any change of what they draw."""
    proc = snakemake(*args, "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    if "Nothing to be done" in out:
        return set()
    table = out.split("Job stats:")[1].split("total")[0].splitlines()[3:]
    return {line.split()[0] for line in table if line.strip()} - {"all", "figures", "report_landing"}


@pytest.mark.slow
def test_adding_mpp_to_the_sheet_retiles_the_slide_and_nothing_patient_level(cohort, sheet, tmp_path):
    """The README's promise, on a sheet with expression: only that slide's tiles and features are redone."""
    import numpy as np

    from wsiomics.synth.expression import gene_model, sample_counts, write_gdc_counts

    no_mpp = sheet[sheet.slide_id.str.endswith("DX8")].iloc[0]  # the generator's slide without MPP metadata
    model, rng = gene_model(100, seed=2), np.random.default_rng(0)
    files = [write_gdc_counts(tmp_path / f"P{i}.tsv", model, sample_counts(model, i % 2, rng), rng)
             for i in range(1, 7)]
    rows = [{"patient_id": "P1", "slide_id": "nompp", "slide_path": str(cohort / no_mpp.slide_path), "mpp": "",
             "label": "a", "expression_path": str(files[0])}]
    rows += [{"patient_id": f"P{i}", "slide_id": "", "slide_path": "", "mpp": "", "label": "ab"[(i - 1) % 2],
              "expression_path": str(files[i - 1])} for i in range(2, 7)]
    args = ("--config", f"samples={tmp_path / 'samples.tsv'}", "splits={n_folds: 2}", "expression={n_top_genes: 20}",
            "--directory", str(tmp_path / "work"))
    write_sheet(tmp_path / "samples.tsv", rows)
    proc = snakemake(*args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    status = read_status(tmp_path / "work")
    assert status.status.tolist() == ["no_mpp"] and "'mpp' column" in status.reason[0]
    results = tmp_path / "work" / "results"
    patient_level = [results / "splits" / "folds.tsv", results / "expression" / "cohort.zarr" / "zarr.json",
                     results / "expression" / "fold0.zarr" / "zarr.json"]
    before = [p.stat().st_mtime_ns for p in patient_level]
    rows[0]["mpp"] = "0.5"
    write_sheet(tmp_path / "samples.tsv", rows)
    # the config's slides_per_job: the slide's batch (here the slide alone) and the link to its usual path
    assert planned(*args) == {"tile", "extract_features_batch", "place_features", "slide_status"}
    proc = snakemake(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = read_status(tmp_path / "work")
    assert status.status.tolist() == ["ok"] and status.mpp_source[0] == "sample_sheet"
    assert [p.stat().st_mtime_ns for p in patient_level] == before


def test_config_and_schema_defaults_match_the_code():
    """config.yaml's tiling section, the schema's defaults and TilingParams must not drift apart."""
    from dataclasses import asdict

    from wsiomics.tiling import TilingParams

    code = asdict(TilingParams())
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert config["tiling"] == code
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    tiling = schema["properties"]["tiling"]["properties"]
    for key, value in code.items():
        if key == "mask":
            for mkey, mvalue in value.items():
                assert tiling["mask"]["properties"][mkey]["default"] == mvalue, mkey
        else:
            assert tiling[key]["default"] == value, key


@pytest.mark.slow
def test_a_plain_snakemake_call_gets_the_default_profile(cohort, tmp_path):
    """README "Running on your cohort": no --workflow-profile, run from elsewhere, still keep-going and co.,
    and one GPU job at a time."""
    assert (REPO / "profiles").resolve() == REPO / "workflow" / "profiles"  # the link Snakemake finds
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "default" / "config.yaml").read_text())
    assert profile["keep-going"] and profile["rerun-incomplete"] and profile["scheduler"] == "greedy"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "--directory", str(tmp_path / "work"), "-n",
                     cwd=elsewhere)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert f"workflow specific profile {REPO / 'profiles' / 'default'}" in out
    assert "python -m wsiomics.tiling tile" in out  # printshellcmds, which this call did not ask for
    proc = snakemake("--config", f"samples={cohort / 'samples.tsv'}", "--directory", str(tmp_path / "work"), "-n",
                     "--workflow-profile", "none", cwd=elsewhere)
    assert "workflow specific profile" not in proc.stdout + proc.stderr
    # GPU jobs are limited to one at a time by the profile's global resource (a real run says what it has)
    assert profile["resources"] == {"gpu": 1}
    proc = snakemake("results/splits/folds.tsv", "--config", f"samples={cohort / 'samples.tsv'}", "--directory",
                     str(tmp_path / "work"), cwd=elsewhere)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert re.search(r'Provided resources: gpu=(Resource\("gpu", )?1\b', out), out[-2000:]


@pytest.mark.slow
def test_extraction_inputs_and_mixed_precisions(cohort, sheet, tmp_path):
    """The slide and a local features.weights checkpoint are inputs of extraction: replacing the checkpoint
    re-extracts every slide (and nothing else), a missing one stops the run before any job. And stores of
    different precisions (features.precision: auto is decided per node; here forced per slide) are reported."""
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "weights" / "test_resnet.safetensors"
    weights.parent.mkdir()
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(weights))
    good = sheet[(sheet.slide_id != "") & (sheet.mpp == "")].head(2)
    rows = [{"patient_id": r.patient_id, "slide_id": r.slide_id, "slide_path": str(cohort / r.slide_path)}
            for r in good.itertuples()]
    samples = write_sheet(tmp_path / "samples.tsv", rows)

    def args(path, precision="auto", work="work", *extra):
        # one job per slide (slides_per_job: 1), so each slide can be extracted at its own precision
        features = ("features={encoder: test_resnet, num_workers: 0, batch_size: 32, pretrained: true, "
                    f"weights: {path}, precision: {precision}, slides_per_job: 1}}")
        return (*extra, "--config", f"samples={samples}", features, "--directory", str(tmp_path / work))

    proc = snakemake(*args(weights), "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    first = rows[0]["slide_id"]
    assert f"input: results/tiles/{first}.zarr, {rows[0]['slide_path']}, {weights}" in out
    for row, precision in zip(rows, ("fp32", "bf16"), strict=True):
        target = f"results/features/test_resnet/{row['slide_id']}.zarr"
        proc = snakemake(*args(weights, precision, "work", target))
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    proc = snakemake(*args(weights, "auto", "work", "results/qc/slide_status.tsv", "--rerun-triggers", "mtime"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "different precisions (bf16: 1" in out and "fp32: 1" in out and "set features.precision" in out
    assert sorted(read_status(tmp_path / "work").precision) == ["bf16", "fp32"]
    mtime_only = ("--rerun-triggers", "mtime")
    assert planned(*args(weights), *mtime_only) == set()
    weights.write_bytes(weights.read_bytes())  # the checkpoint is replaced (same path, newer file)
    assert planned(*args(weights), *mtime_only) == {"extract_features", "slide_status"}
    proc = snakemake(*args(tmp_path / "weights" / "gone.pt", "auto", "fresh"), "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Missing input files" in out and "gone.pt" in out



def test_extraction_batches_share_a_job_and_a_bad_slide_fails_alone(cohort, sheet, tmp_path):
    """features.slides_per_job: the tiled slides go, in sheet order, slides_per_job to a job; every store still
    lands at its usual path; a slide whose tiles cannot be encoded fails its own place_features job only, and
    the rest of its batch is extracted; once the slide is fixed, the batch runs again and encodes only it."""
    rows = [{"patient_id": r.patient_id, "slide_id": r.slide_id, "slide_path": str(cohort / r.slide_path)}
            for r in sheet[(sheet.slide_id != "") & (sheet.mpp == "")].head(3).itertuples()]
    samples = write_sheet(tmp_path / "samples.tsv", rows)
    work = tmp_path / "work"
    features = "features={encoder: test_resnet, num_workers: 0, batch_size: 32, slides_per_job: 2}"
    proc = snakemake("--config", f"samples={samples}", features, "--directory", str(work), "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    stats = out.split("Job stats:")[1].split("total")[0]
    assert re.search(r"extract_features_batch\s+2\b", stats) and re.search(r"place_features\s+3\b", stats)
    assert not re.search(r"^extract_features\s", stats, flags=re.M)
    batch = re.search(r"rule extract_features_batch:\n\s+input: ([^\n]+)\n\s+output: [^\n]*b00000", out)
    assert batch and batch.group(1).startswith(", ".join(f"results/tiles/{r['slide_id']}.zarr" for r in rows[:2]))

    # The first slide's tiles store is damaged after tiling: its extraction fails, its batch-mate's does not.
    tiles = [f"results/tiles/{r['slide_id']}.zarr" for r in rows]
    targets = [f"results/features/test_resnet/{r['slide_id']}.zarr" for r in rows]
    proc = snakemake("--config", f"samples={samples}", features, "--directory", str(work), *tiles)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    shutil.rmtree(work / tiles[0] / "coords")
    proc = snakemake("--config", f"samples={samples}", features, "--directory", str(work), "--keep-going",
                     "--rerun-triggers=mtime", *targets)  # "=": the flag takes several values
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    stores = work / "results" / "features" / "test_resnet"
    assert not (stores / f"{rows[0]['slide_id']}.zarr").exists()
    assert all((stores / f"{r['slide_id']}.zarr" / "zarr.json").is_file() for r in rows[1:]), out[-4000:]
    failed = (work / "logs" / "place_features" / "test_resnet" / f"{rows[0]['slide_id']}.log").read_text()
    assert "failed in its batch" in failed and "b00000.log" in failed

    # Re-tiled, the slide is encoded; its batch-mate's staged store is current, so it is not encoded again.
    shutil.rmtree(work / tiles[0])
    proc = snakemake("--config", f"samples={samples}", features, "--directory", str(work), "--rerun-triggers=mtime",
                     *targets)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    assert all((stores / f"{r['slide_id']}.zarr" / "zarr.json").is_file() for r in rows)
    log = (work / "logs" / "extract_features" / "test_resnet" / "b00000.log").read_text()
    assert f"{rows[1]['slide_id']}: " in log and "is current, skipped" in log
    assert f"{rows[0]['slide_id']}: ok" in log
    assert not list((stores / ".batches").glob("*.done"))  # the batches' markers are temporary


STAGE_LIBRARIES = ("torch", "timm", "scanpy", "anndata", "sklearn", "cv2", "openslide", "zarr", "matplotlib")


@pytest.mark.slow
def test_parsing_imports_no_stage_library_and_job_steps_skip_the_sheet_checks(cohort, sheet, tmp_path):
    """Snakemake (and every SLURM job step) parses the workflow with the launcher's Python: it must not need
    the rules' libraries, and a job step must not re-check (stat) every file of the sheet."""
    blockers = tmp_path / "blockers"
    for name in STAGE_LIBRARIES:
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(f"raise ImportError('{name} imported while parsing')\n")
    env = {**os.environ, "PYTHONPATH": str(blockers)}
    slides = sheet[sheet.slide_id != ""].head(2)
    copies = []
    for r in slides.itertuples():
        copies.append(tmp_path / Path(r.slide_path).name)
        shutil.copy(cohort / r.slide_path, copies[-1])
    rows = [{"patient_id": r.patient_id, "slide_id": r.slide_id, "slide_path": str(c)}
            for r, c in zip(slides.itertuples(), copies, strict=True)]
    samples = write_sheet(tmp_path / "samples.tsv", rows)
    work = tmp_path / "work"
    proc = snakemake("--config", f"samples={samples}", "--directory", str(work), "-n", env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (work / "results" / "sheet" / "patients.tsv").is_file()  # the main process writes the views
    shutil.rmtree(work / "results")
    copies[1].unlink()  # the other slide is not visible from this "node"
    job = ("--target-jobs", f"tile:slide_id={rows[0]['slide_id']}", "--allowed-rules", "tile", "--force",
           "--nolock", "--mode", "remote")
    proc = snakemake("--config", f"samples={samples}", "--directory", str(work), *job, "-n", env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not (work / "results").exists()  # job steps only read the views
    proc = snakemake("--config", f"samples={samples}", "--directory", str(work), "-n", env=env)
    assert proc.returncode != 0 and "does not exist" in proc.stdout + proc.stderr  # the main process checks


def test_slurm_profile_gives_extraction_batches_what_it_gives_one_slide():
    """features.slides_per_job > 1 runs extract_features_batch instead of extract_features: on SLURM it must get
    the same GPU, CPUs per GPU and threads (the runtime grows with the batch)."""
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    single, batch = (profile["set-resources"][r] for r in ("extract_features", "extract_features_batch"))
    for key in ("gpu", "cpus_per_gpu", "mem_mb"):
        assert batch[key] == single[key], key
    assert profile["set-threads"]["extract_features_batch"] == profile["set-threads"]["extract_features"]
    assert int(str(batch["runtime"]).split("*")[0]) > int(str(single["runtime"]).split("*")[0])
