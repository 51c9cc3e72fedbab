"""Model settings: a key no model reads is an error naming the key, the method and the keys it allows."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_train import TRAIN_CFG

from wsiomics.train.build import all_model_keys, check_model_keys, model_keys
from wsiomics.train.methods import METHODS, get_method, method_config

ROOT = Path(__file__).resolve().parents[1]


def _with(methods: dict, **shared) -> dict:
    return {**TRAIN_CFG, **shared, "methods": methods}


@pytest.mark.parametrize("override", [
    {"gimp": {"model": {"mask_lenght": 3}}},  # a typo
    {"gimp": {"pretrain": {"model": {"mask_lenght": 3}}}},  # in a stage's model section
    {"mgi": {"model": {"mask_length": 3}}},  # a GiMP setting, which MGI does not read
    {"mgi_mlp_genes": {"model": {"d_state": 8}}},  # a Mamba setting, which the MLP gene encoder does not read
    {"linear": {"model": {"dim": 8}}},  # scikit-learn: no model settings at all
])
def test_a_method_override_no_model_reads_is_an_error(override):
    (name, section), = override.items()
    key = next(iter(section.get("model") or section["pretrain"]["model"]))
    with pytest.raises(ValueError, match=rf"{key}.*{name}") as err:
        method_config(_with(override), name)
    assert "allowed:" in str(err.value)


def test_overrides_the_method_reads_are_accepted():
    overrides = {"gimp": {"model": {"mask_length": 3}, "finetune": {"model": {"dropout": 0.2}}},
                 "mgi": {"model": {"d_state": 8, "gene_norm": "layernorm"}},
                 "mgi_mlp_genes": {"model": {"gene_hidden": 32}},
                 "image_seg": {"model": {"seg_decoder_depth": 2}}}
    for name in overrides:
        method_config(_with(overrides), name)


def test_a_typo_in_a_shared_stage_model_section_is_an_error():
    with pytest.raises(ValueError, match="droput.*allowed"):
        method_config(_with({}, finetune={**TRAIN_CFG["finetune"], "model": {"droput": 0.3}}), "gimp")


def test_the_resolved_model_settings_are_checked_when_the_model_is_built():
    cfg = method_config(TRAIN_CFG, "gimp")
    check_model_keys(get_method("gimp"), cfg["model"])
    with pytest.raises(ValueError, match="mask_lenght.*gimp"):
        check_model_keys(get_method("gimp"), {**cfg["model"], "mask_lenght": 3})


def test_every_schema_model_key_is_read_by_some_model():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    keys = set(schema["properties"]["train"]["properties"]["model"]["properties"])
    assert keys - all_model_keys() == set()
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())["train"]["model"]
    assert set(shipped) - all_model_keys() == set()
    for name in METHODS:  # the shipped settings resolve for every method
        method_config(yaml.safe_load((ROOT / "config.yaml").read_text())["train"], name)
    assert "mask_length" in model_keys(get_method("gimp"), {}) and "mask_length" not in model_keys(
        get_method("mgi"), {})
