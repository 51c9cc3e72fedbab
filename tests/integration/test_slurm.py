"""The SLURM profile (workflow/profiles/slurm) on a real, throw-away SLURM cluster on this machine.

The module fixture brings up a one-node cluster on localhost: Debian's ``slurm-wlm`` and ``munge`` (installed
with apt-get when missing and we are root; otherwise the module is skipped), a munge key and socket, state,
spool and logs in a temporary folder, ``slurmctld -D`` and ``slurmd -D -N localhost`` as child processes in
their own process groups. Teardown always cancels what is left in the queue, stops the daemons (SIGTERM to
the process group, then SIGKILL) and restores ``/etc/slurm/slurm.conf``.

Choices the test makes, and why:

* ``/etc/slurm/slurm.conf`` is written (any existing file is kept aside and put back, also after a run that
  was killed: the file carries a marker and the original a backup copy). The executor plugin's job step runs
  ``srun`` inside the job with a cleaned-up SLURM environment, so ``SLURM_CONF`` alone does not reach it.
* No accounting (no slurmdbd): job status comes from ``squeue`` (``--slurm-status-command squeue``, the same
  advice README gives for such clusters; ``MinJobAge=300`` keeps finished jobs visible to it). With ``sacct``
  the run would wait forever. ``--slurm-no-account`` is passed as README tells users without accounting.
* The profile's ``gpu: 1`` for extract_features is NOT overridden: the node declares one GPU as a generic
  resource backed by ``/dev/null`` (gres.conf), so the exact sbatch line the profile produces
  (``--gpus=1 --cpus-per-gpu=<threads>``) is accepted by a real controller. The encoder runs with
  ``device: cpu`` (SLURM exports CUDA_VISIBLE_DEVICES=0 for the fake GPU; on a machine with a real GPU the
  outputs could otherwise differ from the CPU reference run).
* The node declares the machine's CPUs and memory, but at least 8 CPUs and 17000 MB (``SlurmdParameters=
  config_overrides``; nothing is enforced without cgroups): the profile asks 8000 MB for extraction and twice
  that on a retry, and a request that fits no node is refused by sbatch.
* Status polling is made quick (``--slurm-init-seconds-before-status-checks 2``,
  ``--seconds-between-status-checks 2``), and ``--slurm-keep-successful-logs`` keeps the per-job SLURM logs
  for the assertions. Everything else comes from the profile as users get it.

Every command is a subprocess in its own process group with a timeout; on timeout the group is killed. The
module takes about 70 s on 2 cores (plus about 10 s for apt-get the first time).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
PROFILE = REPO / "workflow" / "profiles" / "slurm"
# The tiny timm CNN of tests/test_workflow.py, on the CPU in both runs so they can be compared exactly.
# slides_per_job: 1: one extract_features job per slide, whose profile resources this module checks by rule name
# (the batch rule extract_features_batch has the same entries in the profile)
FEATURES = "features={encoder: test_resnet, num_workers: 0, batch_size: 32, device: cpu, slides_per_job: 1}"
TRAIN_OFF = "train={run: []}"  # this module is about the profile and the tiling/feature jobs, not training
# Settings of this test cluster (see the module docstring), on top of the profile.
CLUSTER_OPTIONS = (
    "--slurm-status-command", "squeue",
    "--slurm-no-account",
    "--slurm-keep-successful-logs",
    "--slurm-init-seconds-before-status-checks", "2",
    "--seconds-between-status-checks", "2",
)

SLURM_CONF = Path("/etc/slurm/slurm.conf")
BACKUP = SLURM_CONF.with_name("slurm.conf.wsiomics-test-backup")
MARKER = "# Written by wsiomics tests/integration/test_slurm.py; restored when the test ends."
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
PROGRAMS = ("sbatch", "srun", "squeue", "sinfo", "scancel", "scontrol", "slurmctld", "slurmd", "munged")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


##### processes #####


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


def run(cmd: list[str], *, timeout: float, cwd: Path | None = None, env: dict | None = None,
        skip_on_timeout: bool = False) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the group and fail (or skip) with the output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, grace=5.0)
        out, _ = proc.communicate()
        message = f"timed out after {timeout} s: {' '.join(cmd)}\n{(out or '')[-4000:]}"
        if skip_on_timeout:
            pytest.skip(message)
        pytest.fail(message)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def clean_env() -> dict:
    """This environment without SLURM_* variables (the test may itself run inside a SLURM job)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def snakemake(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args], cwd=cwd, timeout=timeout, env=clean_env())


##### the cluster #####


def _program(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def _ensure_slurm_installed() -> None:
    """Install slurm-wlm and munge with apt-get when a program is missing; skip the module when that cannot be."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root: writes /etc/slurm/slurm.conf, runs slurmd (and apt-get when SLURM is missing)")
    if all(_program(p) for p in PROGRAMS):
        return
    missing = [p for p in PROGRAMS if not _program(p)]
    if not shutil.which("apt-get"):
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    proc = run(install, timeout=600, env=env, skip_on_timeout=True)
    if proc.returncode != 0:  # package lists missing or stale: refresh them once
        run(["apt-get", "update"], timeout=300, env=env, skip_on_timeout=True)
        proc = run(install, timeout=600, env=env, skip_on_timeout=True)
    missing = [p for p in PROGRAMS if not _program(p)]
    if proc.returncode != 0 or missing:
        pytest.skip(f"could not install slurm-wlm and munge with apt-get (missing: {missing}): "
                    f"{proc.stdout[-1500:]}")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (all held open together, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _node_resources() -> tuple[int, int]:
    cpus = max(os.cpu_count() or 1, 8)  # the profile asks 8 CPUs per GPU for extract_features
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return cpus, max(int(mem_mb * 0.9), 17000)


def _slurm_conf(tmp: Path) -> str:
    cpus, mem_mb = _node_resources()
    ctld_port, slurmd_port = _free_ports(2)
    return f"""{MARKER}
ClusterName=wsiomicstest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={tmp}/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
MailProg=/bin/true
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmdSpoolDir={tmp}/spool
StateSaveLocation={tmp}/state
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
NodeName=localhost NodeHostname=localhost CPUs={cpus} RealMemory={mem_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _install_conf(text: str) -> None:
    """Write /etc/slurm/slurm.conf, keeping a file that is not ours in BACKUP (put back by _restore_conf)."""
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text(errors="replace") and not BACKUP.exists():
        shutil.copy2(SLURM_CONF, BACKUP)
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(text)


def _restore_conf() -> None:
    if BACKUP.exists():
        shutil.copy2(BACKUP, SLURM_CONF)
        BACKUP.unlink()
    elif SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text(errors="replace"):
        SLURM_CONF.unlink()


def _logs(tmp: Path) -> str:
    parts = []
    for name in ("munged.out", "slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
        if (tmp / name).exists():
            parts.append(f"--- {name}\n{(tmp / name).read_text(errors='replace')[-2000:]}")
    return "\n".join(parts)


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=clean_env())


def _wait_for(check, what: str, tmp: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    pytest.fail(f"the test cluster did not come up: {what}\n{_logs(tmp)}")


def _node_state() -> str:
    proc = run([_program("sinfo"), "-h", "-N", "-o", "%T"], timeout=15, env=clean_env())
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _cancel_all_jobs() -> None:
    """Cancel whatever is still queued or running on the test cluster and give it a moment to end."""
    squeue = [_program("squeue"), "-h", "-o", "%i", "--states=PENDING,RUNNING,CONFIGURING,COMPLETING"]
    ids = run(squeue, timeout=15, env=clean_env()).stdout.split()
    if not ids:
        return
    run([_program("scancel"), *ids], timeout=15, env=clean_env())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and run(squeue, timeout=15, env=clean_env()).stdout.split():
        time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A one-node SLURM cluster on localhost for this module; yields its folder (configs, daemon logs)."""
    _ensure_slurm_installed()
    tmp = Path(tempfile.mkdtemp(prefix="wsiomics-slurm-"))  # short: the munge socket path must stay short
    daemons: list[subprocess.Popen] = []
    conf_written = False
    try:
        tmp.chmod(0o755)
        for sub in ("munge", "state", "spool"):
            (tmp / sub).mkdir(mode=0o755)
        key = tmp / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        conf = _slurm_conf(tmp)
        (tmp / "slurm.conf").write_text(conf)
        (tmp / "gres.conf").write_text("NodeName=localhost Name=gpu File=/dev/null\n")  # a GPU in name only
        _install_conf(conf)
        conf_written = True

        socket_path = tmp / "munge" / "munge.socket"
        daemons.append(_start([_program("munged"), "-F", "--force", f"--socket={socket_path}", f"--key-file={key}",
                               f"--pid-file={tmp}/munge/munged.pid", f"--log-file={tmp}/munge/munged.log",
                               f"--seed-file={tmp}/munge/munged.seed"], tmp / "munged.out"))
        _wait_for(socket_path.exists, "munged socket", tmp)
        daemons.append(_start([_program("slurmctld"), "-D", "-f", str(tmp / "slurm.conf")], tmp / "slurmctld.out"))
        daemons.append(_start([_program("slurmd"), "-D", "-N", "localhost", "-f", str(tmp / "slurm.conf")],
                              tmp / "slurmd.out"))
        _wait_for(lambda: _node_state() == "idle", "node localhost idle in sinfo", tmp)
        yield tmp
    finally:
        try:
            if conf_written and daemons and all(d.poll() is None for d in daemons[:2]):
                _cancel_all_jobs()
        finally:
            for daemon in reversed(daemons):
                _stop(daemon)
            if conf_written:
                _restore_conf()
            shutil.rmtree(tmp, ignore_errors=True)


##### the runs #####


@pytest.fixture(scope="module")
def sheet(tmp_path_factory) -> Path:
    """Two slides of a small synthetic cohort (no faults), in a sheet with absolute paths."""
    out = tmp_path_factory.mktemp("slurm_cohort")
    cmd = [sys.executable, "-m", "wsiomics.synth", "--out", str(out / "cohort"), "--n-patients", "4",
           "--slide-width-um", "2000", "--slide-height-um", "1500", "--n-genes", "50", "--workers", "2",
           "--no-faults"]
    proc = run(cmd, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    cohort = pd.read_csv(out / "cohort" / "samples.tsv", sep="\t", keep_default_na=False)
    two = cohort[cohort.slide_id != ""].drop_duplicates("patient_id").head(2)
    rows = pd.DataFrame({"patient_id": two.patient_id, "slide_id": two.slide_id,
                         "slide_path": [str(out / "cohort" / p) for p in two.slide_path]})
    rows.to_csv(out / "samples.tsv", sep="\t", index=False)
    return out / "samples.tsv"


def slide_ids(sheet: Path) -> list[str]:
    return pd.read_csv(sheet, sep="\t").slide_id.tolist()


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, sheet, tmp_path_factory) -> tuple[Path, str]:
    """`--until extract_features` through the SLURM profile: tile + extract_features for both slides."""
    work = tmp_path_factory.mktemp("slurm_work")
    proc = snakemake("--workflow-profile", str(PROFILE), *CLUSTER_OPTIONS, "--verbose", "--directory", str(work),
                     "--config", f"samples={sheet}", FEATURES, TRAIN_OFF, "--until", "extract_features",
                     cwd=work.parent)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{_logs(slurm_cluster)}"
    return work, proc.stdout


@pytest.fixture(scope="module")
def local_run(sheet, tmp_path_factory) -> Path:
    """The same jobs run locally, asked for by their target files."""
    work = tmp_path_factory.mktemp("local_work")
    targets = [f"results/features/test_resnet/{s}.zarr" for s in slide_ids(sheet)]
    proc = snakemake(*targets, "--cores", "2", "--directory", str(work), "--config", f"samples={sheet}", FEATURES,
                     TRAIN_OFF, cwd=work.parent)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return work


SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.$", re.M)


def submissions(out: str) -> dict[str, tuple[str, Path]]:
    """SLURM job id -> (rule, SLURM log file) for every job the plugin submitted."""
    found = {}
    for _, slurm_id, log in SUBMITTED.findall(out):
        rule = re.search(r"/rule_([A-Za-z_]+)/", log).group(1)
        found[slurm_id] = (rule, Path(log))
    return found


def sbatch_calls(out: str, rule: str) -> list[str]:
    return [line for line in out.splitlines()
            if line.startswith("sbatch call: ") and f"--comment rule_{rule}_wildcards_" in line]


##### tests #####


def test_jobs_went_through_slurm(slurm_run, slurm_cluster, sheet):
    """Four sbatch submissions; the controller itself lists them COMPLETED under this run's job name, and
    each job's SLURM log shows the job step Snakemake (``--executor slurm-jobstep``) running that rule."""
    work, out = slurm_run
    run_id = re.search(r"^SLURM run ID: (\S+)$", out, re.M).group(1)
    jobs = submissions(out)
    assert sorted(rule for rule, _ in jobs.values()) == ["extract_features"] * 2 + ["tile"] * 2, out[-3000:]

    squeue = run([_program("squeue"), "-h", "--states=all", "--name", run_id, "-o", "%i|%T"], timeout=15,
                 env=clean_env())
    assert squeue.returncode == 0, squeue.stdout
    states = dict(line.split("|") for line in squeue.stdout.split())
    assert states == {slurm_id: "COMPLETED" for slurm_id in jobs}

    for slurm_id, (rule, log) in jobs.items():
        assert log.name == f"{slurm_id}.log" and log.is_relative_to(work / ".snakemake" / "slurm_logs")
        text = log.read_text()
        assert "--executor slurm-jobstep" in text and f"Finished jobid: 0 (Rule: {rule})" in text, text[-3000:]
    for slide_id in slide_ids(sheet):
        assert (work / "results" / "features" / "test_resnet" / f"{slide_id}.zarr" / "zarr.json").is_file()


def test_profile_resources_reach_sbatch(slurm_run):
    """The profile's per-rule resources become sbatch options, and the controller granted the GPU."""
    _, out = slurm_run
    extract = sbatch_calls(out, "extract_features")
    tile = sbatch_calls(out, "tile")
    assert len(extract) == 2 and len(tile) == 2
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    threads = profile["set-threads"]["extract_features"]  # the profile's threads for GPU extraction
    for call in extract:
        assert all(opt in call.split() for opt in ("--gpus=1", f"--cpus-per-gpu={threads}", "--mem", "8000", "-t",
                                                   "120"))
        assert "-A" not in call.split()
    for call in tile:
        assert all(opt in call.split() for opt in ("--cpus-per-task=1", "--mem", "4000", "-t", "30"))
    slurm_id = next(i for i, (rule, _) in submissions(out).items() if rule == "extract_features")
    job = run([_program("scontrol"), "show", "job", slurm_id], timeout=15, env=clean_env()).stdout
    assert "TresPerJob=gres:gpu:1" in job.split() and f"CpusPerTres=gres:gpu:{threads}" in job.split(), job


def test_outputs_equal_a_local_run(slurm_run, local_run, sheet):
    import zarr

    work, _ = slurm_run
    for slide_id in slide_ids(sheet):
        tiles = [zarr.open_group(str(w / "results" / "tiles" / f"{slide_id}.zarr"), mode="r")
                 for w in (work, local_run)]
        assert tiles[0].attrs["status"] == tiles[1].attrs["status"] == "ok"
        np.testing.assert_array_equal(tiles[0]["coords"][...], tiles[1]["coords"][...])
        stores = [zarr.open_group(str(w / "results" / "features" / "test_resnet" / f"{slide_id}.zarr"), mode="r")
                  for w in (work, local_run)]
        assert all(s.attrs["complete"] and s.attrs["device"] == "cpu" for s in stores)
        assert stores[0]["features"].shape[0] > 0
        np.testing.assert_array_equal(stores[0]["coords"][...], stores[1]["coords"][...])
        np.testing.assert_array_equal(stores[0]["features"][...], stores[1]["features"][...])


def test_until_and_target_file_dry_runs_then_local_rules(slurm_run, sheet):
    """Afterwards `--until extract_features` and a single target file have nothing to do; the default target
    then adds the profile's local jobs (all, slide_status), which run on the submit host, and the figures job."""
    work, _ = slurm_run
    common = ("--workflow-profile", str(PROFILE), *CLUSTER_OPTIONS, "--directory", str(work), "--config",
              f"samples={sheet}", FEATURES, TRAIN_OFF)
    target = f"results/features/test_resnet/{slide_ids(sheet)[0]}.zarr"
    for extra in (("-n", "--until", "extract_features"), ("-n", target)):
        proc = snakemake(*common, *extra, cwd=work.parent, timeout=120)
        nothing = "Nothing to be done" in proc.stdout or re.search(r"^total\s+0$", proc.stdout, re.M)
        assert proc.returncode == 0 and nothing, proc.stdout[-3000:]
    proc = snakemake(*common, cwd=work.parent, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "localrule slide_status:" in proc.stdout and "localrule all:" in proc.stdout
    # the figures job (it reads the slides for its maps) is the only one that goes to SLURM
    submitted = set(re.findall(r"\.snakemake/slurm_logs/rule_(\w+)/", proc.stdout))
    assert submitted <= {"figures"}, submitted
    status = pd.read_csv(work / "results" / "qc" / "slide_status.tsv", sep="\t")
    assert sorted(status.slide_id) == sorted(slide_ids(sheet)) and status.status.eq("ok").all()


##### the training rules through the profile (a dry run: no cluster needed) #####


class _Resources(dict):
    """What the plugin reads of a job's resources: ``.get(name)`` and ``.name``."""

    __getattr__ = dict.__getitem__


def training_sbatch(sheet: Path, work: Path, attempt: int) -> dict[tuple[str, str], list[str]]:
    """(rule, method) -> the sbatch options the SLURM plugin builds for that training job (fold 0) from the
    resources a dry run through the profile evaluates at ``attempt``."""
    proc = snakemake("--workflow-profile", str(PROFILE), "-n", "--cores", "8", "--attempt", str(attempt),
                     "--directory", str(work), "--config", f"samples={sheet}", "splits={n_folds: 2}",
                     "train={run: [linear, cca, gimp, image_seg], threads: 3}", cwd=work.parent, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": "",
              "workdir": str(work)}
    calls = {}
    for block in re.split(r"\n(?=(?:local)?rule )", proc.stdout):
        head = re.match(r"rule (pretrain|finetune|finetune_segmentation):", block)
        wildcards = re.search(r"wildcards: method=(\w+), fold=0\b", block)
        if not (head and wildcards):
            continue
        found = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", block).group(1)))
        resources = _Resources({k: int(v) if v.isdigit() else v for k, v in found.items()})
        job = SimpleNamespace(resources=resources, threads=3)
        calls[(head.group(1), wildcards.group(1))] = (get_submit_command(job, params) + set_gres_string(job)).split()
    return calls


def test_profile_gives_training_jobs_a_gpu_only_when_they_use_one(tmp_path_factory):
    """The profile's training entries as sbatch options: the deep methods get a GPU and their threads per GPU,
    the scikit-learn ones (linear, cca) no GPU and their threads per task; memory and time double on the
    retry. Uses the full synthetic sheet (labels, expression, annotations) so every kind of method runs."""
    cohort = tmp_path_factory.mktemp("slurm_train") / "cohort"
    proc = run([sys.executable, "-m", "wsiomics.synth", "--out", str(cohort), "--n-patients", "6", "--slide-width-um",
                "1500", "--slide-height-um", "1000", "--n-genes", "50", "--workers", "2", "--no-faults"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    first = training_sbatch(cohort / "samples.tsv", cohort.parent / "work1", attempt=1)
    assert set(first) == {("finetune", "linear"), ("finetune", "cca"), ("pretrain", "gimp"), ("finetune", "gimp"),
                          ("finetune_segmentation", "image_seg")}, set(first)
    for key, call in first.items():
        gpu = key[1] not in ("linear", "cca")
        assert ("--gpus=1" in call) == gpu and not [o for o in call if o.startswith("--gres")], (key, call)
        assert ("--cpus-per-gpu=3" if gpu else "--cpus-per-task=3") in call, (key, call)
        assert call[call.index("--mem") + 1] == "16000" and call[call.index("-t") + 1] == "240", (key, call)
    second = training_sbatch(cohort / "samples.tsv", cohort.parent / "work2", attempt=2)
    for key, call in second.items():
        assert call[call.index("--mem") + 1] == "32000" and call[call.index("-t") + 1] == "480", (key, call)
