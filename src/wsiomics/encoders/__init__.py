"""Tile encoders: named presets of pathology foundation models and any timm model, with their weights.

Models know only tensors: ``build_encoder(...).model`` maps normalised tiles ``(B, 3, H, W)`` to
``(B, D)`` features; reading slides is the feature stage's job.
"""

from wsiomics.encoders.build import Encoder, TileEncoder, build_backbone, build_encoder, preset_attrs, resolve_preset
from wsiomics.encoders.presets import PRESETS, EncoderPreset
from wsiomics.encoders.weights import WeightsError, WeightsInfo, hub_reachable, read_state_dict, sha256_of

__all__ = [
    "PRESETS",
    "Encoder",
    "EncoderPreset",
    "TileEncoder",
    "WeightsError",
    "WeightsInfo",
    "build_backbone",
    "build_encoder",
    "hub_reachable",
    "preset_attrs",
    "read_state_dict",
    "resolve_preset",
    "sha256_of",
]
