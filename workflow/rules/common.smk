# Config and sample sheet: validation, the sheet and its per-stage views, and the targets registry. Each
# stage's input functions and command-line options live in workflow/rules/inputs/<stage>.smk, included by
# the stage's rule file.
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from wsiomics.cli import ConfigFlagError, config_flags
from wsiomics.io import write_text
from wsiomics.samples import SampleSheetError, load_sample_sheet, slide_mpp_override
from wsiomics.samples import patients as patient_rows
from wsiomics.samples import slides as slide_rows


# Absolute, so validation also works from input functions evaluated after the demo checkpoint.
SCHEMAS = Path(workflow.basedir, "workflow", "schemas")


##### config #####


def _coerce(value, schema):
    """--config hands over `strict=true` and nested values (`tiling={patch_size: 256}`) as text: turn
    such strings into the boolean or number the schema asks for, so validation sees what the user meant.
    Anything else is left alone for validate() to report."""
    for alternative in schema.get("anyOf", []):  # e.g. batch_size: integer or "auto"
        coerced = _coerce(value, alternative)
        if coerced is not value:
            return coerced
    kind = schema.get("type")
    if isinstance(value, dict) and kind == "object":
        props = schema.get("properties", {})
        return {k: _coerce(v, props[k]) if k in props else v for k, v in value.items()}
    if not isinstance(value, str):
        return value
    text = value.strip()
    if kind == "boolean" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        if kind == "integer":
            return int(text)
        if kind == "number" and math.isfinite(float(text)):
            return float(text)
    except ValueError:
        pass
    return value


with open(SCHEMAS / "config.schema.yaml") as f:
    CONFIG_SCHEMA = yaml.safe_load(f)
config.update(_coerce(dict(config), CONFIG_SCHEMA))
validate(config, schema=str(SCHEMAS / "config.schema.yaml"))

# Rules run `python -m wsiomics.<stage>` from this checkout's sources, whatever the working directory.
# Without --use-conda, `python` is the interpreter running Snakemake (the venv's, even when the venv is
# not activated); with it, the rule's conda env (envs/*.yaml) supplies python and the libraries.
WSIOMICS_SRC = shlex.quote(str(Path(workflow.basedir, "src").resolve()))
_CONDA = "conda" in {str(m).lower() for m in workflow.deployment_settings.deployment_method}
_PATH = "" if _CONDA else f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(f"set -euo pipefail; {_PATH}export PYTHONPATH={WSIOMICS_SRC}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


# slide_id names files; the sample sheet enforces the same pattern (plus a 128-character limit).
wildcard_constraints:
    slide_id=r"[A-Za-z0-9][A-Za-z0-9._-]*",


##### sample sheet #####

DEMO_DIR = "results/demo_cohort"
DEMO_SHEET = f"{DEMO_DIR}/samples.tsv"


def _load_sheet(path):
    """Every problem of the sheet at once (wsiomics.samples), then the row schema. A job step (the same
    Snakefile parsed again on a cluster node for one job) skips both: the main process checked this sheet
    before it submitted the job, and re-checking 10,000 rows and stat-ing 30,000 files per job costs ~20 s."""
    if not workflow.is_main_process:
        return load_sample_sheet(path, check=False)
    try:
        sheet = load_sample_sheet(path)
    except SampleSheetError as e:
        raise WorkflowError(f"{e}\nNo job was started: fix the sample sheet and run again.") from None
    validate(sheet.drop(columns="row"), schema=str(SCHEMAS / "samples.schema.yaml"))
    return sheet


def uses_demo_cohort():
    """The configured sheet is the built-in demo sheet (relative to the working directory)."""
    return os.path.abspath(config["samples"]) == os.path.abspath(DEMO_SHEET)


# Views of the sheet that later stages depend on instead of the sheet itself: each holds only the columns
# its consumers read and is rewritten only when that content changes, so editing one slide's mpp re-tiles
# that slide and nothing else. The main Snakemake process writes them as soon as it has the sheet: while
# parsing (before the DAG, whose file-existence cache must not see them appear), or for the demo right
# after checkpoint synth_cohort (the cache is off by then). Job steps on a cluster only read them.
SHEET_VIEWS = {
    "patients": "results/sheet/patients.tsv",  # patient_id, label (, event), by patient_id: the folds' input
    "expression": "results/sheet/expression_patients.tsv",  # what the expression cohort reads, sheet order
    "slides": "results/sheet/slides.tsv",  # slide_id, patient_id (, features_path), by slide_id: slide -> patient
}


def _write_views(sheet):
    if not workflow.is_main_process:
        return
    pts = patient_rows(sheet).reset_index()
    frames = {
        # event only when the sheet has follow-up (folds are then stratified by label and event)
        "patients": pts[["patient_id", "label", *(["event"] if (pts["event"] != "").any() else [])]].sort_values(
            "patient_id", kind="stable"
        ),
        "expression": pts[["patient_id", "label", "n_slides", "expression_path"]],
        # features_path only when the sheet imports features for some slide (slide_status then skips their tiles)
        "slides": slide_rows(sheet).reset_index()[
            ["slide_id", "patient_id", *(["features_path"] if (sheet["features_path"] != "").any() else [])]
        ].sort_values("slide_id"),
    }
    for name, frame in frames.items():
        path, text = SHEET_VIEWS[name], frame.to_csv(sep="\t", index=False)
        if not (os.path.isfile(path) and Path(path).read_text() == text):
            write_text(path, text)


# A user's sheet is checked now, while parsing, so its problems stop the run before any job. The demo
# sheet is checked as soon as it exists; while it does not, the checkpoint synth_cohort writes it first.
_SHEET = None
if not (uses_demo_cohort() and not os.path.exists(DEMO_SHEET)):
    _SHEET = _load_sheet(config["samples"])
    _write_views(_SHEET)


def sample_sheet():
    """The validated sheet; for a demo cohort still to be generated, only after checkpoint synth_cohort."""
    global _SHEET
    if _SHEET is None:
        checkpoints.synth_cohort.get()  # raises until the cohort exists; Snakemake then re-evaluates
        _SHEET = _load_sheet(DEMO_SHEET)
        _write_views(_SHEET)
    return _SHEET


_SLIDES = None


def slide_table():
    """Slide rows indexed by slide_id (computed once: input functions run once per job)."""
    global _SLIDES
    if _SLIDES is None:
        _SLIDES = slide_rows(sample_sheet())
    return _SLIDES


def sheet_view(name):
    """Input function for one of SHEET_VIEWS (after the demo checkpoint when the demo sheet is generated)."""

    def view(wildcards):
        sample_sheet()
        return SHEET_VIEWS[name]

    return view


def tiled_slides():
    """slide_ids of the slides tiled and extracted here: all but those imported from the sheet's features_path."""
    table = slide_table()
    return table.index[table["features_path"] == ""]


def not_produced(wildcards, why):
    """An input that no rule makes and no file is. Given to a rule that must not make this slide's output, it
    makes Snakemake pass that rule over and take the next one in ruleorder."""
    return f"slide {wildcards.slide_id}: {why}"


def _slide(wildcards):
    table = slide_table()
    if wildcards.slide_id not in table.index:
        raise WorkflowError(f"slide_id '{wildcards.slide_id}' is not in the sample sheet {config['samples']}")
    return table.loc[wildcards.slide_id]


# Each stage's rule file registers the function that lists its default targets (@stage_targets); rule
# `all` asks for all of them. A stage that only feeds others (splits) registers none: its consumers pull it.
STAGE_TARGETS = []


def stage_targets(func):
    STAGE_TARGETS.append(func)
    return func


def all_targets(wildcards):
    return [target for func in STAGE_TARGETS for target in func(wildcards)]


##### config -> command-line flags #####


def stage_options(section, command=None, skip=()):
    """The `section:` config as flags for its stage's command line (wsiomics.cli.config_flags, typed by the
    schema; the stage rebuilds its parameter dataclass from them with wsiomics.cli.dataclass_from_args).
    `skip`: keys the rule passes otherwise (rule inputs, threads)."""
    try:
        flags = config_flags(config[section], CONFIG_SCHEMA["properties"][section], skip=skip, command=command,
                             where=section)
    except ConfigFlagError as e:
        raise WorkflowError(str(e)) from None
    return " ".join(flags)
