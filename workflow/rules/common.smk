# Config and sample-sheet validation, the input functions every stage uses, and the CLI flags built
# from the config.
import math
import os
import re
from dataclasses import fields as dataclass_fields
import shlex
import sys
from pathlib import Path

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from wsiomics.samples import SampleSheetError, load_sample_sheet, slide_mpp_override
from wsiomics.samples import slides as slide_rows
from wsiomics.tiling import MaskParams, TilingParams


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
    config.update(_coerce(dict(config), yaml.safe_load(f)))
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
    """Every problem of the sheet at once (wsiomics.samples), then the row schema."""
    try:
        sheet = load_sample_sheet(path)
    except SampleSheetError as e:
        raise WorkflowError(f"{e}\nNo job was started: fix the sample sheet and run again.") from None
    validate(sheet.drop(columns="row"), schema=str(SCHEMAS / "samples.schema.yaml"))
    return sheet


def uses_demo_cohort():
    """The configured sheet is the built-in demo sheet (relative to the working directory)."""
    return os.path.abspath(config["samples"]) == os.path.abspath(DEMO_SHEET)


# A user's sheet is checked now, while parsing, so its problems stop the run before any job. The demo
# sheet is checked as soon as it exists; while it does not, the checkpoint synth_cohort writes it first.
_SHEET = None
if not (uses_demo_cohort() and not os.path.exists(DEMO_SHEET)):
    _SHEET = _load_sheet(config["samples"])


def sample_sheet():
    """The validated sheet; for a demo cohort still to be generated, only after checkpoint synth_cohort."""
    global _SHEET
    if _SHEET is None:
        checkpoints.synth_cohort.get()  # raises until the cohort exists; Snakemake then re-evaluates
        _SHEET = _load_sheet(DEMO_SHEET)
    return _SHEET


_SLIDES = None


def slide_table():
    """Slide rows indexed by slide_id (computed once: input functions run once per job)."""
    global _SLIDES
    if _SLIDES is None:
        _SLIDES = slide_rows(sample_sheet())
    return _SLIDES


def _slide(wildcards):
    table = slide_table()
    if wildcards.slide_id not in table.index:
        raise WorkflowError(f"slide_id '{wildcards.slide_id}' is not in the sample sheet {config['samples']}")
    return table.loc[wildcards.slide_id]


##### input functions and params #####


def slide_path(wildcards):
    return _slide(wildcards)["slide_path"]


def patient_of(wildcards):
    return _slide(wildcards)["patient_id"]


def mpp_option(wildcards):
    """`--mpp X` when the sheet overrides the slide's resolution, else nothing (use the metadata)."""
    mpp = slide_mpp_override(_slide(wildcards))
    return "" if mpp is None else f"--mpp {mpp!r}"


def tile_stores(wildcards):
    return expand("results/tiles/{slide_id}.zarr", slide_id=slide_table().index)


def all_targets(wildcards):
    ids = slide_table().index
    return [
        "results/qc/slide_status.tsv",
        *expand("results/qc/tiles/{slide_id}.png", slide_id=ids),
        *feature_stores(wildcards),
        *expression_targets(wildcards),
    ]


##### config -> command-line flags #####

# config key -> (flag, type) for `python -m wsiomics.tiling tile`, derived from the same dataclasses the
# command line is built from. A fixed whitelist: values are formatted from schema-validated numbers and
# booleans, never evaluated or passed through as text.
_TYPES = {"int": int, "float": float, "bool": bool}


def _whitelist(cls, prefix=""):
    return {
        f.name: (f"--{prefix}{f.name.replace('_', '-')}", _TYPES[str(f.type)])
        for f in dataclass_fields(cls)
        if str(f.type) in _TYPES
    }


TILING_FLAGS = _whitelist(TilingParams)
TILING_MASK_FLAGS = _whitelist(MaskParams, prefix="mask-")


def _flags(section, values, whitelist):
    out = []
    for key, value in values.items():
        if key not in whitelist:
            raise WorkflowError(f"config {section}.{key}: unknown key (allowed: {', '.join(whitelist)})")
        flag, kind = whitelist[key]
        if kind is bool:
            if not isinstance(value, bool):
                raise WorkflowError(f"config {section}.{key}: {value!r} is not true/false")
            out.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WorkflowError(f"config {section}.{key}: {value!r} is not a number")
            out.append(f"{flag} {kind(value)!r}")
    return out


def tiling_options():
    """The `tiling:` config section as flags for `python -m wsiomics.tiling tile`."""
    tiling = dict(config["tiling"])
    mask = tiling.pop("mask", {})
    flags = _flags("tiling", tiling, TILING_FLAGS) + _flags("tiling.mask", mask, TILING_MASK_FLAGS)
    return " ".join(flags)


def synth_options():
    """The `synth:` config section as flags for `python -m wsiomics.synth` (workers go as threads)."""
    synth = config["synth"]
    flags = [
        f"--n-patients {int(synth['n_patients'])}",
        f"--seed {int(synth['seed'])}",
        f"--signal {shlex.quote(synth['signal'])}",
        f"--slide-width-um {float(synth['slide_width_um'])!r}",
        f"--slide-height-um {float(synth['slide_height_um'])!r}",
        f"--n-genes {int(synth['n_genes'])}",
        f"--fraction-40x {float(synth['fraction_40x'])!r}",
        f"--fraction-pen {float(synth['fraction_pen'])!r}",
    ]
    if not synth["faults"]:
        flags.append("--no-faults")
    return " ".join(flags)



##### features #####

ENCODER = config["features"]["encoder"]

# Feature stores are named by the configured encoder only: the command line takes its options from config.
wildcard_constraints:
    encoder=re.escape(ENCODER),


def feature_stores(wildcards):
    return expand("results/features/{encoder}/{slide_id}.zarr", encoder=ENCODER, slide_id=slide_table().index)


def features_options():
    """The `features:` config section as flags for `python -m wsiomics.features extract` (threads go apart)."""
    f = config["features"]
    flags = [
        "--pretrained" if f["pretrained"] else "--no-pretrained",
        f"--seed {int(f['seed'])}",
        f"--batch-size {shlex.quote(str(f['batch_size']))}",
        f"--num-workers {shlex.quote(str(f['num_workers']))}",
        f"--chunk-rows {int(f['chunk_rows'])}",
        "--channels-last" if f["channels_last"] else "--no-channels-last",
    ]
    # Enumerated or pattern-checked by the schema; quoted anyway since they reach a shell.
    flags += [f"--{key} {shlex.quote(str(f[key]).lower())}" for key in ("precision", "device", "dtype", "compile")]
    if f["weights"]:
        flags.append(f"--weights {shlex.quote(f['weights'])}")
    return " ".join(flags)


if not config["features"]["pretrained"]:
    logger.warning(
        f"features.pretrained is false: {ENCODER} runs with RANDOM weights. Fine for the demo and tests; "
        "for real results set features.pretrained: true (and features.weights on an offline machine)."
    )


##### expression #####

from wsiomics.expression import CohortParams, NormalizeParams, SplitParams

# Config keys that name files: they become rule inputs (tracked, checked to exist) and are passed from there.
EXPRESSION_PATH_KEYS = ("matrix", "gene_annotation", "gene_list", "gene_sets")
N_FOLDS = int(config["splits"]["n_folds"])


def expression_enabled():
    """Expression rules join the default targets when the cohort has expression (sheet column or matrix)."""
    return bool(config["expression"]["matrix"]) or bool((sample_sheet()["expression_path"] != "").any())


def expression_targets(wildcards):
    if not expression_enabled():
        return []
    return [
        "results/expression/cohort.zarr",
        "results/splits/folds.tsv",
        *expand("results/expression/fold{fold}.zarr", fold=range(N_FOLDS)),
    ]


def expression_cohort_inputs(wildcards):
    """The sheet, every expression file it names (or the matrix), and the gene annotation if configured."""
    cfg = config["expression"]
    inputs = {"sheet": config["samples"]}
    if cfg["matrix"]:
        inputs["matrix"] = cfg["matrix"]
    else:
        paths = sample_sheet()["expression_path"]
        inputs["files"] = sorted(set(paths[paths != ""]))
    if cfg["gene_annotation"]:
        inputs["annotation"] = cfg["gene_annotation"]
    return inputs


def splits_inputs(wildcards):
    inputs = {"sheet": config["samples"]}
    if expression_enabled():  # which patients have expression is known once the cohort table exists
        inputs["cohort"] = "results/expression/cohort.zarr"
    return inputs


def normalize_inputs(wildcards):
    cfg = config["expression"]
    inputs = {"cohort": "results/expression/cohort.zarr", "folds": "results/splits/folds.tsv"}
    for key in ("gene_list", "gene_sets"):
        if cfg[key]:
            inputs[key] = cfg[key]
    return inputs


def _expression_flags(section, values, cls, skip=()):
    """Whitelisted flags from a dataclass's fields: numbers formatted, booleans as --x/--no-x, text and
    lists shell-quoted. Keys not among the fields are ignored here (the schema rejects unknown keys)."""
    out = []
    for f in dataclass_fields(cls):
        if f.name in skip or f.name not in values:
            continue
        value, kind, flag = values[f.name], str(f.type), f"--{f.name.replace('_', '-')}"
        if kind == "bool":
            out.append(flag if value else flag.replace("--", "--no-", 1))
        elif kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WorkflowError(f"config {section}.{f.name}: {value!r} is not a number")
            out.append(f"{flag} {(int if kind == 'int' else float)(value)!r}")
        elif kind.startswith("tuple"):
            out.append(f"{flag} {shlex.quote(','.join(str(v) for v in value))}")
        else:
            out.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(out)


def expression_cohort_options():
    return _expression_flags("expression", config["expression"], CohortParams, skip=EXPRESSION_PATH_KEYS)


def expression_path_option(key, flag):
    """`--flag <path>` for a configured file (already a rule input), else nothing."""
    value = config["expression"][key]
    return f"{flag} {shlex.quote(value)}" if value else ""


def normalize_options():
    return _expression_flags("expression", config["expression"], NormalizeParams, skip=EXPRESSION_PATH_KEYS)


def splits_options():
    return _expression_flags("splits", config["splits"], SplitParams)
