"""The one batch layout every model takes: padded patient bags plus expression, as plain tensors.

Built by :mod:`wsiomics.datasets` (the only place that reads stores); models see nothing but this.
Padding positions have ``token_mask`` False and ``slide_index`` -1; a patient without slides has no
valid token at all (``has_image`` False), one without expression has zeros in ``genes``
(``has_gene`` False). ``labels`` is -1 where a patient has no label. ``tile_targets`` is optional
(None unless some slide of the dataset carries per-tile targets, e.g. tumour labels for segmentation);
it is NaN where a token has no target (padding, unannotated slides). ``outcomes`` likewise holds a task's
patient-level targets (survival: follow-up time and event), NaN for a patient without them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    features: torch.Tensor  # (B, L, D_in) float: patch features, slides of a patient one after another
    positions: torch.Tensor  # (B, L, 2) float: grid (col, row) of each patch, in patch units
    slide_index: torch.Tensor  # (B, L) long: which of the patient's slides a token is from; -1 = padding
    token_mask: torch.Tensor  # (B, L) bool: True for a real token
    genes: torch.Tensor  # (B, G) float: normalised expression in the fold's gene order (zeros if missing)
    has_image: torch.Tensor  # (B,) bool: the patient has at least one token
    has_gene: torch.Tensor  # (B,) bool: the patient has expression
    labels: torch.Tensor  # (B,) long: class index, -1 = unlabelled
    patient_index: torch.Tensor  # (B,) long: index of the patient in its dataset (instance identity)
    tile_targets: torch.Tensor | None = None  # (B, L) float per-token target, NaN = none; None = no targets
    outcomes: torch.Tensor | None = None  # (B, K) float patient-level target (survival: time, event), NaN = none

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(
            device, non_blocking=True) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ModelOutput:
    """What every model returns from ``forward(batch)``; fields a model does not have stay None."""

    logits: torch.Tensor | None = None  # (B, C) class scores
    image: torch.Tensor | None = None  # (B, D) image [CLS]-level embedding (missing-modality token if absent)
    gene: torch.Tensor | None = None  # (B, D) gene [CLS]-level embedding
    fused: torch.Tensor | None = None  # (B, E) fused embedding
    attention: torch.Tensor | None = None  # (B, L) per-token attention (zeros at padding), for heatmaps
    tile_logits: torch.Tensor | None = None  # (B, L) per-token scores (segmentation)
