"""Where a finished workflow run's time went, per rule: from the jobs' ``benchmark:`` files and Snakemake's log.

    .venv/bin/python bench/demo.py --run-dir .            # after `make demo`
    .venv/bin/python bench/demo.py --run-dir RUN --startup # also time each stage's Python start-up here

Per rule: jobs, summed wall seconds, summed CPU seconds (Snakemake samples the job's process tree, so very short
jobs can under-report CPU), peak RSS. The run's wall time is read from the newest ``.snakemake/log`` file.
``--startup`` measures, in fresh interpreters, the CPU seconds each stage's command pays before its first line of
work (importing its module: torch, scikit-learn, zarr...) and multiplies by the rule's job count: the share of the
run that is start-up rather than work. Not a test: nothing here is timed by CI.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd

# What each rule's command imports before it works (the module behind its `python -m`).
STARTUP_MODULES = {
    "synth": "wsiomics.synth.__main__",
    "tile": "wsiomics.tiling.__main__",
    "extract_features": "wsiomics.features.__main__",  # one job per batch of features.slides_per_job slides
    "import_features": "wsiomics.features.interop",
    "expression": "wsiomics.expression.__main__",
    "splits": "wsiomics.splits",
    "train": "wsiomics.train.stages",
    "fewshot": "wsiomics.train.stages",  # `fewshot run` imports the training stages to build each method's model
    "figures": "wsiomics.figures.__main__",
    "summary": "wsiomics.summary",
}


def rule_of(path: Path, root: Path) -> str:
    """The rule a benchmark file belongs to, from its place under benchmarks/ (train/<method>/fold<k>/<stage>)."""
    parts = path.relative_to(root).parts
    if parts[0] == "train" and len(parts) > 1:
        return f"train/{path.stem}"
    return parts[0] if len(parts) > 1 else path.stem


def benchmark_table(run_dir: Path) -> pd.DataFrame:
    root = run_dir / "benchmarks"
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        frame = pd.read_csv(path, sep="\t")
        if "s" not in frame.columns:
            continue
        rows.append({"rule": rule_of(path, root), "wall_s": frame["s"].iloc[-1],
                     "cpu_s": frame.get("cpu_time", pd.Series([float("nan")])).iloc[-1],
                     "max_rss_mb": frame["max_rss"].iloc[-1]})
    if not rows:
        raise SystemExit(f"{root}: no benchmark files; run the workflow there first (make demo)")
    jobs = pd.DataFrame(rows)
    table = jobs.groupby("rule").agg(jobs=("wall_s", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"),
                                     max_rss_mb=("max_rss_mb", "max"))
    return table.sort_values("wall_s", ascending=False)


def run_wall_seconds(run_dir: Path) -> float | None:
    """First to last timestamp of the newest Snakemake log of the run."""
    logs = sorted((run_dir / ".snakemake" / "log").glob("*.snakemake.log"))
    if not logs:
        return None
    stamps = re.findall(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]", logs[-1].read_text(), flags=re.M)
    if len(stamps) < 2:
        return None
    first, last = (datetime.strptime(" ".join(s.split()), "%a %b %d %H:%M:%S %Y") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def startup_cpu_seconds(module: str, repeats: int = 3) -> float:
    """Median CPU seconds (user + sys) of a fresh interpreter importing `module`."""
    costs = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        costs.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return sorted(costs)[len(costs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("."), help="a finished run (has benchmarks/)")
    parser.add_argument("--startup", action="store_true", help="also measure each stage's import start-up here")
    args = parser.parse_args()

    table = benchmark_table(args.run_dir)
    if args.startup:
        cache: dict[str, float] = {}
        for rule in table.index:
            module = STARTUP_MODULES.get(rule.split("/")[0], "wsiomics")
            cache.setdefault(module, startup_cpu_seconds(module))
            table.loc[rule, "startup_cpu_s"] = cache[module] * table.loc[rule, "jobs"]
    total = table.sum(numeric_only=True)
    print(table.round(1).to_markdown())
    print(f"\njobs: {int(total['jobs'])}; summed job wall: {total['wall_s']:.0f} s; summed job CPU: "
          f"{total['cpu_s']:.0f} s" + (f"; start-up CPU: {total['startup_cpu_s']:.0f} s" if args.startup else ""))
    wall = run_wall_seconds(args.run_dir)
    if wall is not None:
        print(f"run wall time (Snakemake log, first to last job): {wall:.0f} s")


if __name__ == "__main__":
    main()
