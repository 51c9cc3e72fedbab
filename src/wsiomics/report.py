"""The Snakemake HTML report of a run (``results/report.html``) and the run overview on its landing page.

``landing`` writes ``results/report/landing.rst``, the reStructuredText that ``workflow/report/workflow.rst``
includes on the report's landing page: the summary's results table (``results/summary/metrics.md``, turned
into reStructuredText so Snakemake's docutils renders it), the patients (labelled and unlabelled, from
``folds.tsv``), the run's configuration, the versions of the packages that made the results, and the per-slide
status (counts, and every slide that is not ``ok``).
Snakemake's own ``--report-metadata`` would be the natural place for the last three, but Snakemake 9.27
turns its string values into docutils' pseudo-XML, so the landing page text carries them instead; beside
it ``metadata.yaml`` holds the run's counts (numbers only), given as ``--report-metadata``: with metadata,
Snakemake opens the report on a page of its own (the text, full width) instead of beside the rule graph.

``html`` runs ``snakemake --report`` for the working directory and writes the report atomically: a
self-contained ``report.html`` (every figure embedded; opens from anywhere, one file to mail) while it stays
under ``--max-mb``, else ``report.zip`` (the figures as files beside a ``report.html``; unpack, then open it),
since a browser slows down on an HTML page of more than some 50 MB of embedded images. Whichever is
written, the other name is removed, so a stale report never sits beside a new one.

``python -m wsiomics.report landing --summary results/summary/metrics.md --slide-status
results/qc/slide_status.tsv --folds results/splits/folds.tsv --config-json '{...}' --out results/report/landing.rst``
``python -m wsiomics.report html --out results/report.html [--max-mb 50] [-- snakemake options]``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger("wsiomics.report")

# The distributions whose versions decide the numbers (models, metrics, slide reading, the workflow).
PACKAGES = ("wsiomics", "snakemake", "torch", "timm", "numpy", "pandas", "scipy", "scikit-learn", "scikit-survival",
            "lifelines", "zarr", "anndata", "scanpy", "openslide-python", "openslide-bin", "tifffile", "matplotlib")
MAX_PROBLEM_SLIDES = 50  # slides not ok listed on the landing page; the full table is in the report's QC
METADATA = "metadata.yaml"  # beside landing.rst
STYLESHEET = Path(__file__).resolve().parents[2] / "workflow" / "report" / "report.css"


##### reStructuredText #####


def rst_escape(text: str, keep_emphasis: bool = False) -> str:
    """Plain text as reStructuredText (backslash before markup characters). ``keep_emphasis`` leaves ``*``
    alone, so Markdown's ``*x*`` and ``**x**`` (the same in reStructuredText) stay emphasis."""
    chars = r"\`_|" if keep_emphasis else r"\`_|*"
    return re.sub("([" + re.escape(chars) + "])", r"\\\1", str(text)).replace("\n", " ")


def section(title: str, level: int) -> list[str]:
    """A section title; level 0 is the top (``=``), 1 and 2 below it."""
    return [title, "=-~"[level] * len(title), ""]


def list_table(header: list[str], rows: list[list[str]], escaped: bool = False) -> list[str]:
    """A ``list-table`` directive (cells escaped unless ``escaped``); an empty cell stays empty."""
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        for i, cell in enumerate(row):
            text = str(cell) if escaped else rst_escape(cell)
            lines.append(f"   {'* -' if i == 0 else '  -'} {text}".rstrip())
    return [*lines, ""]


def _pipe_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_rst(text: str, top_level: int = 1) -> list[str]:
    """The summary's Markdown (wsiomics.summary.markdown: ``#`` titles, pipe tables, paragraphs) as
    reStructuredText: titles become sections (``#`` at ``top_level``), tables ``list-table``s, the rest
    paragraphs; ``*x*`` and ``**x**`` mean the same in both."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"^(#+)\s+(.*)$", line)
        if heading:
            level = min(top_level + len(heading.group(1)) - 1, 2)
            out += section(rst_escape(heading.group(2)), level)
            i += 1
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            rows = [_pipe_cells(b) for b in block if not re.fullmatch(r"\s*\|?(\s*:?-+:?\s*\|)+\s*", b)]
            if rows:
                cells = [[rst_escape(c, keep_emphasis=True) for c in r] for r in rows]
                out += list_table(cells[0], cells[1:], escaped=True)
        elif line.strip():
            out += [rst_escape(line.strip(), keep_emphasis=True), ""]
            i += 1
        else:
            i += 1
    return out


##### landing page #####


def package_versions() -> list[tuple[str, str]]:
    """(name, version) of Python and the PACKAGES installed here; '' for one that is not."""
    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    for name in PACKAGES:
        try:
            rows.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return rows


def slide_status_rst(status: pd.DataFrame) -> list[str]:
    """Counts per status and stage, then each slide that is not ok with its reason."""
    for column in ("slide_id", "status"):
        if column not in status.columns:
            raise ValueError(f"the slide status table has no '{column}' column (it has {list(status.columns)})")
    status = status.fillna("")
    stage = status["stage"] if "stage" in status else pd.Series("", index=status.index)
    counts = status.assign(stage=stage).groupby(["status", "stage"]).size().reset_index(name="slides")
    lines = list_table(["Status", "Stage", "Slides"], counts.astype(str).values.tolist())
    bad = status[status["status"] != "ok"]
    if not len(bad):
        return [f"All {len(status)} slides are ok.", "", *lines]
    cols = [c for c in ("slide_id", "patient_id", "status", "stage", "reason") if c in bad.columns]
    lines += [f"{len(bad)} of {len(status)} slides are not ok (not trained on):", ""]
    lines += list_table([c.replace("_", " ").capitalize() for c in cols],
                        bad[cols].head(MAX_PROBLEM_SLIDES).astype(str).values.tolist())
    if len(bad) > MAX_PROBLEM_SLIDES:
        lines += [f"… and {len(bad) - MAX_PROBLEM_SLIDES} more: the full table is *Slide status* under QC.", ""]
    return lines


def patient_counts(folds: pd.DataFrame) -> dict[str, int]:
    """Patients of ``folds.tsv``, each counted once: all, those with a label and, in a partly labelled cohort,
    the unlabelled ones (role ``unlabelled`` in every fold: pretraining only, never fine-tuned on or tested)."""
    from wsiomics.train.roles import UNLABELLED_ROLES

    for column in ("patient_id", "role"):
        if column not in folds.columns:
            raise ValueError(f"the folds table has no '{column}' column (it has {list(folds.columns)})")
    labels = folds["label"] if "label" in folds else pd.Series("", index=folds.index)
    unlabelled = folds.loc[folds["role"].isin(UNLABELLED_ROLES), "patient_id"].nunique()
    counts = {"patients": int(folds["patient_id"].nunique()),
              "patients labelled": int(folds.loc[labels.fillna("") != "", "patient_id"].nunique())}
    return counts | ({"patients unlabelled (pretraining only)": int(unlabelled)} if unlabelled else {})


def run_counts(slide_status: pd.DataFrame | None, metrics: pd.DataFrame | None,
               folds: pd.DataFrame | None = None) -> dict[str, int]:
    """The numbers shown at the top of the landing page (``--report-metadata``): slides, usable slides,
    patients (with slides; labelled and unlabelled), methods summarised."""
    counts: dict[str, int] = {}
    if slide_status is not None:
        counts["slides"] = len(slide_status)
        counts["slides ok (trained on)"] = int((slide_status["status"] == "ok").sum())
        if "patient_id" in slide_status:
            counts["patients with slides"] = int(slide_status["patient_id"].nunique())
    if folds is not None:
        counts.update(patient_counts(folds))
    if metrics is not None:
        counts["methods summarised"] = int(metrics["method"].nunique())
    return counts


# the report's menu entries by stage, and the summary group whose rows mean the stage ran (None: always there)
MENU = (
    ("QC", None, "each slide's tissue detection and tiles, the slide status table"),
    ("Models", "*", "loss curves per method, fold and stage, ROC curves, confusion matrices, embedding maps"),
    ("Segmentation", "segmentation", "tumour maps"),
    ("Survival", "survival", "Kaplan–Meier plots"),
    ("Summary", "*", "the tables behind the results below, to download"),
)


def how_to_read(metrics: pd.DataFrame | None, deploy_name: str = "") -> list[str]:
    """The paragraph that walks a reader through the report, naming only the stages this run has (``deploy_name``:
    the cohort the run's models were applied to, if any)."""
    groups = set(metrics["group"]) if metrics is not None and "group" in metrics else set()
    entries = [f"**{name}** ({what})" for name, group, what in MENU
               if group is None or (group == "*" and groups) or group in groups]
    if deploy_name:
        entries.insert(len(entries) - 1 if groups else len(entries),
                       f"**Deployment** (the models applied to the cohort '{deploy_name}': predictions, tumour maps, "
                       "risks)")
    results = ("below are the results table (pooled over every fold's test patients, with a patient-level "
               "bootstrap 95% CI, then the mean ± std over folds), " if groups else "below are ")
    return ["How to read this report: " + results + "the slides' status, the package versions and the "
            "configuration. The menu on the left holds every figure and table by stage: " + ", ".join(entries)
            + ". Each entry has a caption saying what it shows; click the eye to view it, the download arrow to "
            "save it. *Rules* and *Statistics* show how each file was made and how long it took.", ""]


def landing(summary: str | None, slide_status: pd.DataFrame | None, config: dict[str, Any],
            versions: list[tuple[str, str]], folds: pd.DataFrame | None = None,
            metrics: pd.DataFrame | None = None) -> str:
    """The landing page's reStructuredText: how to read the report, results table, patients, slide status,
    configuration, package versions."""
    lines: list[str] = how_to_read(metrics, str((config.get("deploy") or {}).get("name") or ""))
    if summary is not None:
        lines += markdown_to_rst(summary, top_level=0)
    lines += section("Run", 0)
    if folds is not None:
        rows = [[what.removeprefix("patients").strip() or "all", str(n)] for what, n in patient_counts(folds).items()]
        lines += section("Patients", 1) + list_table(["Patients", "Count"], rows)
    if slide_status is not None:
        lines += section("Slides", 1) + slide_status_rst(slide_status)
    lines += section("Package versions", 1) + list_table(["Package", "Version"], [list(v) for v in versions])
    lines += section("Configuration", 1)
    lines += ["The configuration this run used (config.yaml with every --configfile and --config applied)::", ""]
    dumped = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    lines += ["    " + line if line else "" for line in dumped.splitlines()] + [""]
    return "\n".join(lines)


##### the report #####


def write_report(out: Path, max_mb: float, snakemake_args: list[str], landing_dir: Path = Path("results/report"),
                 run=subprocess.run) -> Path:
    """``snakemake --report`` into a temporary name beside ``out`` (an .html path), renamed onto ``out`` when
    under ``max_mb``, else written again as the .zip of the same stem; returns what was written. The
    stylesheet and ``landing_dir``'s metadata.yaml go with it when they exist."""
    from wsiomics.io import atomic_path

    if out.suffix != ".html":
        raise ValueError(f"--out {out}: the report's name ends in .html (a .zip beside it is chosen by size)")
    zipped = out.with_suffix(".zip")
    extra = ["--report-stylesheet", str(STYLESHEET)] if STYLESHEET.is_file() else []
    if (landing_dir / METADATA).is_file():
        extra += ["--report-metadata", str(landing_dir / METADATA)]

    def report(final: Path) -> None:
        with atomic_path(final) as tmp:
            # snakemake picks the format by the name's suffix: give it one, then move it onto the temp path
            named = tmp.with_name(tmp.name + final.suffix)
            try:
                run([sys.executable, "-m", "snakemake", "--report", str(named), *extra, *snakemake_args], check=True)
                os.replace(named, tmp)
            finally:
                named.unlink(missing_ok=True)

    report(out)
    size_mb = out.stat().st_size / 2**20
    if size_mb <= max_mb:
        zipped.unlink(missing_ok=True)
        log.info("wrote %s (%.1f MB, self-contained)", out, size_mb)
        return out
    log.info("%s is %.1f MB, over %.0f MB: writing %s instead (unpack it, open report.html inside)",
             out, size_mb, max_mb, zipped)
    report(zipped)
    out.unlink()
    return zipped


def main(argv: list[str] | None = None) -> int:
    from wsiomics.cli import configure_logging
    from wsiomics.io import write_text

    parser = argparse.ArgumentParser(prog="python -m wsiomics.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    page = sub.add_parser("landing", help="the landing page's text (results/report/landing.rst)")
    page.add_argument("--summary", type=Path, help="results/summary/metrics.md (left out when absent)")
    page.add_argument("--slide-status", type=Path, help="results/qc/slide_status.tsv (left out when absent)")
    page.add_argument("--metrics", type=Path, help="results/summary/metrics.tsv (for the count of methods)")
    page.add_argument("--folds", type=Path, help="results/splits/folds.tsv (labelled and unlabelled patients)")
    page.add_argument("--config-json", required=True, help="the run's configuration, as JSON text")
    page.add_argument("--out", type=Path, required=True, help="landing.rst; metadata.yaml is written beside it")
    html = sub.add_parser("html", help="snakemake --report, atomically, .html or .zip by size")
    html.add_argument("--out", type=Path, default=Path("results/report.html"))
    html.add_argument("--max-mb", type=float, default=50.0,
                      help="largest self-contained .html in MB; above it the report is written as .zip (default 50)")
    html.add_argument("snakemake_args", nargs="*", help="more snakemake options, after --")
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "html":
        try:
            write_report(args.out, args.max_mb, args.snakemake_args)
        except (ValueError, subprocess.CalledProcessError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        config = json.loads(args.config_json)
        summary = args.summary.read_text() if args.summary else None
        status = (pd.read_csv(args.slide_status, sep="\t", dtype=str, keep_default_na=False)
                  if args.slide_status else None)
        metrics = pd.read_csv(args.metrics, sep="\t") if args.metrics else None
        folds = pd.read_csv(args.folds, sep="\t", dtype=str, keep_default_na=False) if args.folds else None
        text = landing(summary, status, config, package_versions(), folds, metrics)
        counts = run_counts(status, metrics, folds)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_text(args.out.with_name(METADATA), yaml.safe_dump(counts, sort_keys=False))
    write_text(args.out, text)
    log.info("wrote %s and %s", args.out, args.out.with_name(METADATA))
    return 0


if __name__ == "__main__":
    sys.exit(main())
