"""Host memory of loading a pretrained encoder: built on the meta device and assigned the checkpoint's
tensors (``build_encoder`` now) against the random-init model plus a loaded checkpoint (before).

    python bench/encoder_memory.py [--preset uni] [--out bench/out]

A random-weights safetensors checkpoint of the preset's architecture is written to a temporary folder
(nothing is downloaded; speed and memory do not depend on the values). Each way of loading runs in its own
fresh process, which reports its peak resident memory (``ru_maxrss``) minus its resident memory after the
imports. ``uni`` is ViT-L/16 (304 M parameters, 1.2 GB in fp32); ``uni2_h`` / ``gigapath`` / ``hoptimus0``
are ViT-g (1.1 B, 4.5 GB): those need ~10 GB free for the "before" run.
Prints a markdown table and writes ``<out>/encoder_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("before", "meta-assign")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, preset: str, weights: str) -> dict:
    import torch

    from wsiomics.encoders import build_backbone, build_encoder
    from wsiomics.encoders.build import resolve_preset
    from wsiomics.encoders.weights import load_into, read_state_dict

    torch.set_num_threads(1)
    base = _current_rss_mb()
    started = time.perf_counter()
    if mode == "before":  # what build_encoder did before: random-init model on the CPU, then copy the checkpoint in
        model = build_backbone(resolve_preset(preset))
        load_into(model, read_state_dict(weights), "bench")
    else:
        model = build_encoder(preset, pretrained=True, weights=weights).model
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    return {"mode": mode, "preset": preset, "params": params, "peak_mb": _peak_mb() - base,
            "held_mb": _current_rss_mb() - base, "seconds": seconds}


def write_checkpoint(preset: str, path: Path) -> float:
    """Random weights of the preset's architecture (initialised in place, one tensor at a time) -> safetensors."""
    import torch
    from safetensors.torch import save_file

    from wsiomics.encoders import build_backbone
    from wsiomics.encoders.build import resolve_preset

    with torch.device("meta"):
        model = build_backbone(resolve_preset(preset))
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.02 if v.is_floating_point()
             else torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path.stat().st_size / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="uni")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--child", nargs=3, metavar=("MODE", "PRESET", "WEIGHTS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{a.preset}.safetensors"
        size_mb = write_checkpoint(a.preset, weights)
        for mode in MODES:
            run = subprocess.run([sys.executable, __file__, "--child", mode, a.preset, str(weights)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"{a.preset}: checkpoint {size_mb:,.0f} MB")
    print("| loading | parameters | peak RSS over imports | held after | seconds |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['params'] / 1e6:,.0f} M | {r['peak_mb']:,.0f} MB | {r['held_mb']:,.0f} MB | "
              f"{r['seconds']:.1f} |")
    (a.out / "encoder_memory.json").write_text(json.dumps({"checkpoint_mb": size_mb, "results": results}, indent=1))


if __name__ == "__main__":
    main()
