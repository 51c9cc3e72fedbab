"""The report in the workflow: every figure and summary table a rule writes is flagged with report(...) and a
caption that exists; the landing page is a default target reading the summary and the slide status."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
RULE_FILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
# What a reader looks at: pictures, the summary's tables, the QC tables. (An SVG copy of a PNG figure may stay out
# of the report: the same figure twice.)
SHOWN = re.compile(r'"(results/[^"]+\.(?:png|md|html)|results/(?:summary|qc)/[^"]+\.tsv'
                   r'|results/models/summary\.tsv)"')


def output_entries() -> list[tuple[str, str, str]]:
    """(file, rule, entry text) for each entry of each rule's output: section."""
    found = []
    for path in RULE_FILES:
        text = path.read_text()
        for rule in re.finditer(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)+)", text, re.M):
            section = re.search(r"^    output:\n((?:        .*\n|\n)+)", rule.group(2), re.M)
            if not section:
                continue
            for entry in re.split(r"\n(?=        \S)", section.group(1)):
                found.append((path.name, rule.group(1), entry))
    return found


def test_every_figure_and_summary_table_is_in_the_report_with_a_caption():
    entries = output_entries()
    shown = [(f, r, e) for f, r, e in entries if SHOWN.search(e) or "tumour" in e or "SLIDE_STATUS" in e]
    assert len(shown) >= 10  # tiles QC, slide status, loss curves, tumour maps, KM, summary tables, landing
    missing = [f"{f}: rule {r}: {SHOWN.search(e).group(1) if SHOWN.search(e) else e.strip()}"
               for f, r, e in shown if "report(" not in e]
    assert not missing, "outputs a reader looks at but not flagged with report(...):\n" + "\n".join(missing)
    categories = {"QC", "Features", "Expression", "Models", "Segmentation", "Survival", "Few-shot", "Summary"}
    for f, r, e in shown:
        category = re.search(r'category="([^"]+)"', e)
        caption = re.search(r'caption="([^"]+)"', e)
        assert category and category.group(1) in categories, (f, r, e)
        assert caption and (REPO / "workflow" / "rules" / caption.group(1)).resolve().is_file(), (f, r, e)


def test_what_deployment_writes_for_a_reader_is_in_the_report():
    """The deploy rules (indented under ``if DEPLOY_NAME:``, with f-string paths) flag the predictions, the tumour
    maps and their slide table, and the risks for the report's Deployment category, each with a caption."""
    text = (REPO / "workflow" / "rules" / "deploy.smk").read_text()
    entries = {}
    for rule in re.finditer(r"^    (?:rule (\w+)|use rule \w+ as (\w+) with):\n((?:        .*\n|\n)+)", text, re.M):
        section = re.search(r"^        output:\n((?:            .*\n|\n)+)", rule.group(3), re.M)
        for entry in re.split(r"\n(?=            \w+=)", section.group(1) if section else ""):
            if entry.strip():
                entries[(rule.group(1) or rule.group(2), entry.strip().split("=")[0])] = entry
    wanted = {("predict", "predictions"), ("predict_tumour", "slides"), ("predict_tumour", "tumour"),
              ("predict_risks", "risks")}
    assert wanted <= set(entries), sorted(entries)
    for key in wanted:
        entry = entries[key]
        caption = re.search(r'caption="([^"]+)"', entry)
        assert "report(" in entry and 'category="Deployment"' in entry, key
        assert caption and (REPO / "workflow" / "rules" / caption.group(1)).resolve().is_file(), key
    assert 'patterns=["{slide_id}.png"]' in entries[("predict_tumour", "tumour")]  # the maps, not their .zarr


@pytest.fixture(scope="module")
def sheet(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reportwf") / "cohort"
    cmd = [sys.executable, "-m", "wsiomics.synth", "--out", str(out), "--n-patients", "8", "--slide-width-um", "1500",
           "--slide-height-um", "1000", "--n-genes", "100", "--workers", "2", "--no-faults"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "samples.tsv"


def landing_command(sheet: Path, work: Path, run: str) -> str:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "2", "-n", "-p", "--directory", str(work),
           "--config", f"samples={sheet}", "splits={n_folds: 2}", f"train={{run: [{run}]}}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = [line for line in out.splitlines() if "python -m wsiomics.report landing" in line]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


@pytest.mark.integration
def test_the_landing_page_reads_the_summary_and_the_slide_status(sheet, tmp_path):
    line = landing_command(sheet, tmp_path / "a", "linear, mgi_seg")
    assert "--slide-status results/qc/slide_status.tsv" in line
    assert "--summary results/summary/metrics.md" in line and "--metrics results/summary/metrics.tsv" in line
    assert "--folds results/splits/folds.tsv" in line  # labelled and unlabelled patients
    assert "--config-json" in line and "--out results/report/landing.rst" in line
    line = landing_command(sheet, tmp_path / "b", "")  # no method: the slides' status and the run only
    assert "--slide-status results/qc/slide_status.tsv" in line and "--summary" not in line and "--folds" not in line
