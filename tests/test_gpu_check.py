"""bench/gpu_check.py runs on a machine without CUDA: the environment report passes, every CUDA part is
skipped with its reason, and it exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check runs its CUDA parts (minutes)")
def test_gpu_check_on_cpu_skips_the_cuda_parts_with_the_reason():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--budget-s", "60"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = {line.split(") ")[0] + ")": line for line in run.stdout.splitlines()
             if line[:4] in ("PASS", "SKIP", "FAIL")}
    assert lines["PASS (a)"].count("torch ") == 1 and "device auto -> cpu" in lines["PASS (a)"]
    assert "scan on cpu: pure-PyTorch" in lines["PASS (a)"]
    for item in "bcde":
        assert f"SKIP ({item})" in lines and "no usable CUDA device" in lines[f"SKIP ({item})"], run.stdout
    assert not any(k.startswith("FAIL") for k in lines)


def test_gpu_check_scan_part_runs_on_cpu():
    """``--device cpu`` runs the CUDA parts' code on the CPU: here the scan part, which checks the scan under
    bf16 autocast against the reference."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--parts", "d"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("PASS (d)") == 3 and "SKIP (d) mamba_ssm kernel" in run.stdout
