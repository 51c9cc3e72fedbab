"""Device choice shared by every torch stage: ``auto`` takes the GPU when one is visible."""

from __future__ import annotations

import torch


def resolve_device(spec: str, key: str = "device", error: type[Exception] = RuntimeError) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device; asking for CUDA without one raises ``error``
    naming the config ``key`` and the fix."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{key} is '{spec}' but no CUDA device is visible; use 'auto' or 'cpu'")
    return device
