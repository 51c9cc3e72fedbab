"""The contrastive losses stay fp32 under bf16 autocast: their similarity matrices are not rounded to bf16."""

from __future__ import annotations

import pytest
import torch

from wsiomics.models import batch_hard_triplet_loss
from wsiomics.models.mgi import info_nce


def _both(loss_fn):
    """loss and input gradients in fp32, then under CPU bf16 autocast (as a training step runs them)."""
    results = []
    for autocast in (False, True):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(48, 64, generator=g).requires_grad_()
        b = torch.randn(48, 64, generator=g).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(a, b)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    return results


@pytest.mark.parametrize("name", ["info_nce", "triplet"])
def test_losses_under_bf16_autocast_equal_fp32(name):
    ids = torch.arange(48) % 6
    fns = {"info_nce": lambda a, b: info_nce(a, b, 100.0),  # CLIP's largest scale: bf16 logits step by 0.5
           "triplet": lambda a, b: batch_hard_triplet_loss(a + 0.3 * b, ids)}
    (loss32, ga32, gb32), (loss16, ga16, gb16) = _both(fns[name])
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga16, ga32, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb16, gb32, rtol=1e-4, atol=1e-6)
