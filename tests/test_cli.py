"""The helper pair between config and command lines (wsiomics.cli): every section round-trips into its stage's
parameter dataclass, with defaults and with every value changed; every stage option has a --help text."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from wsiomics.cli import (
    ConfigFlagError,
    add_dataclass_options,
    config_flags,
    config_schema,
    dataclass_from_args,
    section_schema,
)
from wsiomics.expression import CohortParams, NormalizeParams
from wsiomics.splits import SplitParams
from wsiomics.summary import SummaryParams
from wsiomics.synth.cohort import SIGNALS, CohortConfig
from wsiomics.tiling import MaskParams, TilingParams

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
PATHS = ("matrix", "gene_annotation", "gene_list", "gene_sets")

# section, command, dataclass, keys the rule passes otherwise: what each rule does in workflow/rules/inputs/*.smk
STAGES = [
    ("tiling", None, TilingParams, ()),
    ("synth", None, CohortConfig, ("workers",)),
    ("expression", "cohort", CohortParams, (*PATHS, "threads")),
    ("expression", "normalize", NormalizeParams, (*PATHS, "threads")),
    ("splits", None, SplitParams, ()),
    ("summary", None, SummaryParams, ()),
]


def changed(value, schema):
    """Another valid value of a config key, so a round trip cannot pass by falling back to defaults."""
    if "enum" in schema:
        return next(v for v in schema["enum"] if v != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if schema.get("maximum", value + 1) >= value + 1 else value - 1
    if isinstance(value, float):
        doubled = value * 2 if value else 0.25
        return doubled if doubled < schema.get("maximum", schema.get("exclusiveMaximum", 1e9)) else value / 2
    if isinstance(value, list):
        return ["x1", "x2"]
    return value + "_2" if value else "set"


def round_trip(section, command, cls, skip, values):
    schema = section_schema(section)
    flags = " ".join(config_flags(values, schema, skip=skip, command=command, where=section))
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_options(parser, cls)
    extra = {}
    if cls is TilingParams:
        add_dataclass_options(parser, MaskParams, prefix="mask_")
        extra["mask"] = None
    args = parser.parse_args(shlex.split(flags))
    if cls is TilingParams:
        extra["mask"] = dataclass_from_args(MaskParams, args, prefix="mask_")
    return dataclass_from_args(cls, args, **extra), flags


def as_config(obj, keys):
    out = {}
    for k in keys:
        v = getattr(obj, k)
        out[k] = as_config(v, [f.name for f in fields(v)]) if hasattr(v, "__dataclass_fields__") else (
            list(v) if isinstance(v, tuple) else v)
    return out


@pytest.mark.parametrize(("section", "command", "cls", "skip"), STAGES, ids=[f"{s[0]}-{s[1]}" for s in STAGES])
def test_every_config_section_round_trips_into_its_dataclass(section, command, cls, skip):
    props = section_schema(section)["properties"]
    keys = [k for k in props if k not in skip and (command is None or command in props[k].get("x-commands", [command]))]
    assert set(keys) <= {f.name for f in fields(cls)}, f"{section} keys the stage does not take"
    obj, _ = round_trip(section, command, cls, skip, CONFIG[section])
    assert as_config(obj, keys) == {k: CONFIG[section][k] for k in keys}
    # every value changed (nested ones too): still equal on the other side
    new = {}
    for k in keys:
        if props[k].get("type") == "object":
            new[k] = {mk: changed(mv, props[k]["properties"][mk]) for mk, mv in CONFIG[section][k].items()}
        else:
            new[k] = changed(CONFIG[section][k], props[k])
    if section == "expression" and command == "normalize":
        new["gene_selection"] = "hvg"  # "list" would need a gene_list file (a rule input)
    if section == "synth":
        new["latent_factors"] = 0
    try:
        obj, flags = round_trip(section, command, cls, skip, {**CONFIG[section], **new})
    except ValueError as e:  # a dataclass's own checks (e.g. enumerated values) must accept schema values
        pytest.fail(f"{section}: {e}")
    assert as_config(obj, [k for k in keys if k in new]) == {k: new[k] for k in keys if k in new}, flags


def test_expression_keys_are_split_between_its_two_commands():
    props = section_schema("expression")["properties"]
    cohort = {k for k, v in props.items() if v.get("x-commands") == ["cohort"]}
    normalize = {k for k, v in props.items() if v.get("x-commands") == ["normalize"]}
    assert cohort == {f.name for f in fields(CohortParams)}
    assert normalize == {f.name for f in fields(NormalizeParams)}
    assert set(props) - cohort - normalize == {"threads"}


def test_feature_flags_reach_extract_params():
    from wsiomics.features.extract import ExtractParams

    flags = config_flags({**CONFIG["features"], "compile": True, "batch_size": 64}, section_schema("features"),
                         skip=("encoder", "threads", "weights", "slides_per_job"))
    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, ExtractParams)
    args, rest = parser.parse_known_args(shlex.split(" ".join(flags)))
    assert rest == ["--no-pretrained", "--seed", "0"]  # the extract command's own options
    params = dataclass_from_args(ExtractParams, args)
    assert params.compile == "true" and params.batch_size == "64" and params.precision == "auto"


def test_config_flags_refuse_values_of_the_wrong_type_and_quote_text():
    schema = section_schema("tiling")
    with pytest.raises(ConfigFlagError, match="tiling.patch_size: True is not a number"):
        config_flags({"patch_size": True}, schema, where="tiling")
    with pytest.raises(ConfigFlagError, match="tiling.allow_upsampling"):
        config_flags({"allow_upsampling": "yes"}, schema, where="tiling")
    assert config_flags({"h5ad_layer": "a b; rm -rf /"}, section_schema("expression")) == \
        ["--h5ad-layer 'a b; rm -rf /'"]
    assert config_schema()["properties"]["synth"]["properties"]["signal"]["enum"] == list(SIGNALS)


COMMANDS = [["wsiomics.tiling", "tile"], ["wsiomics.features", "extract"], ["wsiomics.expression", "cohort"],
            ["wsiomics.expression", "normalize"], ["wsiomics.splits"], ["wsiomics.synth"]]


def options_without_help(text: str) -> list[str]:
    lines = text.split("\noptions:\n", 1)[1].splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not re.match(r"^  -", line) or line.strip().startswith("-h, --help"):
            continue
        same_line = re.match(r"^  -\S.*?\s{2,}\S", line)
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not same_line and not re.match(r"^\s{8,}\S", following):
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_stage_option_has_a_description(command, capsys, monkeypatch):
    import importlib

    monkeypatch.setenv("COLUMNS", "200")
    module = importlib.import_module(command[0] + (".__main__" if command[0] != "wsiomics.splits" else ""))
    with pytest.raises(SystemExit) as done:
        module.main([*command[1:], "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert options_without_help(text) == []
    assert "(default:" in text
