"""Encoder presets against a committed manifest of the state_dict each preset's checkpoint must provide.

A preset that drifts (a kwarg lost, a timm upgrade that renames a layer or changes a default) would still
build and still produce features, only ones the published weights no longer load into. The manifest pins,
per preset, the tensor count, parameter count, a sha256 over the sorted ``key:shape`` lines and a few
anchor shapes (readable against a model card or a checkpoint header: pos_embed, patch size, MLP widths).
Networks are built on the meta device, so even the 1.1 B-parameter ones take a second.

Regenerate after an intended change (and check the anchors against the real checkpoint's header, e.g.
``safetensors.safe_open(path, "pt").keys()`` or ``torch.load(path, weights_only=True)``)::

    python tests/test_encoders.py --regenerate
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

from wsiomics.encoders import PRESETS, TileEncoder, build_backbone
from wsiomics.encoders.build import _truncate

MANIFEST = Path(__file__).resolve().parent / "data" / "encoder_state_dicts.json"
ANCHORS = ("cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.ls1.gamma",
           "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight", "conv1.weight",
           "layer3.5.conv3.weight", "layer4.2.conv3.weight")


def state_dict_manifest(name: str, backbone: torch.nn.Module | None = None) -> dict:
    """What a checkpoint for preset ``name`` must hold: the backbone's state_dict before truncation (the
    classifier, which timm drops with num_classes=0, may be extra), summarised."""
    preset = PRESETS[name]
    if backbone is None:
        with torch.device("meta"):
            backbone = build_backbone(preset)
    shapes = {k: list(v.shape) for k, v in backbone.state_dict().items()}
    lines = "\n".join(f"{k}:{'x'.join(map(str, s))}" for k, s in sorted(shapes.items()))
    return {"arch": preset.arch, "n_tensors": len(shapes),
            "n_params": sum(p.numel() for p in backbone.parameters()),
            "sha256": hashlib.sha256(lines.encode()).hexdigest(),
            "anchors": {k: "x".join(map(str, shapes[k])) for k in ANCHORS if k in shapes}}


def regenerate() -> None:
    manifest = {"timm": timm.__version__, "presets": {name: state_dict_manifest(name) for name in PRESETS}}
    MANIFEST.parent.mkdir(exist_ok=True)
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {MANIFEST} ({len(manifest['presets'])} presets, timm {timm.__version__})")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def test_manifest_covers_every_preset(manifest):
    assert set(manifest["presets"]) == set(PRESETS), "run: python tests/test_encoders.py --regenerate"


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_state_dict_matches_the_manifest_and_gives_its_dimension(manifest, name):
    expected = manifest["presets"][name]
    preset = PRESETS[name]
    with torch.device("meta"):
        backbone = build_backbone(preset)
    got = state_dict_manifest(name, backbone)
    assert got["anchors"] == expected["anchors"], f"{name}: anchor shapes changed (timm {timm.__version__})"
    assert (got["n_tensors"], got["n_params"]) == (expected["n_tensors"], expected["n_params"]), name
    assert got["sha256"] == expected["sha256"], (f"{name}: state_dict keys/shapes changed; published weights "
                                                 "would no longer load. If intended: --regenerate")
    with torch.device("meta"):
        if preset.truncate_after:
            _truncate(backbone, preset.truncate_after)
        out = TileEncoder(backbone, preset.pooling)(torch.empty(2, 3, preset.input_size, preset.input_size))
    assert tuple(out.shape) == (2, preset.feature_dim)


def test_manifest_catches_a_changed_preset(manifest, monkeypatch):
    """The check can fail: UNI without its LayerScale (init_values) loses the ls1/ls2 tensors."""
    uni = PRESETS["uni"]
    kwargs = {k: v for k, v in uni.kwargs.items() if k != "init_values"}
    monkeypatch.setitem(PRESETS, "uni", type(uni)(**{**uni.__dict__, "kwargs": kwargs}))
    got = state_dict_manifest("uni")
    assert got["sha256"] != manifest["presets"]["uni"]["sha256"] and "blocks.0.ls1.gamma" not in got["anchors"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: python {sys.argv[0]} --regenerate")
    regenerate()
