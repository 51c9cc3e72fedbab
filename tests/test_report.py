"""The report's landing page text (wsiomics.report): the summary's Markdown rendered by docutils as the same
tables, slide status, versions and configuration; the report written atomically, .html or .zip by size.
The report opened in a browser: tests/test_report_browser.py."""

from __future__ import annotations

import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml
from docutils.core import publish_parts
from test_summary_report import FOLDS, write_classify, write_segment

from wsiomics import report
from wsiomics.summary import SummaryParams, summarize


class Tables(HTMLParser):
    """Every <table> of an HTML text as rows of cell texts; <pre> blocks; whether docutils reported a problem."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.strong: list[str] = []
        self.pre: list[str] = []
        self._cell: list[str] | None = None
        self._pre: list[str] | None = None
        self._strong = False
        self.problems = "system-message" in html or "docutils problem" in html.lower()
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._pre = []
        elif tag == "strong":
            self._strong = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre":
            self.pre.append("".join(self._pre))
            self._pre = None
        elif tag == "strong":
            self._strong = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self._pre.append(data)
        if self._strong:
            self.strong.append(data)


def render(rst: str) -> Tables:
    """As Snakemake renders the landing page (docutils, html writer); a docutils error would raise."""
    return Tables(publish_parts(rst, writer="html", settings_overrides={"halt_level": 2})["html_body"])


def md_tables(text: str) -> list[list[list[str]]]:
    """The Markdown's pipe tables as rows of cells, separator rows left out, emphasis markers stripped."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not set(line) <= set("|-: "):
                current.append([c.strip().replace("**", "").strip("*") for c in line.strip().strip("|").split("|")])
        else:
            current = None
    return tables


def test_the_summary_markdown_renders_as_the_same_tables(tmp_path):
    paths = [write_classify(tmp_path, m, k, rows) for m in ("linear", "gimp", "gimp_no_pretrain")
             for k, rows in FOLDS.items()]
    paths.append(write_segment(tmp_path, "mgi_seg", 0, {"s1": ("p1", [1, 0], [1, 1]), "s2": ("p2", [0, 1], [0, 1])}))
    _, _, text = summarize(paths, SummaryParams(bootstrap=50, seed=0))
    page = render("\n".join(report.markdown_to_rst(text)))
    assert not page.problems
    expected = md_tables(text)
    assert len(expected) == 3  # classification, segmentation, paired comparisons
    assert page.tables == expected  # every cell, method names with underscores as they are
    assert any(t.startswith("0.") for t in page.strong)  # the best value of a column stays bold


def test_markup_characters_in_slide_reasons_stay_text():
    status = pd.DataFrame({"slide_id": ["s_1", "s2", "s3"], "patient_id": ["p_", "p2", "p3"],
                           "status": ["ok", "unreadable", "no_mpp"], "stage": ["", "tiling", "tiling"],
                           "reason": ["", "*.tiff|`x`_ not a slide", "set mpp_ in the sheet \\ here"]})
    page = render("\n".join(report.slide_status_rst(status)))
    assert not page.problems
    counts, bad = page.tables
    assert counts[1:] == [["no_mpp", "tiling", "1"], ["ok", "", "1"], ["unreadable", "tiling", "1"]]
    assert bad[0] == ["Slide id", "Patient id", "Status", "Stage", "Reason"]
    assert bad[1:] == [["s2", "p2", "unreadable", "tiling", "*.tiff|`x`_ not a slide"],
                       ["s3", "p3", "no_mpp", "tiling", "set mpp_ in the sheet \\ here"]]


def test_many_bad_slides_are_cut_short_and_all_ok_says_so():
    n = report.MAX_PROBLEM_SLIDES + 7
    status = pd.DataFrame({"slide_id": [f"s{i}" for i in range(n)], "status": "no_tissue", "reason": "blank"})
    lines = report.slide_status_rst(status)
    assert len(render("\n".join(lines)).tables[1]) == report.MAX_PROBLEM_SLIDES + 1  # + header
    assert "and 7 more" in "\n".join(lines)
    ok = pd.DataFrame({"slide_id": ["a", "b"], "status": "ok"})
    assert report.slide_status_rst(ok)[0] == "All 2 slides are ok."
    with pytest.raises(ValueError, match="no 'status' column"):
        report.slide_status_rst(pd.DataFrame({"slide_id": ["a"]}))


def test_the_landing_page_holds_the_configuration_and_versions():
    config = {"samples": "sheet.tsv", "tiling": {"patch_size": 224, "target_mpp": 0.5},
              "train": {"run": ["linear", "gimp_no_pretrain"], "model": {"dim": 64, "head": "linear"}},
              "expression": {"matrix": "", "sample_types": ["01", "03"]}}
    versions = [("python", "3.11.7"), ("torch", "2.14.1")]
    page = render(report.landing(None, None, config, versions))
    assert not page.problems
    assert page.tables == [[["Package", "Version"], ["python", "3.11.7"], ["torch", "2.14.1"]]]
    assert [yaml.safe_load(p) for p in page.pre] == [config]  # the literal block reads back as the config


def test_how_to_read_names_only_the_stages_that_ran():
    classify = pd.DataFrame({"method": ["linear", "mgi_seg"], "group": ["baselines", "segmentation"],
                             "metric": ["accuracy", "dice_mean"]})
    text = " ".join(report.how_to_read(classify))
    assert "**Segmentation**" in text and "**Models**" in text and "results table" in text
    assert "Survival" not in text and "Kaplan" not in text
    survival = pd.DataFrame({"method": ["coxph"], "group": ["survival"], "metric": ["c_index_harrell"]})
    text = " ".join(report.how_to_read(survival))
    assert "**Survival**" in text and "Segmentation" not in text
    nothing = " ".join(report.how_to_read(None))  # tiling only: no method ran
    assert "**QC**" in nothing and "Models" not in nothing and "results table" not in nothing
    assert not render(report.landing(None, None, {"samples": "s.tsv"}, [("python", "3.11")], metrics=survival)).problems
    assert "Deployment" not in text
    deployed = " ".join(report.how_to_read(classify, deploy_name="hospital"))
    assert "**Deployment** (the models applied to the cohort 'hospital'" in deployed
    assert deployed.index("**Deployment**") < deployed.index("**Summary**")  # Summary stays the menu's last entry
    page = report.landing(None, None, {"samples": "s.tsv", "deploy": {"name": "hospital", "samples": "h.tsv"}},
                          [("python", "3.11")], metrics=classify)
    assert "**Deployment**" in page and not render(page).problems


def test_package_versions_are_the_installed_ones():
    import importlib.metadata

    versions = dict(report.package_versions())
    assert versions["snakemake"] == importlib.metadata.version("snakemake")
    assert versions["pandas"] == pd.__version__


def test_landing_command_writes_the_page_and_the_counts(tmp_path):
    (tmp_path / "metrics.md").write_text("# Results\n\n| Method | n |\n|---|---|\n| linear | 8 |\n")
    pd.DataFrame({"method": ["linear", "linear", "gimp"], "metric": ["accuracy", "auc_macro", "accuracy"]}).to_csv(
        tmp_path / "metrics.tsv", sep="\t", index=False)
    pd.DataFrame({"slide_id": ["s1", "s2", "s3"], "patient_id": ["p1", "p1", "p2"],
                  "status": ["ok", "ok", "no_tissue"]}).to_csv(tmp_path / "status.tsv", sep="\t", index=False)
    out = tmp_path / "report" / "landing.rst"
    assert report.main(["landing", "--summary", str(tmp_path / "metrics.md"),
                        "--metrics", str(tmp_path / "metrics.tsv"), "--slide-status", str(tmp_path / "status.tsv"),
                        "--config-json", '{"samples": "x.tsv"}', "--out", str(out)]) == 0
    page = render(out.read_text())
    assert page.tables[0] == [["Method", "n"], ["linear", "8"]]
    assert yaml.safe_load((out.parent / "metadata.yaml").read_text()) == {
        "slides": 3, "slides ok (trained on)": 2, "patients with slides": 2, "methods summarised": 2}


def test_landing_counts_labelled_and_unlabelled_patients_from_the_folds(tmp_path):
    """A partly labelled cohort: the landing page and its counts say how many patients had no label (role
    unlabelled in every fold: pretraining only), counted once per patient, not once per fold."""
    folds = pd.DataFrame({"patient_id": ["p1", "p2", "p3", "u1", "u2"] * 2, "fold": [0] * 5 + [1] * 5,
                          "role": ["train", "val", "test", "unlabelled", "unlabelled",
                                   "test", "train", "val", "unlabelled", "unlabelled"],
                          "label": ["a", "b", "a", "", ""] * 2})
    folds.to_csv(tmp_path / "folds.tsv", sep="\t", index=False)
    out = tmp_path / "landing.rst"
    assert report.main(["landing", "--folds", str(tmp_path / "folds.tsv"), "--config-json", "{}",
                        "--out", str(out)]) == 0
    counts = yaml.safe_load((tmp_path / "metadata.yaml").read_text())
    assert counts == {"patients": 5, "patients labelled": 3, "patients unlabelled (pretraining only)": 2}
    page = render(out.read_text())
    assert not page.problems
    patients = [["Patients", "Count"], ["all", "5"], ["labelled", "3"], ["unlabelled (pretraining only)", "2"]]
    assert patients in page.tables


def test_bad_config_json_is_a_clear_error(tmp_path, capsys):
    assert report.main(["landing", "--config-json", "{samples", "--out", str(tmp_path / "landing.rst")]) == 1
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "landing.rst").exists()


def fake_snakemake(size: int, fail: bool = False):
    """Stands in for `snakemake --report PATH ...`: writes `size` bytes at PATH, or fails."""
    calls = []

    def run(cmd, check):
        calls.append(cmd)
        if fail:
            raise subprocess.CalledProcessError(1, cmd)
        Path(cmd[cmd.index("--report") + 1]).write_bytes(b"x" * size)

    return run, calls


def test_report_is_html_under_the_limit_and_zip_over_it(tmp_path):
    out = tmp_path / "results" / "report.html"
    out.parent.mkdir()
    (out.parent / "report.zip").write_text("stale")
    run, calls = fake_snakemake(1000)
    assert report.write_report(out, max_mb=0.01, snakemake_args=["-s", "Snakefile"], run=run) == out
    assert out.stat().st_size == 1000 and not (out.parent / "report.zip").exists()
    assert calls[0][-2:] == ["-s", "Snakefile"] and calls[0][calls[0].index("--report") + 1].endswith(".html")
    run, calls = fake_snakemake(20_000)  # over 0.01 MB: written again as .zip
    assert report.write_report(out, max_mb=0.01, snakemake_args=[], run=run) == out.with_suffix(".zip")
    assert not out.exists() and out.with_suffix(".zip").stat().st_size == 20_000
    assert [c[c.index("--report") + 1][-4:] for c in calls] == ["html", ".zip"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.zip"]  # no temporary file left


def test_a_failed_report_leaves_the_previous_one(tmp_path):
    out = tmp_path / "report.html"
    out.write_text("previous")
    run, _ = fake_snakemake(10, fail=True)
    with pytest.raises(subprocess.CalledProcessError):
        report.write_report(out, max_mb=50, snakemake_args=[], run=run)
    assert out.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    with pytest.raises(ValueError, match="ends in .html"):
        report.write_report(tmp_path / "report.pdf", max_mb=50, snakemake_args=[], run=run)


def test_the_report_gets_the_stylesheet_and_the_run_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "report").mkdir(parents=True)
    (tmp_path / "results" / "report" / "metadata.yaml").write_text("slides: 3\n")
    run, calls = fake_snakemake(10)
    report.write_report(Path("results/report.html"), max_mb=50, snakemake_args=[], run=run)
    cmd = calls[0]
    assert Path(cmd[cmd.index("--report-stylesheet") + 1]).is_file()
    assert cmd[cmd.index("--report-metadata") + 1] == str(Path("results/report/metadata.yaml"))
