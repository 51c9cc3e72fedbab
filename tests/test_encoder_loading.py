"""Pretrained encoders are built on the meta device and take the checkpoint's tensors as their parameters, so
host memory peaks near one copy of the weights, not two (the ViT-g presets: ~4.5 GB, not 9-10 GB)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wsiomics.encoders import build as build_mod
from wsiomics.encoders import build_encoder


@pytest.mark.parametrize("name, dtype", [("test_vit", torch.float32), ("test_resnet", torch.float32),
                                         ("test_vit", torch.bfloat16)])
def test_checkpoint_tensors_become_the_parameters(tmp_path, monkeypatch, name, dtype):
    reference = build_encoder(name, pretrained=False, seed=3)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in reference.model.backbone.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    loaded = {}
    real = build_mod.read_state_dict

    def keeping(p):
        loaded.update(real(p))
        return loaded

    monkeypatch.setattr(build_mod, "read_state_dict", keeping)
    encoder = build_encoder(name, pretrained=True, weights=str(path))
    tensors = dict(encoder.model.backbone.named_parameters()) | dict(encoder.model.backbone.named_buffers())
    assert not any(t.is_meta for t in tensors.values())
    assert all(t.dtype == reference.model.backbone.state_dict()[k].dtype for k, t in tensors.items())
    if dtype == torch.float32:  # no second copy: the parameters are the checkpoint's tensors
        shared = [k for k, t in tensors.items() if k in loaded and t.data_ptr() == loaded[k].data_ptr()]
        assert len(shared) == len(loaded)
    x = torch.randn(2, 3, reference.preset.input_size, reference.preset.input_size)
    with torch.no_grad():
        expected = reference.model(x) if dtype == torch.float32 else None
        got = encoder.model(x)
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
