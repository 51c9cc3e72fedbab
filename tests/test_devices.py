"""Device choice: a job given a GPU fails loudly when CUDA is unusable or the GPU too old (CUDA faked)."""

from __future__ import annotations

import pytest
import torch

from wsiomics import devices
from wsiomics.devices import driver_report, gpu_given, resolve_device


@pytest.fixture
def nvidia_proc(tmp_path, monkeypatch):
    """A driver that is loaded (its /proc files) with one GPU, whatever this machine has."""
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 "
                                      "2023\nGCC version:  gcc version 12.2.0\n")
    gpu = tmp_path / "gpus" / "0000:3b:00.0"
    gpu.mkdir(parents=True)
    (gpu / "information").write_text("Model: \t\t Tesla V100-SXM2-32GB\nIRQ:   \t\t 88\n")
    monkeypatch.setattr(devices, "NVIDIA_PROC", tmp_path)
    return tmp_path


def _no_cuda(monkeypatch, warning: str = "") -> None:
    def unavailable() -> bool:
        if warning:
            import warnings

            warnings.warn(warning, UserWarning, stacklevel=2)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def _fake_gpu(monkeypatch, capability: tuple[int, int], name: str = "Tesla V100-SXM2-32GB") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "sm_120"])


@pytest.mark.parametrize("value, given", [(None, False), ("", False), ("-1", False), ("NoDevFiles", False),
                                          ("0", True), ("1,3", True), ("GPU-8f2e1c", True), ("MIG-1a2b", True)])
def test_gpu_given(value, given):
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert (gpu_given(env) is not None) is given


def test_no_gpu_given_runs_on_cpu(monkeypatch):
    _no_cuda(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert resolve_device("cpu") == torch.device("cpu")  # asked for the CPU: no check


def test_gpu_given_without_cuda_names_driver_gpu_and_fix(monkeypatch, nvidia_proc):
    _no_cuda(monkeypatch, "The NVIDIA driver on your system is too old (found version 12020).")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ValueError) as e:
        resolve_device("auto", key="features.device", error=ValueError)
    msg = str(e.value)
    for part in ("features.device", "CUDA_VISIBLE_DEVICES=0", "NVIDIA driver 535.104.05", "Tesla V100-SXM2-32GB",
                 "found version 12020", "CUDA 13.0", ">= 580", "features.device: cpu", "Fix:"):
        assert part in msg, (part, msg)


def test_cuda_asked_without_a_driver(monkeypatch, tmp_path):
    _no_cuda(monkeypatch)
    monkeypatch.setattr(devices, "NVIDIA_PROC", tmp_path / "absent")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(RuntimeError, match=r"train.device is 'cuda'.*no NVIDIA driver loaded.*no GPU listed"):
        resolve_device("cuda", key="train.device")


def test_gpu_too_old(monkeypatch, nvidia_proc):
    _fake_gpu(monkeypatch, (7, 0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(RuntimeError, match=r"GPU 0 \(Tesla V100-SXM2-32GB\) has compute capability 7\.0.*7\.5"):
        resolve_device("auto")
    with pytest.raises(RuntimeError, match="capability 7.0"):
        resolve_device("cuda:0")


def test_recent_gpu_and_index(monkeypatch):
    _fake_gpu(monkeypatch, (8, 0), "NVIDIA A100")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match=r"only 1 CUDA device"):
        resolve_device("cuda:1")


def test_driver_report_without_driver(tmp_path):
    assert driver_report(tmp_path) == ("", [])


def test_min_capability_of_this_build():
    # the pinned CUDA wheel lists sm_75 as its oldest; a CPU build lists none and falls back to the same
    assert devices.min_capability() == (7, 5)


def _shm(monkeypatch, free_mb: int) -> None:
    usage = devices.shutil.disk_usage(".")
    monkeypatch.setattr(devices.shutil, "disk_usage", lambda p: usage._replace(free=free_mb * 2**20))


def test_small_shm_lowers_prefetch_then_workers(monkeypatch, caplog):
    batch = 128 * 3 * 224 * 224  # 19.3 MB of uint8 tiles
    _shm(monkeypatch, 10_000)
    assert devices.shm_loader_limits(8, batch) == (8, 4)
    assert devices.shm_loader_limits(0, batch) == (0, None)
    _shm(monkeypatch, 400)  # 200 MB budget: 8 x 1 batch fits, 8 x 4 does not
    with caplog.at_level("WARNING", logger="wsiomics.devices"):
        assert devices.shm_loader_limits(8, batch) == (8, 1)
    assert "--shm-size" in caplog.text
    _shm(monkeypatch, 64)  # a container's default: 32 MB budget, one 19 MB batch at a time
    assert devices.shm_loader_limits(8, batch) == (1, 1)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_extraction_loader_follows_shm(monkeypatch):
    from wsiomics.features import extract
    from wsiomics.features.tiles import TileBatches, TileGeometry

    dataset = TileBatches("unused.svs", [[0, 0]] * 1000, TileGeometry(0, 224, 224), 128)
    _shm(monkeypatch, 64)
    loader = extract._loader(dataset, 8, torch.device("cpu"))
    assert (loader.num_workers, loader.prefetch_factor) == (1, 1)
    _shm(monkeypatch, 10_000)
    loader = extract._loader(dataset, 8, torch.device("cpu"))
    assert (loader.num_workers, loader.prefetch_factor) == (8, 4)
