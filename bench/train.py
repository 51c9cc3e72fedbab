"""Training performance (not a test): does the data path stay hidden, and does inference stay linear in tokens?

1. stream: GiMP pretraining steps/s with features streamed from zarr (bounded cache) vs the same steps on
   tensors already in memory, on a generated cohort of TCGA-sized bags (default 200 patients, 5,000-20,000
   tiles of 1,024-d fp16 each, ~5 GB on disk); peak RSS of the streamed run.
2. inference: slide transformer over one slide of 12,500 / 25,000 / 50,000 tokens on CPU: time and peak RSS
   (each size in a fresh process).
3. epochs: seconds per epoch of each method from a finished demo run's history files (--demo-dir).

    .venv/bin/python bench/train.py stream --patients 200 --steps 12
    .venv/bin/python bench/train.py inference
    .venv/bin/python bench/train.py epochs --demo-dir .
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_cohort(root: Path, n_patients: int, dim: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from wsiomics.io import atomic_zarr, write_array

    rng = np.random.default_rng(seed)
    slides, rows = [], []
    for i in range(n_patients):
        pid, n = f"P{i:04d}", int(rng.integers(5000, 20001))
        side = int(np.ceil(np.sqrt(n)))
        rr, cc = np.divmod(np.arange(n), side)
        coords = np.stack([cc, rr], 1).astype(np.int64) * 224
        feats = (rng.standard_normal((n, dim), dtype=np.float32) + (i % 2)).astype(np.float16)
        with atomic_zarr(root / f"{pid}-S0.zarr", attrs={"status": "ok", "patch_size_level0": 224.0}) as g:
            write_array(g, "features", feats, chunk_rows=4096)
            write_array(g, "coords", coords)
        slides.append({"patient_id": pid, "slide_id": f"{pid}-S0"})
        rows.append({"patient_id": pid, "fold": 0, "role": "train", "label": "ab"[i % 2]})
    return pd.DataFrame(rows), pd.DataFrame(slides)


def _gimp(feature_dim: int):
    from wsiomics.models.gene_gmsa import GeneGMSAConfig
    from wsiomics.models.gimp import GiMP, GiMPConfig
    from wsiomics.models.slide_transformer import SlideTransformerConfig

    cfg = GiMPConfig(image=SlideTransformerConfig(in_dim=feature_dim, dim=128, depth=2, heads=4),
                     gene=GeneGMSAConfig(n_genes=1, n_groups=1, dim=128, depth=1), n_classes=2, fusion_dim=128,
                     mask_length=64)
    return GiMP(cfg)


def stream(args) -> dict:
    from wsiomics.datasets import DatasetParams, load_fold

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="wsiomics-bench-train-"))
    t0 = time.perf_counter()
    folds, slides = make_cohort(work / "features", args.patients, args.dim, 0)
    write_s = time.perf_counter() - t0
    disk_gb = sum(f.stat().st_size for f in (work / "features").rglob("*") if f.is_file()) / 1e9
    try:
        data = load_fold(folds, 0, slides, work / "features", None)
        params = DatasetParams(max_tokens=args.max_tokens, crop="window", cache_mb=args.cache_mb, seed=0)
        loader = data.loader(data.dataset(("train",), params, train=True), args.batch_size, shuffle=True,
                             num_workers=args.workers, seed=0)
        model = _gimp(data.feature_dim)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)

        def step(batch):
            loss = model.pretrain_loss(batch, gen)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()

        batches = []
        it = iter(loader)
        step(next(it))  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            b = next(it)
            step(b)
            batches.append(b)
        streamed = args.steps / (time.perf_counter() - t0)
        rss_stream = _rss_mb()
        t0 = time.perf_counter()
        for b in batches:  # the same steps, batches already in memory
            step(b)
        in_memory = args.steps / (time.perf_counter() - t0)
        return {"patients": args.patients, "disk_GB": round(disk_gb, 2), "write_s": round(write_s, 1),
                "batch": args.batch_size, "max_tokens": args.max_tokens, "workers": args.workers,
                "cache_MB": args.cache_mb, "steps_per_s_streamed": round(streamed, 4),
                "steps_per_s_in_memory": round(in_memory, 4), "ratio": round(streamed / in_memory, 3),
                "peak_rss_MB_streamed": round(rss_stream)}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _one_inference(n: int, dim: int, threads: int) -> dict:
    from wsiomics.models.slide_transformer import SlideTransformer, SlideTransformerConfig

    torch.set_num_threads(threads)
    model = SlideTransformer(SlideTransformerConfig(in_dim=dim, dim=128, depth=2, heads=4)).eval()
    side = int(np.ceil(np.sqrt(n)))
    rr, cc = np.divmod(np.arange(n), side)
    pos = torch.tensor(np.stack([cc, rr], 1), dtype=torch.float32)[None]
    x = torch.randn(1, n, dim)
    base = _rss_mb()
    with torch.inference_mode():
        model(x[:, :64], pos[:, :64], None)
        t0 = time.perf_counter()
        model.encode_with_attention(model.embed(x), pos, None)  # [CLS], tokens and the heatmap weights
        seconds = time.perf_counter() - t0
    return {"tokens": n, "seconds": round(seconds, 3), "peak_rss_MB": round(_rss_mb()),
            "rss_over_inputs_MB": round(_rss_mb() - base)}


def inference(args) -> list[dict]:
    rows = []
    for n in args.tokens:
        out = subprocess.run([sys.executable, __file__, "_inference_one", str(n), str(args.dim), str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def epochs(args) -> pd.DataFrame:
    rows = []
    for hist in sorted(Path(args.demo_dir, "results", "models").glob("*/fold*/**/history.tsv")):
        table = pd.read_csv(hist, sep="\t")
        if "seconds" not in table:
            continue
        stage = "pretrain" if hist.parent.name == "pretrain" else "finetune"
        method = hist.parents[2].name if stage == "pretrain" else hist.parents[1].name
        rows.append({"method": method, "stage": stage, "s_per_epoch": table["seconds"].mean(), "epochs": len(table)})
    frame = pd.DataFrame(rows)
    return frame.groupby(["method", "stage"]).agg(s_per_epoch=("s_per_epoch", "mean"),
                                                 epochs=("epochs", "mean")).round(3).reset_index()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_inference_one":
        print(json.dumps(_one_inference(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("stream")
    s.add_argument("--patients", type=int, default=200)
    s.add_argument("--dim", type=int, default=1024)
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--max-tokens", type=int, default=4096)
    s.add_argument("--cache-mb", type=float, default=1024)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--work", default="", help="keep the generated cohort here (default: a temporary folder)")
    i = sub.add_parser("inference")
    i.add_argument("--tokens", type=int, nargs="+", default=[12500, 25000, 50000])
    i.add_argument("--dim", type=int, default=1024)
    i.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("epochs")
    e.add_argument("--demo-dir", default=".")
    args = p.parse_args()
    if args.what == "stream":
        print(json.dumps(stream(args), indent=1))
    elif args.what == "inference":
        for row in inference(args):
            print(json.dumps(row))
    else:
        print(epochs(args).to_string(index=False))


if __name__ == "__main__":
    main()
