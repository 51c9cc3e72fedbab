"""Gene-encoder speed and memory against sequence length: our Mamba vs mambapy vs a transformer vs an MLP.

    python bench/gene_encoders.py [--lengths 1024 2048 4096 8192 16384] [--models ours mambapy transformer mlp]
                                  [--reps 2] [--threads 2] [--out bench/out]
    python bench/gene_encoders.py --tune [--lengths 2048 16384]   # chunk/segment sweep of our scan

One token per gene, width 128, 2 layers, batch 1, fp32, ``torch.set_num_threads(2)``; one forward and
backward of ``pooled.square().mean()`` is timed (best of ``--reps`` after one warm-up run). Every
(model, length) runs in its own fresh process, which reports its peak resident memory (``ru_maxrss``) minus
its resident memory after imports, model and input creation, so one configuration's peak cannot hide another's.

Models (all take the same genes -> tokens step, :class:`~wsiomics.models.gene_mamba.GeneTokenizer`):
  ours         :class:`~wsiomics.models.gene_mamba.GeneMambaEncoder` (chunked pure-PyTorch scan; beyond 2,048
               tokens each block runs in recomputed stretches, the default ``recompute_length``)
  ours-keep    the same with ``recompute_length: null`` (whole-sequence activations kept for the backward)
  mambapy      mambapy 1.2.0 ``Mamba`` (2 residual blocks, Blelloch parallel scan), mean-pooled
  transformer  ``torch.nn.TransformerEncoder`` (batch_first, norm_first, 4 heads, feed-forward 512, no
               dropout: SDPA's fused CPU kernel), mean-pooled
  mlp          :class:`~wsiomics.models.gene_mamba.GeneMLPEncoder` (LayerNorm, 512 hidden, 128 out)
Both wall and CPU seconds are recorded: on a shared machine CPU seconds are the steadier figure.
Prints a markdown table and writes ``<out>/gene_encoders.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("ours", "ours-keep", "mambapy", "transformer", "mlp")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(model: str, length: int, dim: int, depth: int):
    from torch import nn

    from wsiomics.models.gene_mamba import (
        GeneMambaConfig,
        GeneMambaEncoder,
        GeneMLPConfig,
        GeneMLPEncoder,
        GeneTokenizer,
    )

    if model in ("ours", "ours-keep"):
        keep = dict(recompute_length=None) if model == "ours-keep" else {}
        enc = GeneMambaEncoder(GeneMambaConfig(n_genes=length, genes_per_token=1, dim=dim, depth=depth, **keep))
        return lambda g: enc(g).pooled, enc
    if model == "mlp":
        enc = GeneMLPEncoder(GeneMLPConfig(n_genes=length, dim=dim, dropout=0.0))
        return lambda g: enc(g).pooled, enc
    tok = GeneTokenizer(length, 1, dim)
    if model == "mambapy":
        from mambapy.mamba import Mamba, MambaConfig

        body = Mamba(MambaConfig(d_model=dim, n_layers=depth))
    elif model == "transformer":
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
    else:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    net = nn.Sequential(tok, body)
    return lambda g: net(g).mean(dim=1), net


def child(model: str, length: int, reps: int, threads: int, dim: int, depth: int, chunk: int | None,
          segment: int | None) -> dict:
    import torch

    from wsiomics.models import mamba

    torch.set_num_threads(threads)
    if chunk:
        mamba.CHUNK_SIZE = chunk
    if segment:
        mamba.SEGMENT_SIZE = segment
    torch.manual_seed(0)
    fn, module = build(model, length, dim, depth)
    genes = torch.randn(1, length)
    base = _current_rss_mb()
    walls, cpus = [], []
    for _ in range(reps + 1):
        module.zero_grad(set_to_none=True)
        w0, c0 = time.perf_counter(), time.process_time()
        fn(genes).square().mean().backward()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    timed_w, timed_c = (walls[1:], cpus[1:]) if reps else (walls, cpus)
    return {"model": model, "length": length, "wall_s": min(timed_w), "cpu_s": min(timed_c),
            "peak_mb": max(0.0, _rss_mb() - base), "chunk": mamba.CHUNK_SIZE, "segment": mamba.SEGMENT_SIZE}


def run_child(model: str, length: int, a: argparse.Namespace, chunk: int | None = None,
              segment: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", model, str(length), "--reps", str(a.reps), "--threads",
           str(a.threads), "--dim", str(a.dim), "--depth", str(a.depth)]
    if chunk:
        cmd += ["--chunk-size", str(chunk)]
    if segment:
        cmd += ["--segment-size", str(segment)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"model": model, "length": length, "error": res.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if "error" in r:
        return "error"
    return f"{r['wall_s']:.2f} / {r['cpu_s']:.2f} s, {r['peak_mb']:.0f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--tune", action="store_true", help="sweep chunk and segment sizes of our scan")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--segment-size", type=int, default=None)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.reps, a.threads, a.dim, a.depth, a.chunk_size,
                               a.segment_size)))
        return

    a.out.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {a.threads}, "
          f"width {a.dim}, {a.depth} layers, batch 1, fp32; cells: wall / CPU seconds, peak MB", flush=True)
    if a.tune:
        rows = []
        print("\n| length | chunk | segment | wall s | CPU s | peak MB |\n|---|---|---|---|---|---|")
        for length in a.lengths:
            for chunk in (8, 16, 32):
                for segment in (128, 256, 512, 1024):
                    r = run_child("ours", length, a, chunk, segment)
                    rows.append(r)
                    if "error" in r:
                        print(f"| {length} | {chunk} | {segment} | error: {r['error']} |", flush=True)
                        continue
                    print(f"| {length} | {chunk} | {segment} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | "
                          f"{r['peak_mb']:.0f} |", flush=True)
        (a.out / "gene_encoders_tune.json").write_text(json.dumps(rows, indent=1))
        return

    results: dict[tuple[str, int], dict] = {}
    print("\n| tokens | " + " | ".join(a.models) + " |\n" + "|---" * (len(a.models) + 1) + "|", flush=True)
    for length in a.lengths:
        for model in a.models:  # one configuration at a time: never two children side by side
            results[model, length] = run_child(model, length, a)
        print(f"| {length:,} | " + " | ".join(_cell(results.get((m, length))) for m in a.models) + " |", flush=True)

    def t(model: str, length: int, key: str = "wall_s") -> float | None:
        r = results.get((model, length))
        return r.get(key) if r else None

    checks = []
    lo, hi = min(a.lengths), max(a.lengths)
    for key in ("wall_s", "cpu_s"):
        if t("ours", hi, key) and t("transformer", hi, key):
            checks.append(f"{key}: transformer / ours at {hi:,}: {t('transformer', hi, key) / t('ours', hi, key):.2f}x")
        if "mambapy" in a.models and all(t("ours", n, key) and t("mambapy", n, key) for n in a.lengths):
            ratios = [t("mambapy", n, key) / t("ours", n, key) for n in a.lengths]
            checks.append(f"{key}: mambapy / ours: {min(ratios):.2f}x (worst) to {max(ratios):.2f}x")
        if 2048 in a.lengths and t("ours", hi, key) and t("ours", 2048, key):
            ratio = t("ours", hi, key) / (hi / 2048 * t("ours", 2048, key))
            checks.append(f"{key}: ours {hi:,} / ({hi // 2048} x 2,048): {ratio:.2f} (linear = 1)")
    if t("ours", hi, "peak_mb") is not None and t("transformer", hi, "peak_mb") is not None:
        checks.append(f"peak at {hi:,}: ours {t('ours', hi, 'peak_mb'):.0f} MB, transformer "
                      f"{t('transformer', hi, 'peak_mb'):.0f} MB")
    print("\n" + "\n".join(checks))
    load = os.getloadavg()
    (a.out / "gene_encoders.json").write_text(json.dumps(
        {"lengths": a.lengths, "threads": a.threads, "dim": a.dim, "depth": a.depth, "loadavg": load, "lo": lo,
         "results": list(results.values()), "checks": checks}, indent=1))
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
