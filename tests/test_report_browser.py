"""The Snakemake report opened in a real headless Chromium: no console errors, the summary table on the landing
page, a figure shown when its eye button is clicked; screenshots of both.

Chromium is Debian's ``chromium`` + ``chromium-driver``, installed here with apt-get when missing and the tests
run as root; selenium comes with the dev extras. Without them the tests are skipped, saying why, unless
``WSIOMICS_REQUIRE_BROWSER=1`` (CI sets it), which makes that a failure. ``test_report_of_a_small_run`` builds
its own report (a two-rule workflow with this repository's captions, landing page and stylesheet);
``test_report_of_the_demo`` opens the one named by ``WSIOMICS_REPORT`` (``.ci/run``: the demo's
``results/report.html`` after ``make demo``). Screenshots go to ``WSIOMICS_SCREENSHOTS`` when set, else to the
test's temporary folder; their paths are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from test_summary_report import FOLDS, write_classify

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("chromium", "chromium-driver")  # Debian's browser and its WebDriver
WAIT_S = 120  # the report is a React app that unpacks every embedded figure on load: tens of MB for the demo

pytestmark = pytest.mark.integration


def unavailable(reason: str):
    """Skip, or fail where the browser test must run (WSIOMICS_REQUIRE_BROWSER=1)."""
    if os.environ.get("WSIOMICS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser test required but {reason}")
    pytest.skip(reason)


def _browser_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """(browser, driver) paths, installed with apt-get when missing (as root)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        unavailable("selenium is not installed (it is in the dev extras: pip install -e '.[dev]')")
    paths = _browser_paths()
    if paths:
        return paths
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        unavailable("chromium and chromium-driver are not installed, and installing them needs root and apt-get "
                    "(apt-get install chromium chromium-driver)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    log = []
    for cmd in (install, ["apt-get", "update", "-q"], install):  # the package lists may be missing or stale
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        log.append(proc.stdout[-1500:] + proc.stderr[-1500:])
        if cmd is install and proc.returncode == 0:
            break
    paths = _browser_paths()
    if not paths:
        unavailable(f"`apt-get install {' '.join(PACKAGES)}` did not install them: {log[-1]}")
    return paths


@pytest.fixture
def driver(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    # --no-sandbox: Chromium refuses to run as root with its sandbox (as in CI containers)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(chromium[1]), options=options)  # the driver given: no download
    yield browser
    browser.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("WSIOMICS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _summary_table(browser):
    """The landing page's results table (the first whose header starts with Method), once rendered."""
    from selenium.webdriver.common.by import By

    for table in browser.find_elements(By.CSS_SELECTOR, "ul > div.prose table"):
        header = table.find_elements(By.CSS_SELECTOR, "th")
        if header and header[0].text.strip() == "Method":
            return table
    return False


def check_report(browser, report: Path, shots: Path, name: str) -> None:
    """Open the report, find the summary table and one figure, save screenshots, then assert no console errors."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(report.resolve().as_uri())
    wait = WebDriverWait(browser, WAIT_S)
    table = wait.until(_summary_table, "the landing page shows no results table")
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert table.is_displayed() and len(rows) >= 1
    assert all(c.text.strip() for c in rows[-1].find_elements(By.CSS_SELECTOR, "td")[:2])  # method and n
    landing = shots / f"{name}_landing.png"
    browser.save_screenshot(str(landing))
    # a figure: QC > Tissue and tiles (a list only where QC has more than one subcategory) > the first slide's
    # eye button, as a reader would
    click = WebDriverWait(browser, 20)
    eye = (By.CSS_SELECTOR, "nav table a[iconname='eye']")
    click.until(lambda b: b.find_element(By.LINK_TEXT, "QC")).click()
    click.until(lambda b: b.find_elements(By.LINK_TEXT, "Tissue and tiles") or b.find_elements(*eye))
    for subcategory in browser.find_elements(By.LINK_TEXT, "Tissue and tiles"):
        subcategory.click()
    click.until(lambda b: b.find_element(*eye)).click()
    shown = "return [...document.images].filter(i => !i.closest('nav') && i.complete && i.naturalWidth > 0).length"
    wait.until(lambda b: b.execute_script(shown) > 0, "the figure did not render")
    figure = shots / f"{name}_figure.png"
    browser.save_screenshot(str(figure))
    print(f"screenshots: {landing} {figure}")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


@pytest.fixture(scope="module")
def small_report(tmp_path_factory) -> Path:
    """A report from a two-rule workflow: a QC picture and the landing page, with this repository's captions,
    landing page text (wsiomics.summary's table, wsiomics.report landing) and stylesheet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = tmp_path_factory.mktemp("report")
    inputs = root / "inputs"
    inputs.mkdir()
    paths = [write_classify(inputs / "models", m, k, rows) for m in ("linear", "gimp") for k, rows in FOLDS.items()]
    from wsiomics.summary import main as summary_main

    assert summary_main(["--out-dir", str(inputs / "summary"), "--bootstrap", "50", *paths]) == 0
    pd.DataFrame({"slide_id": ["s1", "s2"], "patient_id": ["p1", "p2"], "status": ["ok", "no_tissue"],
                  "stage": ["", "tiling"], "reason": ["", "no tile has tissue"]}).to_csv(
        inputs / "status.tsv", sep="\t", index=False)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(inputs / "s1.png")
    plt.close(fig)
    config = {"samples": "samples.tsv", "tiling": {"patch_size": 224, "target_mpp": 0.5},
              "features": {"encoder": "test_resnet"}, "splits": {"n_folds": 2}}
    (root / "config.yaml").write_text(json.dumps(config))
    captions = REPO / "workflow" / "report"
    (root / "Snakefile").write_text(f'''
configfile: "{root / 'config.yaml'}"
report: "{captions / 'workflow.rst'}"

rule all:
    input:
        "results/report/landing.rst",
        "results/qc/tiles/s1.png",

rule tile_qc:
    input:
        "{inputs}/{{slide_id}}.png",
    output:
        report(
            "results/qc/tiles/{{slide_id}}.png",
            caption="{captions / 'tile_qc.rst'}",
            category="QC",
            subcategory="Tissue and tiles",
            labels={{"slide": "{{slide_id}}"}},
        ),
    shell:
        "cp {{input}} {{output}}"

rule report_landing:
    input:
        summary="{inputs}/summary/metrics.md",
        metrics="{inputs}/summary/metrics.tsv",
        status="{inputs}/status.tsv",
    output:
        report(
            "results/report/landing.rst",
            caption="{captions / 'landing.rst'}",
            category="Summary",
            labels={{"table": "landing page text"}},
        ),
        "results/report/metadata.yaml",
    params:
        config={json.dumps(json.dumps(config))},
    shell:
        "{sys.executable} -m wsiomics.report landing --summary {{input.summary}} --metrics {{input.metrics}}"
        " --slide-status {{input.status}} --config-json {{params.config:q}} --out {{output[0]}}"
''')
    work = root / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--cores", "1"],
                          cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    proc = subprocess.run([sys.executable, "-m", "wsiomics.report", "html", "--out", "results/report.html", "--",
                           "-s", str(root / "Snakefile")], cwd=work, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return work / "results" / "report.html"


def test_report_of_a_small_run(small_report, driver, shots):
    check_report(driver, small_report, shots, "small")


def test_report_of_the_demo(request, shots, tmp_path):
    given = os.environ.get("WSIOMICS_REPORT")
    if not given:
        pytest.skip("WSIOMICS_REPORT is not set (.ci/run sets it to the demo's results/report.html after make demo)")
    driver = request.getfixturevalue("driver")
    report = Path(given)
    if not report.exists() and report.with_suffix(".zip").exists():
        report = report.with_suffix(".zip")  # the demo wrote a .zip: it was over the size limit
    assert report.exists(), f"WSIOMICS_REPORT={given}: no such report (and no .zip beside it)"
    if report.suffix == ".zip":
        with zipfile.ZipFile(report) as archive:
            archive.extractall(tmp_path)
        report = next(tmp_path.glob("*/report.html"))
    check_report(driver, report, shots, "demo")
