"""The training rules in the DAG: which methods pretrain, which inputs each method gets, unknown methods."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sheet(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trainwf") / "cohort"
    cmd = [sys.executable, "-m", "wsiomics.synth", "--out", str(out), "--n-patients", "8", "--slide-width-um", "1500",
           "--slide-height-um", "1000", "--n-genes", "100", "--workers", "2", "--no-faults"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "samples.tsv"


def dry_run(sheet: Path, work: Path, *config: str) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "2", "-n", "-p", "--directory", str(work),
           "--config", f"samples={sheet}", "splits={n_folds: 2}", *config]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


def test_methods_get_their_stages_and_modalities(sheet, tmp_path):
    proc = dry_run(sheet, tmp_path, "train={run: [gimp, gene_only, image_only, linear]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    commands = [line for line in out.splitlines() if "python -m wsiomics.train " in line]
    pre = [c for c in commands if " pretrain " in c]
    fine = [c for c in commands if " finetune " in c]
    assert len(pre) == 2 and all("--method gimp " in c for c in pre)  # only gimp pretrains, once per fold
    assert len(fine) == 8

    def of(method: str) -> list[str]:
        return [c for c in fine if f"--method {method} " in c]

    assert all("--pretrained results/models/gimp/fold" in c for c in of("gimp"))
    assert all("--features" not in c and "--expression" in c for c in of("gene_only"))
    assert all("--features" in c and "--expression" not in c for c in of("image_only"))
    assert all("--features" in c and "--expression" in c for c in of("linear"))
    folds = {re.search(r"--fold (\d+)", c).group(1) for c in fine}
    assert folds == {"0", "1"}
    assert "summarize_models" in out
    assert "python -m wsiomics.summary --out-dir results/summary " in out  # rule summarize, a default target


def test_unknown_method_is_rejected_before_any_job(sheet, tmp_path):
    proc = dry_run(sheet, tmp_path, "train={run: [gimp, gimpp]}")
    assert proc.returncode != 0
    assert "unknown method 'gimpp'" in proc.stdout + proc.stderr


def test_training_jobs_depend_on_the_cohort_status_not_on_every_feature_store(sheet, tmp_path):
    """At 10,000 slides, one edge per feature store per training job would make the DAG (and every dry run)
    slow; the status table after features stands for them all."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "2", "--dag", "--directory", str(tmp_path),
           "--config", f"samples={sheet}", "splits={n_folds: 2}", "train={run: [image_only]}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rule_of = dict(re.findall(r'^\s*(\d+)\[label = "([a-z_]+)', proc.stdout, flags=re.M))
    edges = re.findall(r"^\s*(\d+) -> (\d+)", proc.stdout, flags=re.M)
    into_finetune = {rule_of[a] for a, b in edges if rule_of[b] == "finetune"}
    assert "slide_status" in into_finetune and "place_features" not in into_finetune, into_finetune
    assert "place_features" in {rule_of[a] for a, b in edges if rule_of[b] == "slide_status"}  # slides_per_job 8


def test_survival_methods_run_on_a_sheet_with_follow_up_and_are_skipped_without(sheet, tmp_path):
    import pandas as pd

    with_follow_up = sheet.with_name("samples_survival.tsv")
    table = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    table["time"] = [str(100 + 10 * int(p[-2:])) for p in table["patient_id"]]
    table["event"] = [str(int(p[-1]) % 2) for p in table["patient_id"]]
    table.to_csv(with_follow_up, sep="\t", index=False)
    run = "train={run: [gimp_survival, gene_only_survival, coxph]}"
    proc = dry_run(with_follow_up, tmp_path / "with", run)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    commands = [line for line in out.splitlines() if "python -m wsiomics.train " in line]
    pre = [c for c in commands if " pretrain " in c]
    assert len(pre) == 2 and all("--method gimp " in c for c in pre)  # gimp_survival needs gimp's pretraining
    fine = [c for c in commands if " finetune " in c]
    assert len(fine) == 6 and all("--samples" in c for c in fine)  # the sheet carries the follow-up
    assert all("--pretrained results/models/gimp/fold" in c for c in fine if "--method gimp_survival " in c)
    assert "finetune_survival" in out and "event" in (tmp_path / "with" / "results/sheet/patients.tsv").read_text()
    proc = dry_run(sheet, tmp_path / "without", run)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "gimp_survival skipped, no patient has survival time and event" in out
    assert "finetune_survival" not in out


ALL_KINDS = "train={run: [linear, gimp, mgi, mgi_no_pretrain, cca, mgi_seg, image_seg]}"


@pytest.fixture(scope="module", params=["no_label_column", "one_class"])
def label_free_sheet(sheet, request) -> Path:
    """The cohort's sheet without labels: no label column at all, or every patient in the same class. Written
    beside the original so its relative slide, annotation and expression paths still resolve."""
    table = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    if request.param == "no_label_column":
        table = table.drop(columns="label")
    else:
        table["label"] = "tumour"
    out = sheet.with_name(f"samples_{request.param}.tsv")
    table.to_csv(out, sep="\t", index=False)
    return out


def test_label_free_cohort_skips_classification_and_still_summarises(label_free_sheet, tmp_path):
    """Labels are optional in the sheet: without two classes the classification fine-tunes are left out (and
    the log says why); cca (retrieval), segmentation, and MGI's pretraining (retrieval; mgi_seg's start) still
    run, and the summary is still a target, reading MGI's pretraining metrics."""
    proc = dry_run(label_free_sheet, tmp_path, ALL_KINDS)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    commands = [line for line in out.splitlines() if "python -m wsiomics.train " in line]
    fine = {re.search(r"--method (\S+)", c).group(1) for c in commands if " finetune " in c}
    pre = {re.search(r"--method (\S+)", c).group(1) for c in commands if " pretrain " in c}
    assert fine == {"cca", "mgi_seg", "image_seg"}, fine
    assert pre == {"mgi"}, pre
    for name in ("linear", "gimp", "mgi_no_pretrain"):
        assert re.search(rf"train\.run: {name} skipped, .*fewer than two classes", out), out[-3000:]
    assert re.search(r"train\.run: mgi fine-tune skipped, .*fewer than two classes", out), out[-3000:]
    summary = [line for line in out.splitlines() if "python -m wsiomics.train summarize" in line]
    assert len(summary) == 1
    assert "results/models/mgi/fold0/pretrain/metrics.json" in summary[0]
    assert "results/models/cca/fold1/metrics.json" in summary[0]
    assert "results/models/linear/" not in summary[0]


def test_label_free_cohort_of_classification_methods_only_has_no_training_jobs(label_free_sheet, tmp_path):
    proc = dry_run(label_free_sheet, tmp_path, "train={run: [linear, gene_only]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "python -m wsiomics.train " not in out
    assert "train.run: linear skipped" in out and "train.run: gene_only skipped" in out


def test_label_free_cohort_still_pretrains_mgi_for_mgi_seg_alone(label_free_sheet, tmp_path):
    proc = dry_run(label_free_sheet, tmp_path, "train={run: [mgi_seg]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    commands = [line for line in out.splitlines() if "python -m wsiomics.train " in line]
    assert sorted(re.search(r"--method (\S+) --fold (\d)", c).groups() for c in commands if " pretrain " in c) == [
        ("mgi", "0"), ("mgi", "1")]
    assert len([c for c in commands if " finetune --method mgi_seg " in c]) == 2


def job_resources(sheet: Path, work: Path, *config: str) -> list[tuple[str, str, dict[str, str]]]:
    """(rule, method, resources) of each training job of a dry run."""
    proc = dry_run(sheet, work, *config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule )", out):
        head = re.match(r"(?:local)?rule (\w+):", block)
        method = re.search(r"wildcards: .*method=(\w+)", block)
        resources = re.search(r"resources: (.*)", block)
        if head and method and resources:
            jobs.append((head.group(1), method.group(1), dict(re.findall(r"(\w+)=([^,\s]+)", resources.group(1)))))
    return jobs


def test_scikit_learn_methods_ask_for_no_gpu(sheet, tmp_path):
    jobs = job_resources(sheet, tmp_path, "train={run: [linear, cca, gimp, image_seg]}")
    gpu = {(rule, method): res.get("gpu") for rule, method, res in jobs}
    assert gpu[("finetune", "linear")] == gpu[("finetune", "cca")] == "0"
    assert gpu[("finetune", "gimp")] == gpu[("pretrain", "gimp")] == gpu[("finetune_segmentation", "image_seg")] == "1"


def test_train_device_cpu_asks_for_no_gpu(sheet, tmp_path):
    """A CPU-only site (README): train.device: cpu, and no training job holds the gpu resource."""
    jobs = job_resources(sheet, tmp_path, "train={run: [gimp, linear], device: cpu}")
    assert {rule for rule, _, _ in jobs} == {"pretrain", "finetune", "fewshot"}
    assert all(res.get("gpu") == "0" for _, _, res in jobs), jobs


def test_pretrain_is_constrained_to_pretraining_methods(sheet, tmp_path):
    """A method without a pretraining stage has no pretrain job: asking for its output is an error, not a job."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "2", "-n", "--directory", str(tmp_path),
           "results/models/linear/fold0/pretrain/model.pt", "--config", f"samples={sheet}", "splits={n_folds: 2}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "MissingRuleException" in proc.stdout + proc.stderr or "No rule to produce" in proc.stdout + proc.stderr


def test_partly_labelled_sheet_plans_every_stage_with_the_unlabelled_patients(sheet, tmp_path):
    """Some patients have slides and RNA but an empty label: the workflow treats them as unlabelled (pretraining
    only), not as a label-free cohort: every method still pretrains, fine-tunes and is probed few-shot on every
    fold, nothing is skipped, the splits job gets the sheet's patients table with the empty labels, and the
    landing page counts them from the folds."""
    table = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    first_class = sorted(table["label"].unique())[0]
    table.loc[table["label"] == first_class, "label"] = ""  # one class's patients lose their label
    partly = sheet.with_name("samples_partly_labelled.tsv")
    table.to_csv(partly, sep="\t", index=False)
    proc = dry_run(partly, tmp_path, "train={run: [linear, gimp, mgi, cca]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "skipped" not in out, out[-3000:]
    commands = [line for line in out.splitlines() if "python -m wsiomics." in line]
    jobs = sorted(re.search(r"wsiomics\.(\w+) (\w+) --method (\S+) --fold (\d)", c).groups() for c in commands
                  if re.search(r"wsiomics\.\w+ \w+ --method ", c))
    expected = [("fewshot", "run", m, f) for m in ("gimp", "mgi") for f in "01"]
    expected += [("train", "finetune", m, f) for m in ("cca", "gimp", "linear", "mgi") for f in "01"]
    expected += [("train", "pretrain", m, f) for m in ("gimp", "mgi") for f in "01"]
    assert jobs == sorted(expected)
    patients = pd.read_csv(tmp_path / "results/sheet/patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    n_unlabelled = int((table.drop_duplicates("patient_id")["label"] == "").sum())
    assert n_unlabelled >= 2 and (patients["label"] == "").sum() == n_unlabelled
    assert any("python -m wsiomics.splits" in c for c in commands)
    landing = [c for c in commands if "wsiomics.report landing" in c]
    assert len(landing) == 1 and "--folds results/splits/folds.tsv" in landing[0]
