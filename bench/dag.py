"""How the workflow scales with the cohort: Snakemake on sample sheets of 1,000 and 10,000 slides.

    python bench/dag.py [--sizes 1000 10000] [--repeats 3] [--variants fresh,resume,touch,touch-subsample]
                        [--cap 180] [--out DIR] [--keep]

Writes one sample sheet per size in the sample-sheet contract (patient_id, slide_id, slide_path, label, mpp,
annotation_path, expression_path): about 1.25 slides per patient (every fourth patient has a second slide), a
GDC STAR expression file for 80% of patients, 2% expression-only patients, an mpp override on 5% and an
annotation on 10% of the slides. The sheet loader checks that every file it names exists, so each path points
to an empty placeholder file. Writing them is not timed.

Then runs the repo's Snakefile as a user would (``snakemake -s Snakefile --cores 2 --directory <new empty
dir> --config samples=<sheet> ...``) and reports the wall time and peak resident memory of the snakemake
process (``/usr/bin/time -v``, else ``wait4``) and the number of jobs in the DAG. Variants:

- ``fresh``: ``-n``, the first look at a new cohort (every tile, feature and expression job planned);
- ``resume``: ``-n`` after every slide's tiles store and QC picture exist (empty placeholders, newer than the
  slides, no Snakemake metadata): Snakemake stats every output and plans the rest;
- ``touch``: ``--touch``, a real run whose jobs do no work: Snakemake's scheduler loop (select jobs, "run"
  them, record them finished) for every job of the DAG. A real local run pays this on top of the jobs' own
  work. Stopped after ``--cap`` seconds; the job rate is then extrapolated to the whole DAG;
- ``touch-subsample``: the same with ``--scheduler-subsample 100`` (the scheduler looks at 100 random ready
  jobs per round instead of all of them), also stopped after ``--cap`` seconds;
- ``job``: what every cluster job pays before its command starts. A SLURM job step runs Snakemake again on
  the node (``--mode remote --target-jobs tile:slide_id=<first slide>``, as the executor plugin does), which
  parses the Snakefile, reads the sheet and builds the one job's DAG; measured as a dry run of that call;
- ``real`` and ``real-subsample`` (not run by default): a real local run (``--keep-going``) with the default
  scheduler (ILP when a solver is installed) and with ``--scheduler greedy --scheduler-subsample 100``; the jobs
  run for real on the empty placeholders (a tile job records 'unreadable' in about a second of CPU, the
  expression jobs fail). Stopped after ``--cap`` seconds: they show how many jobs get done and how long one
  job selection takes while jobs compete with the scheduler for the cores.

``--repo DIR`` measures another checkout of wsiomics (its Snakefile, with ``DIR/src`` first on PYTHONPATH), e.g. an
older commit exported with ``git archive``, for before/after numbers on the same machine and sheets.

Each measurement is repeated (best of ``--repeats``; touch, real and real-subsample run once unless
``--repeat-capped``: they are expected to hit the cap), with the 1-minute load average noted next to it, since
the numbers are only as good as the machine is quiet.
Results go to ``<out>/dag.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
TIME = "/usr/bin/time"
SUBSAMPLE = ["--scheduler-subsample", "100"]

# name -> (snakemake arguments, stopped after --cap seconds, prepare tiling outputs first, run once)
VARIANTS: dict[str, tuple[list[str], bool, bool, bool]] = {
    "fresh": (["-n"], False, False, False),
    "resume": (["-n"], False, True, False),
    "touch": (["--touch"], True, False, True),
    "touch-subsample": (["--touch", *SUBSAMPLE], True, False, False),
    "real": (["--keep-going"], True, False, True),
    "real-subsample": (["--keep-going", "--scheduler", "greedy", *SUBSAMPLE], True, False, True),
    "job": (["--allowed-rules", "tile", "--force", "--nolock", "--ignore-incomplete", "--max-inventory-time", "0",
             "--mode", "remote", "-n"], False, False, False),
}
DEFAULT_VARIANTS = "fresh,resume,touch,touch-subsample"


def write_cohort(folder: Path, n_slides: int) -> Path:
    """A sample sheet of ``n_slides`` slides with empty placeholder files for every path (kept if present)."""
    sheet = folder / "samples.tsv"
    if sheet.exists():
        return sheet
    for sub in ("slides", "annotations", "expression"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    lines = ["patient_id\tslide_id\tslide_path\tlabel\tmpp\tannotation_path\texpression_path"]
    files: set[str] = set()
    n, p = 0, 0
    while n < n_slides:
        pid = f"TCGA-BM-{p:05d}"
        label = f"class{p % 4}"
        expression = f"expression/{pid}.rna_seq.augmented_star_gene_counts.tsv" if p % 5 != 4 else ""
        if p % 50 == 49:  # 2% of patients: expression only, no slide
            expression = f"expression/{pid}.rna_seq.augmented_star_gene_counts.tsv"
            lines.append(f"{pid}\t\t\t{label}\t\t\t{expression}")
            files.add(expression)
            p += 1
            continue
        for k in range(1 + (p % 4 == 0)):  # every fourth patient has a second slide
            if n == n_slides:
                break
            sid = f"{pid}-01Z-00-DX{k + 1}"
            slide = f"slides/{sid}.{'svs' if n % 3 else 'tiff'}"
            mpp = "0.25" if n % 20 == 7 else ""
            annotation = f"annotations/{sid}.geojson" if n % 10 == 3 else ""
            files.update(f for f in (slide, annotation, expression) if f)
            lines.append(f"{pid}\t{sid}\t{slide}\t{label}\t{mpp}\t{annotation}\t{expression}")
            n += 1
        p += 1
    for f in files:
        (folder / f).touch()
    sheet.write_text("\n".join(lines) + "\n")
    return sheet


def slide_ids(sheet: Path) -> list[str]:
    rows = [line.split("\t") for line in sheet.read_text().splitlines()[1:]]
    return [r[1] for r in rows if r[1]]


def prepare_resume(work: Path, ids: list[str]) -> None:
    """Every slide's tiling outputs as placeholders (a tiles store folder and a QC picture)."""
    (work / "results" / "tiles").mkdir(parents=True, exist_ok=True)
    (work / "results" / "qc" / "tiles").mkdir(parents=True, exist_ok=True)
    for sid in ids:
        (work / "results" / "tiles" / f"{sid}.zarr").mkdir(exist_ok=True)
        (work / "results" / "qc" / "tiles" / f"{sid}.png").touch()


class LogWatcher(threading.Thread):
    """Copies snakemake's output to a log file and notes when scheduling starts, rounds and finished jobs."""

    def __init__(self, stream, log: Path, t0: float) -> None:
        super().__init__(daemon=True)
        self.stream, self.log, self.t0 = stream, log, t0
        self.jobs: int | None = None  # the `total` line of the job-stats table
        self.first_select: float | None = None
        self.finished = 0
        self.select_s: list[float] = []  # "Select jobs to execute..." -> "Execute N jobs..."
        self._select_at: float | None = None

    def run(self) -> None:
        with open(self.log, "w") as out:
            for line in self.stream:
                now = time.perf_counter() - self.t0
                out.write(line)
                if self.jobs is None and (m := re.match(r"total\s+(\d+)", line)):
                    self.jobs = int(m.group(1))
                elif line.startswith("Select jobs to execute"):
                    self._select_at = now
                    if self.first_select is None:
                        self.first_select = now
                elif line.startswith("Execute ") and self._select_at is not None:
                    self.select_s.append(now - self._select_at)
                    self._select_at = None
                elif line.startswith("Finished jobid"):
                    self.finished += 1


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (a snakemake process this script started, and its jobs)."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def run_measured(cmd: list[str], log: Path, cap: float | None, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` (stopped after ``cap`` seconds if given): wall time, peak RSS, exit status, log facts."""
    use_time = os.access(TIME, os.X_OK) and (cap is None or _has_psutil())
    stats = log.with_suffix(".time")
    full = [TIME, "-v", "-o", str(stats), *cmd] if use_time else cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True, env=env)
    watcher = LogWatcher(proc.stdout, log, t0)
    watcher.start()
    capped = False
    while True:  # wait4 (not Popen.wait) to get the child's own peak RSS when /usr/bin/time is missing
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if cap is not None and time.perf_counter() - t0 > cap and not capped:
            capped = True
            if use_time:  # stop snakemake, not time: time still writes the peak RSS
                import psutil

                for child in psutil.Process(proc.pid).children():
                    _kill_tree(child.pid)
            elif _has_psutil():
                _kill_tree(proc.pid)
            else:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this script started
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    if use_time:
        text = stats.read_text()
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    else:
        rss_kb = usage.ru_maxrss  # kilobytes on Linux
    r = {"rc": proc.returncode, "capped": capped, "wall_s": wall, "peak_rss_mb": rss_kb / 1024,
         "jobs": watcher.jobs, "finished": watcher.finished, "first_select_s": watcher.first_select,
         "select_rounds": len(watcher.select_s),
         "mean_select_s": sum(watcher.select_s) / len(watcher.select_s) if watcher.select_s else None}
    if watcher.finished and watcher.first_select is not None:
        rate = watcher.finished / (wall - watcher.first_select)  # jobs per second once scheduling started
        r.update(jobs_per_s=rate)
        if capped and watcher.jobs:
            r.update(extrapolated_s=watcher.first_select + watcher.jobs / rate)
    return r


def measure(sheet: Path, variant: str, repeats: int, cap: float, scratch: Path, ids: list[str],
            repo: Path = REPO) -> dict:
    args, capped, resume, _ = VARIANTS[variant]
    if variant == "job":
        args = ["--target-jobs", f"tile:slide_id={ids[0]}", *args]
    env = None if repo == REPO else {**os.environ, "PYTHONPATH": str(repo / "src")}
    runs = []
    for i in range(repeats):
        work = scratch / f"work_{variant}_{len(ids)}_{i}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if resume:
            prepare_resume(work, ids)
        cmd = [SNAKEMAKE, "-s", str(repo / "Snakefile"), *args, "--cores", "1" if variant == "job" else "2",
               "--directory", str(work), "--config", f"samples={sheet}"]
        log = scratch / f"{variant}_{len(ids)}_{i}.log"
        load = os.getloadavg()[0]
        r = run_measured(cmd, log, cap if capped else None, env)
        r.update(load_1min=load)
        failed = r["rc"] != 0 and not r["capped"] and not variant.startswith("real")
        if failed:
            sys.exit(f"snakemake failed ({r['rc']}), see {log}:\n{log.read_text()[-3000:]}")
        runs.append(r)
        extra = f", {r['finished']} finished" if "-n" not in args else ""
        if "extrapolated_s" in r:
            extra += f" in the cap ({r['jobs_per_s']:.1f}/s, whole DAG ~{r['extrapolated_s']:.0f} s)"
        if r["mean_select_s"] is not None:
            extra += f", {r['select_rounds']} selections of {r['mean_select_s']:.2f} s"
        print(f"  {variant:15s} {len(ids):6d} slides, run {i + 1}: {r['wall_s']:6.1f} s, {r['peak_rss_mb']:5.0f} MB, "
              f"{r['jobs']} jobs{extra}, load {load:.2f}", file=sys.stderr, flush=True)
        shutil.rmtree(work, ignore_errors=True)
    # Best run: the shortest, or for capped runs the one that got furthest.
    best = min(runs, key=lambda r: (-r["finished"], r["wall_s"]) if capped else r["wall_s"])
    return {"variant": variant, "slides": len(ids), **{k: v for k, v in best.items()},
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": runs}


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import snakemake

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB, Python {platform.python_version()}, "
            f"Snakemake {snakemake.__version__}")


def table(results: list[dict]) -> str:
    out = ["| variant | slides | jobs | wall s | peak RSS MB | vs 1st size: time, RSS | done | load (1 min) |",
           "|---|---|---|---|---|---|---|---|"]
    first: dict[str, dict] = {}
    for r in results:
        base = first.setdefault(r["variant"], r)
        if r.get("capped"):
            done = f"{r['finished']:,} in {r['wall_s']:.0f} s cap, {r.get('jobs_per_s', 0):.1f}/s"
            if "extrapolated_s" in r:
                done += f", all ~{r['extrapolated_s'] / 60:.0f} min"
            wall = f"> {r['wall_s']:.0f}"
        else:
            done = "dry run" if "-n" in VARIANTS[r["variant"]][0] else f"{r['finished']:,}"
            wall = f"{r['wall_s']:.1f}"
        if r["mean_select_s"] is not None:
            done += f"; one job selection {r['mean_select_s']:.2f} s"
        seconds = r.get("extrapolated_s", r["wall_s"]) / base.get("extrapolated_s", base["wall_s"])
        ratio = "" if r is base else f"{seconds:.1f}x, {r['peak_rss_mb'] / base['peak_rss_mb']:.1f}x"
        out.append(f"| {r['variant']} | {r['slides']:,} | {r['jobs'] or 0:,} | {wall} | {r['peak_rss_mb']:.0f} | "
                   f"{ratio} | {done} | {r['load_1min']:.2f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeat-capped", action="store_true", help="repeat touch, real, real-subsample too")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--cap", type=float, default=180.0, help="seconds after which touch/real runs are stopped")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the generated sheets and logs")
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose Snakefile and src/ to measure")
    a = ap.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")

    out = a.out or Path(tempfile.mkdtemp(prefix="wsiomics-bench-dag-"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for size in a.sizes:
            sheet = write_cohort(out / f"cohort_{size}", size)
            ids = slide_ids(sheet)
            for variant in variants:
                repeats = a.repeats if not VARIANTS[variant][3] or a.repeat_capped else 1
                results.append(measure(sheet, variant, repeats, a.cap, out, ids, a.repo.resolve()))
        results.sort(key=lambda r: (variants.index(r["variant"]), r["slides"]))
        report = {"machine": machine(), "sizes": a.sizes, "repeats": a.repeats, "cap_s": a.cap, "results": results}
        (out / "dag.json").write_text(json.dumps(report, indent=1))
        print(f"\nmachine: {machine()}; `snakemake --cores 2`, best of {a.repeats} (touch, real: once)\n")
        print(table(results))
        print(f"\nfull results: {out / 'dag.json'}" if a.keep or a.out else "")
    finally:
        if not a.keep and a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
