"""An average of networks trained alike from different seeds (a deep ensemble).

At a few dozen patients a network's ranking of held-out patients depends on its seed (initialisation,
batches, dropout) about as much as on the data; averaging the outputs of a few such members removes that
part of the variance without a larger model or a choice made on the test patients.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from wsiomics.models.batch import Batch, ModelOutput


class MeanEnsemble(nn.Module):
    """Members' ``logits`` averaged; every other output (embeddings, attention) is the first member's."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, batch: Batch) -> ModelOutput:
        outs = [m(batch) for m in self.members]
        if outs[0].logits is None:
            return outs[0]
        logits = torch.stack([o.logits.float() for o in outs]).mean(dim=0)  # (B, C)
        return replace(outs[0], logits=logits)
