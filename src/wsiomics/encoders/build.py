"""Build a tile encoder (tiles in, one vector per tile out) from a preset or any timm model name."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from wsiomics.encoders.presets import PRESETS, EncoderPreset
from wsiomics.encoders.weights import (
    WeightsError,
    WeightsInfo,
    hub_file,
    hub_repo,
    is_checkpoint_path,
    load_into,
    read_state_dict,
    sha256_of,
)


class TileEncoder(nn.Module):
    """A timm backbone plus the pooling its preset prescribes."""

    def __init__(self, backbone: nn.Module, pooling: str = "model"):
        super().__init__()
        if pooling not in ("model", "cls_mean"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W) normalised tiles -> (B, D)
        out = self.backbone(x)
        if self.pooling == "cls_mean":
            # out: (B, T, C) tokens; skip the class and register tokens for the patch mean
            prefix = getattr(self.backbone, "num_prefix_tokens", 1)
            out = torch.cat([out[:, 0], out[:, prefix:].mean(1)], dim=-1)
        return out


@dataclass
class Encoder:
    """A ready-to-run encoder with what a feature store must record about it."""

    name: str
    model: TileEncoder
    preset: EncoderPreset
    weights: WeightsInfo

    @property
    def feature_dim(self) -> int:
        return self.preset.feature_dim

    def transforms(self) -> dict[str, Any]:
        p = self.preset
        return {"input_size": p.input_size, "interpolation": p.interpolation, "mean": list(p.mean),
                "std": list(p.std), "scale": "uint8 / 255, then (x - mean) / std"}


def resolve_preset(name: str) -> EncoderPreset:
    """A preset by name, or one derived from a timm model's own pretrained config (``resnet50.a1_in1k``)."""
    if name in PRESETS:
        return PRESETS[name]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (similar timm models: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown encoder '{name}': not a preset ({', '.join(PRESETS)}) nor a timm model{hint}")
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = probe.pretrained_cfg
    return EncoderPreset(
        name=name, arch=name, feature_dim=int(probe.num_features), hub=cfg.get("hf_hub_id") or None,
        input_size=int(cfg["input_size"][-1]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation") or "bilinear", kwargs={"num_classes": 0},
        description=f"timm model {name}",
    )


def build_backbone(preset: EncoderPreset) -> nn.Module:
    """The timm network of a preset with random weights (creates on the current default device)."""
    kwargs = dict(preset.kwargs)
    for key, layer in preset.layer_kwargs.items():
        kwargs[key] = getattr(nn, layer, None) or getattr(timm.layers, layer)
    return timm.create_model(preset.arch, pretrained=False, **kwargs)


def _truncate(backbone: nn.Module, after: str) -> None:
    """Drop the ResNet stages after ``after`` (their output would otherwise be pooled)."""
    stages = ["layer1", "layer2", "layer3", "layer4"]
    if after not in stages or not hasattr(backbone, after):
        raise ValueError(f"cannot truncate {type(backbone).__name__} after {after!r}")
    for stage in stages[stages.index(after) + 1:]:
        setattr(backbone, stage, nn.Identity())


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    head = backbone.pretrained_cfg.get("classifier") if hasattr(backbone, "pretrained_cfg") else None
    names = head if isinstance(head, list | tuple) else [head] if head else []
    return tuple(f"{n}." for n in names)


def _locate_weights(preset: EncoderPreset, pretrained: bool, weights: str | None) -> WeightsInfo:
    if not pretrained:
        if weights:
            raise WeightsError(f"features.weights is set ({weights}) but features.pretrained is false; "
                               "set pretrained: true to use those weights, or clear weights")
        return WeightsInfo("random", "", None)
    if weights and is_checkpoint_path(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"checkpoint {weights} does not exist; fix features.weights (absolute paths are "
                               "safest: relative ones resolve against the working directory)")
        return WeightsInfo("checkpoint", str(weights), sha256_of(path), str(path))
    repo = hub_repo(weights) if weights else preset.hub
    if not repo:
        raise WeightsError(f"encoder '{preset.name}' has no published weights on the hub; set features.weights "
                           "to a local checkpoint, or features.pretrained: false for random weights")
    path = hub_file(repo)
    return WeightsInfo("hub", repo, sha256_of(path), str(path))


def _load_backbone(preset: EncoderPreset, info: WeightsInfo) -> nn.Module:
    """The backbone holding a checkpoint's weights, built on the meta device and given the checkpoint's tensors
    (``load_state_dict(assign=True)``): host memory peaks near one copy of the weights, not the random-init
    model plus the checkpoint (9-10 GB for the ViT-g presets). A model that cannot be built on meta, or has
    buffers no checkpoint holds, is built on the CPU and loaded the ordinary way."""
    state = read_state_dict(info.path)
    where = f"weights {info.name}"
    try:
        with torch.device("meta"):
            backbone = build_backbone(preset)
    except Exception:  # noqa: BLE001 - e.g. a .item() in the model's constructor: build it the ordinary way
        backbone = None
    if backbone is not None:
        load_into(backbone, state, where, ignorable=_classifier_prefixes(backbone), assign=True)
        tensors = [*backbone.parameters(), *backbone.buffers()]
        if not any(t.is_meta for t in tensors):
            return backbone
    backbone = build_backbone(preset)
    load_into(backbone, state, where, ignorable=_classifier_prefixes(backbone))
    return backbone


def build_encoder(name: str, *, pretrained: bool, weights: str | None = None, seed: int = 0) -> Encoder:
    """An encoder in eval mode on the CPU.

    ``pretrained=False`` gives seeded random weights (the demo, tests); otherwise ``weights`` is a local
    checkpoint path or a hub name, and when empty the preset's hub repository is used.
    """
    preset = resolve_preset(name)
    info = _locate_weights(preset, pretrained, weights)
    if info.path is None:
        torch.manual_seed(seed)
        backbone = build_backbone(preset)
    else:
        backbone = _load_backbone(preset, info)
    if preset.truncate_after:
        _truncate(backbone, preset.truncate_after)
    model = TileEncoder(backbone, preset.pooling).eval()
    return Encoder(name=name, model=model, preset=preset, weights=info)


def preset_attrs(preset: EncoderPreset) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(preset).items()}
