"""Acceptance across label modes (not a test): the same synthetic slides and expression, labelled by what
carries the class (image | genes | both | xor), trained and evaluated by the workflow.

The synthetic generator draws tissue types and expression programmes independently of ``signal``; only the
label changes. So one finished demo run (slides tiled, features extracted) serves every mode: each mode gets
its own work directory with the finished tiles and feature stores hard-linked in, and a relabelled copy of
the sheet next to the original (its relative paths still resolve). Snakemake then re-runs only what the
labels touch: folds, expression normalisation and training.

    .venv/bin/python bench/signals.py --demo-dir . --modes image genes both --out bench/out/signals
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from wsiomics.synth.cohort import label_for  # noqa: E402


def relabel(demo: Path, mode: str) -> Path:
    cohort = demo / "results" / "demo_cohort"
    truth = pd.read_csv(cohort / "patients_truth.tsv", sep="\t", dtype={"patient_id": str})
    factors = json.loads((cohort / "cohort.json").read_text())["config"].get("latent_factors", 0)  # shared's
    labels = {r.patient_id: label_for(mode, int(r.tissue_type), int(r.programme),
                                      tuple(float(getattr(r, f"latent{i}")) for i in range(factors)))
              for r in truth.itertuples()}
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["label"] = sheet["patient_id"].map(labels)
    out = cohort / f"samples_{mode}.tsv"
    sheet.to_csv(out, sep="\t", index=False)
    return out


def run_mode(demo: Path, mode: str, out: Path, methods: list[str], extra: list[str], sheet: Path | None = None
             ) -> pd.DataFrame:
    """The workflow in ``out/<mode>`` on the demo's finished tiles and features (hard links) with ``sheet``
    (default: the demo's sheet relabelled by ``mode``): only folds, expression and training run."""
    work = out / mode
    (work / "results").mkdir(parents=True, exist_ok=True)
    for sub in ("tiles", "features", "qc"):
        if not (work / "results" / sub).exists():
            subprocess.run(["cp", "-al", str(demo / "results" / sub), str(work / "results" / sub)], check=True)
    sheet = sheet or relabel(demo, mode)
    run = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "--cores", "2",
           "--directory", str(work), "--rerun-triggers", "mtime", "--config", f"samples={sheet}",
           f"train={{run: [{', '.join(methods)}]}}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(run, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: snakemake failed\n{proc.stderr[-4000:]}")
    seconds = time.perf_counter() - t0
    summary = pd.read_csv(work / "results" / "models" / "summary.tsv", sep="\t")
    summary.insert(0, "mode", mode)
    summary["workflow_s"] = round(seconds)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default=".", help="a work directory where the demo ran (tiles and features done)")
    p.add_argument("--modes", nargs="+", default=["image", "genes", "both"])
    p.add_argument("--methods", nargs="+", default=["linear", "gene_only", "image_only", "late_fusion", "gimp"])
    p.add_argument("--out", default="bench/out/signals")
    p.add_argument("--config", nargs="*", default=[], help="extra --config items for every mode")
    args = p.parse_args()
    demo, out = Path(args.demo_dir).resolve(), Path(args.out).resolve()
    tables = [run_mode(demo, m, out, args.methods, args.config) for m in args.modes]
    table = pd.concat(tables, ignore_index=True)
    cols = ["mode", "method", "n_folds"] + [c for c in table.columns if c.startswith(("balanced_accuracy", "auc"))]
    print(table[cols + ["workflow_s"]].to_string(index=False))
    (out / "summary.json").write_text(json.dumps(table.to_dict(orient="records"), indent=1))


if __name__ == "__main__":
    main()
