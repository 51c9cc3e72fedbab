"""Device choice shared by every torch stage: ``auto`` takes the GPU when one is visible.

A job that was given a GPU (``CUDA_VISIBLE_DEVICES`` holds a device list, as SLURM sets it for ``--gpus``,
or the config says ``cuda``) must not fall back to the CPU when CUDA is unusable: it would run for hours on
its few CPU threads. It fails instead, naming the driver, the GPU and the fix.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The NVIDIA driver's own report (present whenever its kernel module is loaded, even when CUDA is unusable).
NVIDIA_PROC = Path("/proc/driver/nvidia")
# Oldest compute capability of the pinned wheel when torch does not list its architectures (a CPU build).
FALLBACK_MIN_CAPABILITY = (7, 5)
# CUDA major version -> oldest Linux driver branch that runs it (NVIDIA's CUDA toolkit release notes).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
# Where DataLoader workers hand their batches to the main process (shared-memory files).
SHM = Path("/dev/shm")


def gpu_given(environ: Mapping[str, str] | None = None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` when it names at least one device (SLURM's ``--gpus``), else None.

    Unset, empty, ``-1`` or ``NoDevFiles`` mean no GPU was given.
    """
    value = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    first = value.strip().split(",")[0].strip()
    if not first or first.startswith("-") or first.lower() in ("nodevfiles", "none", "void"):
        return None
    return value


def min_capability() -> tuple[int, int]:
    """The oldest compute capability this torch build has kernels for (sm_75 for the pinned CUDA 13 wheel)."""
    sms = [int(m[1]) for a in torch.cuda.get_arch_list() if (m := re.fullmatch(r"sm_(\d+)", a))]
    caps = [(sm // 10, sm % 10) for sm in sms]
    return min(caps) if caps else FALLBACK_MIN_CAPABILITY


def driver_report(root: Path | None = None) -> tuple[str, list[str]]:
    """(driver version, GPU models) from the NVIDIA driver's /proc files; '' and [] when none is loaded."""
    root = NVIDIA_PROC if root is None else root
    try:
        text = (root / "version").read_text()
        m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+[\d.]*)", text)
        driver = m.group(1) if m else text.splitlines()[0].strip()
    except OSError:
        driver = ""
    gpus = []
    for info in sorted((root / "gpus").glob("*/information")) if (root / "gpus").is_dir() else []:
        m = re.search(r"^Model:\s*(.+)$", info.read_text(errors="replace"), re.M)
        gpus.append(m.group(1).strip() if m else info.parent.name)
    return driver, gpus


def _unusable_message(key: str, why: str, torch_warning: str) -> str:
    cuda = torch.version.cuda
    driver, gpus = driver_report()
    need = MIN_DRIVER.get(int(cuda.split(".")[0])) if cuda else None
    driver_text = f"NVIDIA driver {driver}" if driver else f"no NVIDIA driver loaded ({NVIDIA_PROC}/version missing)"
    gpu_text = ", ".join(gpus) if gpus else "no GPU listed by the driver"
    if cuda is None:
        fix = (f"this torch {torch.__version__} is a CPU-only build: install the CUDA build "
               "(README 'GPU requirements')")
    else:
        fix = (f"torch {torch.__version__} is built for CUDA {cuda}, which needs NVIDIA driver >= {need or '?'}: "
               "update the driver, or install a torch build for the CUDA your driver supports "
               "(README 'GPU requirements')")
    note = f" torch says: {torch_warning.strip()}" if torch_warning else ""
    return (f"{key}: this job was given a GPU ({why}) but CUDA is not usable. Driver: {driver_text}; GPU: "
            f"{gpu_text}.{note} Fix: {fix}; or run on the CPU with {key}: cpu and no CUDA_VISIBLE_DEVICES.")


def check_cuda(device: torch.device, key: str, why: str, error: type[Exception]) -> None:
    """Raise ``error`` unless CUDA works and ``device``'s GPU has a capability this torch build runs on."""
    with warnings.catch_warnings(record=True) as caught:  # torch explains an old driver in a warning
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        raise error(_unusable_message(key, why, "; ".join(str(w.message) for w in caught)))
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise error(f"{key} is '{device}' but only {count} CUDA device(s) are visible "
                    f"(CUDA_VISIBLE_DEVICES={visible}); use cuda:0..{count - 1}")
    cap, need = tuple(torch.cuda.get_device_capability(index)), min_capability()
    if cap < need:
        name = torch.cuda.get_device_name(index)
        raise error(f"{key}: GPU {index} ({name}) has compute capability {cap[0]}.{cap[1]}, but torch "
                    f"{torch.__version__} (CUDA {torch.version.cuda}) runs on {need[0]}.{need[1]} or newer only "
                    f"(Turing, e.g. T4, or later). Fix: run on a newer GPU (SLURM: gpu_model / constraint under "
                    f"extract_features, README 'GPU requirements'), or on the CPU with {key}: cpu.")


def resolve_device(spec: str, key: str = "device", error: type[Exception] = RuntimeError) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device.

    ``auto`` takes the GPU when CUDA works, and the CPU when no GPU was given; a job that was given a GPU
    (``cuda``, or ``CUDA_VISIBLE_DEVICES`` set) raises ``error`` naming the config ``key``, the driver, the
    GPU and the fix when CUDA is unusable or the GPU too old (:func:`check_cuda`).
    """
    if spec == "auto":
        given = gpu_given()
        if given is None and not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda")
        check_cuda(device, key, f"CUDA_VISIBLE_DEVICES={given}" if given else "a GPU is visible", error)
        return device
    device = torch.device(spec)
    if device.type == "cuda":
        check_cuda(device, key, f"{key} is '{spec}'", error)
    return device


def shm_loader_limits(workers: int, batch_bytes: int, prefetch: int = 4, path: Path | None = None
                      ) -> tuple[int, int | None]:
    """(workers, prefetch_factor) whose batches in flight fit in half of the free shared memory.

    Each of ``workers`` DataLoader processes keeps up to ``prefetch`` batches of ``batch_bytes`` in /dev/shm,
    which containers cap at 64 MB by default (8 x 4 x 19 MB would need 600 MB): a full /dev/shm kills the
    workers with a bus error. The prefetch is lowered first, then the workers; a warning says how to give
    the container more. ``prefetch`` is None when there are no workers (DataLoader's rule).
    """
    if workers <= 0:
        return 0, None
    path = SHM if path is None else path
    try:
        free = shutil.disk_usage(path).free
    except OSError:  # no /dev/shm (not Linux): workers pass batches some other way
        return workers, prefetch
    budget = free // 2
    fit = budget // max(1, workers * batch_bytes)
    if fit >= prefetch:
        return workers, prefetch
    new_workers = workers if fit >= 1 else max(1, budget // max(1, batch_bytes))
    new_prefetch = max(1, min(prefetch, fit))
    log.warning("%s has %.0f MB free: %d workers x %d batches of %.1f MB would not fit, so using %d workers x %d. "
                "Fix: give the container more shared memory (docker run --shm-size=2g; Kubernetes: an emptyDir "
                "with medium: Memory at /dev/shm), or lower the batch size", path, free / 2**20, workers,
                prefetch, batch_bytes / 2**20, new_workers, new_prefetch)
    return new_workers, new_prefetch
