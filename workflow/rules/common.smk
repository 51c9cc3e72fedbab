# Config and sample-sheet validation, and the input functions every stage uses.
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from wsiomics.samples import SampleSheetError, load_sample_sheet, slide_mpp_override
from wsiomics.samples import slides as slide_rows


SCHEMAS = Path(workflow.basedir, "workflow", "schemas")
validate(config, schema=str(SCHEMAS / "config.schema.yaml"))

# Rules run `python -m wsiomics.<stage>` from this checkout's sources. Without --use-conda, `python` is
# the interpreter running Snakemake (the venv), even when the venv is not activated.
WSIOMICS_SRC = shlex.quote(str(Path(workflow.basedir, "src").resolve()))
_CONDA = "conda" in {str(m).lower() for m in workflow.deployment_settings.deployment_method}
_PATH = "" if _CONDA else f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(f"set -euo pipefail; {_PATH}export PYTHONPATH={WSIOMICS_SRC}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

DEMO_SHEET = "results/demo_cohort/samples.tsv"


wildcard_constraints:
    slide_id=r"[A-Za-z0-9][A-Za-z0-9._-]*",


def _load_sheet(path):
    """Every sheet problem at once (wsiomics.samples), then the row schema."""
    try:
        sheet = load_sample_sheet(path)
    except SampleSheetError as e:
        raise WorkflowError(str(e))
    # An absolute path: this also runs after the demo checkpoint, outside Snakefile parsing.
    validate(sheet.drop(columns="row"), schema=str(SCHEMAS / "samples.schema.yaml"))
    return sheet


def uses_demo_cohort():
    return os.path.normpath(config["samples"]) == DEMO_SHEET


# A user's sheet is checked now, before any job; the demo sheet may first have to be generated.
SHEET = None
if not (uses_demo_cohort() and not os.path.exists(DEMO_SHEET)):
    SHEET = _load_sheet(config["samples"])


def sample_sheet():
    if SHEET is not None:
        return SHEET
    checkpoints.synth_cohort.get()
    return _load_sheet(DEMO_SHEET)


def slide_table():
    return slide_rows(sample_sheet())


def slide_path(wildcards):
    return slide_table().loc[wildcards.slide_id, "slide_path"]


def mpp_option(wildcards):
    mpp = slide_mpp_override(slide_table().loc[wildcards.slide_id])
    return "" if mpp is None else f"--mpp {mpp!r}"


def patient_of(wildcards):
    return slide_table().loc[wildcards.slide_id, "patient_id"]


def tile_stores(wildcards):
    return expand("results/tiles/{slide_id}.zarr", slide_id=slide_table().index)


def all_targets(wildcards):
    ids = slide_table().index
    return ["results/qc/slide_status.tsv", *expand("results/qc/tiles/{slide_id}.png", slide_id=ids)]


def _flag(name, value):
    """One CLI option from a schema-validated config value (numbers and booleans only, never eval'd)."""
    dashed = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{dashed}" if value else f"--no-{dashed}"
    if not isinstance(value, (int, float)):
        raise WorkflowError(f"config value {name}={value!r} must be a number")
    return f"--{dashed} {value!r}"


def tiling_options():
    tiling = config["tiling"]
    options = [_flag(k, v) for k, v in tiling.items() if k != "mask"]
    options += [_flag(f"mask_{k}", v) for k, v in tiling.get("mask", {}).items()]
    return " ".join(options)


def synth_options():
    synth = config["synth"]
    options = [
        f"--n-patients {int(synth['n_patients'])}",
        f"--seed {int(synth['seed'])}",
        f"--signal {synth['signal']}",
        f"--slide-width-um {float(synth['slide_width_um'])!r}",
        f"--slide-height-um {float(synth['slide_height_um'])!r}",
        f"--n-genes {int(synth['n_genes'])}",
    ]
    if not synth["faults"]:
        options.append("--no-faults")
    return " ".join(options)
