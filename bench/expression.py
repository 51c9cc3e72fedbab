"""Expression-stage speed and memory at TCGA scale: GDC STAR files in, cohort table and one fold out.

    python bench/expression.py [--n-patients 1000] [--n-genes 60660] [--threads 2] [--out DIR] [--keep]

Generates one GDC STAR ``augmented_star_gene_counts`` file per patient (the generator's exact GDC layout:
comment line, 9 columns, 4 ``N_*`` rows; 60,660 genes as in GENCODE v36), not timed. Then runs each step
as its own process, exactly as the rules do (``python -m wsiomics.expression ...``), and reports its wall
time and peak resident memory (from ``wait4``): the cohort table, the splits, and the normalisation of one
fold (CPM + log1p, seurat_v3 on the training patients, z-scores), plus reading both stores back.
Results go to ``<out>/expression.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from wsiomics.synth.expression import gene_model, sample_counts, write_gdc_counts

_MODEL = None


def _write(args: tuple[str, int, int, int]) -> None:
    global _MODEL
    path, n_genes, index, programme = args
    if _MODEL is None or len(_MODEL.gene_id) != n_genes:
        _MODEL = gene_model(n_genes, seed=0)
    rng = np.random.default_rng(1000 + index)
    write_gdc_counts(path, _MODEL, sample_counts(_MODEL, programme, rng), rng)


def generate(folder: Path, n_patients: int, n_genes: int, workers: int) -> Path:
    """One GDC file per patient and an expression-only sample sheet (skipped when already there)."""
    sheet = folder / "samples.tsv"
    if sheet.exists():
        return sheet
    (folder / "expression").mkdir(parents=True, exist_ok=True)
    rows, jobs = [], []
    for i in range(n_patients):
        pid = f"TCGA-BE-{i:04d}"
        path = folder / "expression" / f"{pid}.rna_seq.augmented_star_gene_counts.tsv"
        jobs.append((str(path), n_genes, i, i % 2))
        rows.append({"patient_id": pid, "slide_id": "", "slide_path": "", "label": f"programme{i % 2}",
                     "expression_path": f"expression/{path.name}"})
    t = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write, jobs, chunksize=16))
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    size = sum(os.path.getsize(j[0]) for j in jobs) / 1e9
    print(f"generated {n_patients} files ({size:.1f} GB) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return sheet


def timed(step: str, args: list[str]) -> dict:
    """Run one command; wall seconds and the peak RSS of its process (MB)."""
    t = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{step} failed:\n{err[-3000:]}")
    return {"step": step, "seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-patients", type=int, default=1000)
    p.add_argument("--n-genes", type=int, default=60660)
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2, help="reader processes of the cohort step")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    a = p.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="wsiomics-bench-expression-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        sheet = generate(out / "cohort", a.n_patients, a.n_genes, max(1, a.threads))
        py = [sys.executable, "-m", "wsiomics.expression"]
        res = out / "results"
        rows = [
            timed("cohort table (read + write cohort.zarr)",
                  [*py, "cohort", "--samples", str(sheet), "--out", str(res / "cohort.zarr"),
                   "--threads", str(a.threads)]),
            timed("splits (5 folds)", [*py, "splits", "--samples", str(sheet), "--cohort", str(res / "cohort.zarr"),
                                       "--out", str(res / "folds.tsv")]),
            timed(f"normalise fold 0 ({a.n_top_genes} HVG, z-scores)",
                  [*py, "normalize", "--cohort", str(res / "cohort.zarr"), "--folds", str(res / "folds.tsv"),
                   "--fold", "0", "--out", str(res / "fold0.zarr"), "--n-top-genes", str(a.n_top_genes)]),
        ]
        read_back = ("import anndata as ad, sys; c = ad.read_zarr(sys.argv[1]); f = ad.read_zarr(sys.argv[2]); "
                     "print(c.shape, f.shape)")
        rows.append(timed("read back both stores (anndata.read_zarr)",
                          [sys.executable, "-c", read_back, str(res / "cohort.zarr"), str(res / "fold0.zarr")]))
        sizes = {name: sum(f.stat().st_size for f in (res / name).rglob("*") if f.is_file()) / 1e6
                 for name in ("cohort.zarr", "fold0.zarr")}
        report = {"n_patients": a.n_patients, "n_genes": a.n_genes, "threads": a.threads, "steps": rows,
                  "store_mb": {k: round(v) for k, v in sizes.items()}}
        (out / "expression.json").write_text(json.dumps(report, indent=1))
        print(f"\n{a.n_patients} patients x {a.n_genes} genes, {a.threads} reader processes\n")
        print("| step | seconds | peak RSS (MB) |\n|---|---|---|")
        for r in rows:
            print(f"| {r['step']} | {r['seconds']} | {r['peak_rss_mb']} |")
        print(f"\nstore sizes: cohort.zarr {sizes['cohort.zarr']:.0f} MB, fold0.zarr {sizes['fold0.zarr']:.0f} MB")
    finally:
        if not a.keep and a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
