"""GPU smoke check: one command that settles, on the first GPU machine, what the CPU tests cannot.

    python bench/gpu_check.py [--budget-s 480] [--parts abcde] [--device cuda] [--out DIR]

Prints one ``PASS`` / ``FAIL`` / ``SKIP`` line per check, ``(a)`` to ``(e)``, each with its numbers, and exits
1 when any check failed (0 otherwise). Nothing is downloaded: slides, tiles, features and cohorts are
generated here (wsiomics.synth, the test suite's store helpers), encoders have random weights.

(a) environment: torch, its CUDA, the driver, the GPU and its compute capability, /dev/shm, which Mamba
    scan runs; a job given a GPU that cannot use it fails here with the fix (wsiomics.devices).
(b) the extraction tests (tests/test_features.py) on CUDA (``device: auto`` takes the GPU).
(c) a generated slide through ResNet-50-trunc (fp16) and ViT-S (bf16), workers auto, batch 128: features
    against a CPU fp32 forward of the same tiles (cosine >= 0.99), patches/s against the encoder's own
    forward rate on the same batches, 1 vs 7 tile readers (threads 1 vs 8), and a forced out-of-memory
    halving (same features, half the batch used).
(d) the pure-PyTorch selective scan on CUDA against the sequential reference, in fp32 and under bf16
    autocast, with gradients; the mamba_ssm kernel against it when installed; the scan's time at 16k tokens
    with the GPU and the CPU chunk/segment sizes.
(e) gimp and mgi pretrained and fine-tuned for 2 epochs on a tiny fold on CUDA: a job killed after its
    first epoch resumes, CUDA predictions against CPU ones, the CUDA model loaded in a CPU-only process.

Without CUDA every CUDA part is a SKIP with the reason (the test suite runs it that way);
``--device cpu`` runs the same checks on the CPU at small sizes, to check this script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # training's progress bars would share lines with the results
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # the test suite's store helpers (test_datasets)

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


def report(status: str, item: str, detail: str) -> None:
    RESULTS.append((status, item, detail))
    print(f"{status} ({item}) {detail}", flush=True)


class Skip(Exception):
    """A check that cannot run here; its message is the reason."""


def _cuda_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no usable CUDA device (torch.cuda.is_available() is False)"
    return None


# ---------------------------------------------------------------------------------------------- (a)
def check_environment(device: torch.device) -> None:
    from wsiomics import devices
    from wsiomics.models.mamba import scan_backend

    driver, gpus = devices.driver_report()
    shm = "absent"
    try:
        import shutil

        usage = shutil.disk_usage(devices.SHM)
        shm = f"{usage.total / 2**20:,.0f} MB ({usage.free / 2**20:,.0f} MB free)"
    except OSError:
        pass
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})",
             f"driver {driver or 'none'}", f"/dev/shm {shm}", f"cpus {len(os.sched_getaffinity(0))}"]
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        free, total = torch.cuda.mem_get_info(i)
        parts += [f"GPU {torch.cuda.get_device_name(i)}", f"capability {cap[0]}.{cap[1]} (needs >= "
                  f"{'.'.join(map(str, devices.min_capability()))})", f"memory {total / 2**30:.0f} GiB"]
    else:
        parts.append(f"GPU none usable (driver lists: {', '.join(gpus) or 'none'})")
    parts.append(f"scan on cpu: {scan_backend('cpu')}")
    if torch.cuda.is_available():
        parts.append(f"scan on cuda: {scan_backend('cuda')}")
    try:  # what a job would do with this environment
        chosen = devices.resolve_device("auto", key="device")
        parts.append(f"device auto -> {chosen}")
        report("PASS", "a", "; ".join(parts))
    except RuntimeError as e:
        report("FAIL", "a", "; ".join(parts) + f"; device auto fails: {e}")


# ---------------------------------------------------------------------------------------------- (b)
def check_tests(device: torch.device, budget_s: float) -> None:
    if device.type != "cuda":
        raise Skip("the extraction tests run on the CPU in the suite already")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_features.py")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=max(30.0, budget_s))
    tail = (run.stdout.strip().splitlines() or [""])[-1]
    status = "PASS" if run.returncode == 0 else "FAIL"
    report(status, "b", f"tests/test_features.py on CUDA: {tail} ({time.perf_counter() - started:.0f} s)")
    if run.returncode:
        print(run.stdout[-4000:], run.stderr[-2000:], sep="\n")


# ---------------------------------------------------------------------------------------------- (c)
def _slide(folder: Path, small: bool) -> Path:
    from wsiomics.synth.geometry import random_layout, scale_to_pixels
    from wsiomics.synth.pyramid import write_slide
    from wsiomics.tiling import tile_slide

    size = (2800.0, 2100.0) if small else (8000.0, 6000.0)
    geom = scale_to_pixels(random_layout(5, *size), 0.5, tissue_type=1)
    path = write_slide(folder / "slide.svs", geom, 5, fmt="svs")
    tiles = folder / "slide_tiles.zarr"
    tile_slide(path, "slide", tiles, folder / "slide_tiles.png")
    return tiles


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).min())


def check_extraction(device: torch.device, work: Path, small: bool) -> None:
    from wsiomics.encoders import build_encoder
    from wsiomics.features import extract as ex
    from wsiomics.features.tiles import TileBatches, TileGeometry
    from wsiomics.io import open_store

    tiles = _slide(work, small)
    attrs = dict(open_store(tiles).attrs)
    coords = np.asarray(open_store(tiles)["coords"][...])
    n_ref = min(len(coords), 64 if small else 256)
    lines, ok = [f"{len(coords)} tiles"], True
    for name, precision in (("resnet50_trunc", "fp16"), ("vit_small", "bf16")):
        encoder = build_encoder(name, pretrained=False, seed=0)
        geometry = TileGeometry(int(attrs["read_level"]), int(attrs["read_size"]), encoder.preset.input_size,
                                encoder.preset.interpolation)
        batch = 32 if small else 128
        params = ex.ExtractParams(batch_size=str(batch), num_workers="auto", precision=precision,
                                  device=str(device), dtype="float32")
        out = work / f"{name}.zarr"
        ex.extract_slide(tiles, out, encoder, params, force=True, progress=False)
        store = open_store(out)
        feats, timings = np.asarray(store["features"][...]), dict(store.attrs)["timings"]
        # the reference: the same tiles, CPU fp32 forward
        batches = TileBatches(attrs["slide_path"], coords[:n_ref], geometry, batch)
        cpu = ex.Encoding(encoder, torch.device("cpu"), "fp32", False, batch)
        ref = np.concatenate([cpu(batches[i]).numpy() for i in range(len(batches))])
        cos = _cosine(feats[:n_ref], ref)
        ok &= cos >= 0.99
        # the encoder's own rate on the same batches, tiles already on the device
        on_device = [batches[i].to(device) for i in range(len(batches))]
        enc = ex.Encoding(encoder, device, precision, True, batch)
        enc(on_device[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        for _ in range(3):
            for b in on_device:
                done += len(enc(b))
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_rate = done / (time.perf_counter() - t0)
        rates = {}
        for readers in (1, 7):
            p = ex.ExtractParams(**{**params.__dict__, "num_workers": str(readers)})
            ex.extract_slide(tiles, work / f"{name}_{readers}.zarr", encoder, p, force=True, progress=False)
            t = dict(open_store(work / f"{name}_{readers}.zarr").attrs)["timings"]
            rates[readers] = (t["patches_per_s"], t["wait_for_tiles_s"])
        lines.append(f"{name} {precision}: min cosine vs CPU fp32 {cos:.4f} over {n_ref} tiles; pipeline "
                     f"{timings['patches_per_s']:.0f} patches/s ({timings['num_workers']} readers, waited "
                     f"{timings['wait_for_tiles_s']:.1f} s) vs forward {forward_rate:.0f} "
                     f"({timings['patches_per_s'] / forward_rate:.2f}); 1 reader {rates[1][0]:.0f}/s (waited "
                     f"{rates[1][1]:.1f} s), 7 readers {rates[7][0]:.0f}/s (waited {rates[7][1]:.1f} s)")
    # forced out-of-memory: the first forward at the full batch fails, the batch halves, the features stay
    encoder = build_encoder("resnet50_trunc", pretrained=False, seed=0)
    real_run, calls = ex.Encoding._run, {"n": 0}

    def oom_once(self, x):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (forced by gpu_check)")
        return real_run(self, x)

    ex.Encoding._run = oom_once
    try:
        params = ex.ExtractParams(batch_size="128", num_workers="auto", precision="fp16", device=str(device),
                                  dtype="float32")
        ex.extract_slide(tiles, work / "oom.zarr", encoder, params, force=True, progress=False)
    finally:
        ex.Encoding._run = real_run
    oom = open_store(work / "oom.zarr")
    used = dict(oom.attrs)["timings"]["batch_size_used"]
    normal = np.asarray(open_store(work / "resnet50_trunc.zarr")["features"][...])
    cos = _cosine(np.asarray(oom["features"][...]), normal)
    expected = min(128, len(coords)) // 2  # the first forward (a whole batch, or the whole slide) halved
    ok &= used == expected and cos >= 0.999
    lines.append(f"forced OOM at {min(128, len(coords))}: batch {used} used (expected {expected}), cosine to the "
                 f"normal run {cos:.5f}")
    report("PASS" if ok else "FAIL", "c", "; ".join(lines))


# ---------------------------------------------------------------------------------------------- (d)
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def check_scan(device: torch.device, small: bool) -> None:
    from wsiomics.models import mamba as mm

    g = torch.Generator().manual_seed(0)
    batch, dim, n, length = 2, 32, 8, (300 if small else 2048)

    def inputs():
        t = {"u": torch.randn(batch, dim, length, generator=g), "delta": torch.randn(batch, dim, length, generator=g),
             "A": -torch.rand(dim, n, generator=g) * 3, "B": torch.randn(batch, n, length, generator=g),
             "C": torch.randn(batch, n, length, generator=g), "D": torch.randn(dim, generator=g),
             "z": torch.randn(batch, dim, length, generator=g), "delta_bias": torch.randn(dim, generator=g) * 0.5}
        return {k: v.to(device).requires_grad_() for k, v in t.items()}

    def run(fn, x, autocast=False, **kw):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = fn(**x, delta_softplus=True, **kw)
        out.float().square().mean().backward()
        grads = [x[k].grad.clone() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        for v in x.values():
            v.grad = None
        return out.detach(), grads

    x = inputs()
    ref, ref_g = run(mm.selective_scan_ref, x)
    zeros = torch.zeros(batch, dim, n, device=device)  # an initial state forces the pure-PyTorch scan
    for autocast, label in ((False, "fp32"), (True, "bf16 autocast")):
        out, grads = run(mm.selective_scan, x, autocast, initial_state=zeros)
        err = max([_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, ref_g, strict=True)])
        report("PASS" if err < 1e-3 else "FAIL", "d", f"pure-PyTorch scan on {device} ({label}) vs reference, "
               f"L={length}: max relative error over output and 8 gradients {err:.2e}")
    backend = mm.scan_backend(device)
    if device.type == "cuda" and backend.startswith("mamba_ssm"):
        out, grads = run(mm.selective_scan, x)
        err = max([_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, ref_g, strict=True)])
        report("PASS" if err < 1e-2 else "FAIL", "d", f"{backend} vs reference: max relative error {err:.2e}")
    else:
        report("SKIP", "d", f"mamba_ssm kernel: {backend}")
    # time at 16k tokens (d_inner 256, d_state 16): this device's default sizes against the CPU-tuned ones
    L = 2048 if small else 16384
    big = {"u": torch.randn(1, 256, L), "delta": torch.randn(1, 256, L), "A": -torch.rand(256, 16),
           "B": torch.randn(1, 16, L), "C": torch.randn(1, 16, L), "D": torch.randn(256),
           "z": torch.randn(1, 256, L), "delta_bias": torch.randn(256)}
    big = {k: v.to(device).requires_grad_() for k, v in big.items()}
    sizes = mm.scan_sizes(device, 1, 256, 16)
    times = {}
    for label, (T, S) in (("default", sizes), ("cpu-sizes", (mm.CHUNK_SIZE, mm.SEGMENT_SIZE))):
        best = float("inf")
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            mm.selective_scan(**big, delta_softplus=True, chunk_size=T, segment_size=S,
                              initial_state=torch.zeros(1, 256, 16, device=device)).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        times[label] = best
    report("PASS", "d", f"scan forward+backward at L={L:,} on {device}: sizes {sizes} {times['default'] * 1e3:.0f} ms, "
           f"CPU sizes ({mm.CHUNK_SIZE}, {mm.SEGMENT_SIZE}) {times['cpu-sizes'] * 1e3:.0f} ms")


# ---------------------------------------------------------------------------------------------- (e)
N_GENES = 12
TRAIN_CFG = {
    "seed": 0, "device": "cpu", "threads": 2, "num_workers": 0,
    "data": {"batch_size": 4, "max_tokens": 12, "crop": "window", "cache_mb": 64},
    "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0, "n_groups": 4,
              "gene_grouping": "contiguous", "fusion_dim": 16, "head": "linear", "mask_length": 4,
              "decoder_depth": 1, "triplet_margin": 0.3, "triplet_weight": 1.0, "positives": "label",
              "use_mpm": True, "use_triplet": True},
    "pretrain": {"epochs": 2, "lr": 3e-3, "encoder_lr_scale": 1.0, "weight_decay": 0.0, "warmup_epochs": 1,
                 "min_lr_ratio": 0.1, "grad_clip": 1.0, "patience": 0, "min_epochs": 1, "label_smoothing": 0.0},
    "finetune": {"epochs": 2, "lr": 1e-2, "encoder_lr_scale": 0.5, "weight_decay": 0.0, "warmup_epochs": 1,
                 "min_lr_ratio": 0.1, "grad_clip": 1.0, "patience": 0, "min_epochs": 1, "label_smoothing": 0.0},
    "methods": {},
}


def write_cohort(root: Path) -> None:
    """16 patients on disk (features stores, expression, folds), the label a shift in both modalities."""
    import anndata as ad
    import pandas as pd
    from test_datasets import grid_coords, write_store

    rng = np.random.default_rng(0)
    slides, expr_ids, expr_rows, rows = [], [], [], []
    roles = ["train"] * 9 + ["val"] * 3 + ["test"] * 4
    for i in range(16):
        pid, label = f"P{i:02d}", "ab"[i % 2]
        shift = 1.5 if label == "b" else -1.5
        rows.append({"patient_id": pid, "fold": 0, "role": roles[(i * 7) % 16], "label": label})
        sid = f"{pid}-S0"
        slides.append({"patient_id": pid, "slide_id": sid})
        coords = grid_coords(5, 4, 224)
        write_store(root / "features" / f"{sid}.zarr", coords, rng.normal(size=(len(coords), 6)) + shift, 224.0)
        genes = rng.normal(size=N_GENES)
        genes[:3] += shift
        expr_ids.append(pid)
        expr_rows.append(genes)
    pd.DataFrame(rows).to_csv(root / "folds.tsv", sep="\t", index=False)
    pd.DataFrame(slides).to_csv(root / "slides.tsv", sep="\t", index=False)
    ad.AnnData(X=np.array(expr_rows, np.float32), obs=pd.DataFrame(index=expr_ids),
               var=pd.DataFrame(index=[f"G{j}" for j in range(N_GENES)])).write_zarr(root / "fold0.zarr")


def _fold(root: Path):
    import pandas as pd

    from wsiomics.datasets import load_fold

    return load_fold(pd.read_csv(root / "folds.tsv", sep="\t"), 0, pd.read_csv(root / "slides.tsv", sep="\t"),
                     root / "features", root / "fold0.zarr")


def train(root: Path, method: str, device: str, out: Path, kill_after_first_epoch: bool = False) -> dict:
    """Pretrain and fine-tune ``method`` on the cohort at ``root``; with ``kill_after_first_epoch`` the process
    SIGKILLs itself as soon as the fine-tuning's first epoch is saved (a pre-empted job)."""
    from wsiomics.train import loop
    from wsiomics.train.methods import method_config
    from wsiomics.train.stages import finetune, pretrain

    cfg = method_config({**TRAIN_CFG, "device": device}, method)
    data = _fold(root)
    if not (out / "pretrain" / "model.pt").exists():  # a resumed job keeps its finished pretraining (as Snakemake)
        pretrain(method, cfg, data, out)
    if kill_after_first_epoch:
        real = loop._save_state

        def save_then_die(path, state, *a, **k):
            real(path, state, *a, **k)
            if "finetune" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)

        loop._save_state = save_then_die
    return finetune(method, cfg, data, out, pretrained=out / "pretrain" / "model.pt")


def predict_on_cpu(root: Path, method: str, model_path: Path) -> list[list[float]]:
    """The test patients' probabilities from a saved model, in a process that has no CUDA."""
    from wsiomics.train import evaluate as ev
    from wsiomics.train.build import build_model
    from wsiomics.train.loop import load_model_state
    from wsiomics.train.methods import get_method, method_config
    from wsiomics.train.roles import EVAL_ROLES
    from wsiomics.train.stages import data_params

    assert not torch.cuda.is_available(), "this process was meant to have no CUDA"
    cfg = method_config(TRAIN_CFG, method)
    data = _fold(root)
    model = build_model(get_method(method), cfg, data)
    model.load_state_dict(load_model_state(model_path)["model"])
    results = ev.run_model(model, data, EVAL_ROLES, torch.device("cpu"), data_params(cfg, 0))
    table = ev.predictions_table(results, 0, data.classes)
    return table[[c for c in table.columns if c.startswith("prob_")]].to_numpy().tolist()


def _probs(path: Path) -> np.ndarray:
    import pandas as pd

    table = pd.read_csv(path, sep="\t")
    return table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()


def _child(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def check_training(device: torch.device, work: Path) -> None:
    root = work / "cohort"
    write_cohort(root)
    for method in ("gimp", "mgi"):
        dev_out, cpu_out = work / f"{method}_{device.type}", work / f"{method}_cpu_ref"
        t0 = time.perf_counter()
        info = train(root, method, str(device), dev_out)
        seconds = time.perf_counter() - t0
        train(root, method, "cpu", cpu_out)
        diff = float(np.abs(_probs(dev_out / "predictions.tsv") - _probs(cpu_out / "predictions.tsv")).max())
        # kill after the first fine-tuning epoch, then the same command again: it resumes
        killed = work / f"{method}_killed"
        run = _child("train", str(root), method, str(device), str(killed), "kill")
        resumed_ok = run.returncode == -signal.SIGKILL and any((killed / ".state").glob("finetune*.pt"))
        run2 = _child("train", str(root), method, str(device), str(killed), "")
        resumed_ok &= run2.returncode == 0 and "resuming after epoch 1" in run2.stderr
        resume_diff = (float(np.abs(_probs(killed / "predictions.tsv") - _probs(dev_out / "predictions.tsv")).max())
                       if (killed / "predictions.tsv").exists() else float("nan"))
        # the model trained on the device, loaded in a process without CUDA
        load = _child("predict", str(root), method, str(dev_out / "model.pt"), env={"CUDA_VISIBLE_DEVICES": ""})
        cpu_diff = float("nan")
        if load.returncode == 0:
            cpu_diff = float(np.abs(np.array(json.loads(load.stdout.strip().splitlines()[-1]))
                                    - _probs(dev_out / "predictions.tsv")).max())
        ok = diff <= 0.1 and resumed_ok and resume_diff <= 0.1 and cpu_diff <= 1e-2
        report("PASS" if ok else "FAIL", "e",
               f"{method} on {device}: pretrain + fine-tune 2 epochs each in {seconds:.1f} s ({info['epochs']} "
               f"fine-tuning epochs); test probabilities vs CPU training max |diff| {diff:.3f}; killed after "
               f"epoch 1 and resumed: {'yes' if resumed_ok else 'NO'} (max |diff| to the uninterrupted run "
               f"{resume_diff:.3f}); loaded in a CPU-only process: max |diff| {cpu_diff:.2e}")
        if not ok:
            print(run.stderr[-1500:], run2.stderr[-1500:], load.stderr[-1500:], sep="\n")
    report("SKIP", "e", "image_seg: needs tumour annotations of generated slides; not in this check yet")


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=480.0, help="parts not started by then are skipped")
    p.add_argument("--parts", default="abcde", help="which parts to run (default: all)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check this script")
    p.add_argument("--out", type=Path, default=None, help="keep the work files here (default: a temp folder)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        kind, root, method = a.child[0], Path(a.child[1]), a.child[2]
        if kind == "train":
            train(root, method, a.child[3], Path(a.child[4]), kill_after_first_epoch=a.child[5:] == ["kill"])
        else:
            print(json.dumps(predict_on_cpu(root, method, Path(a.child[3]))))
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    device = torch.device(a.device)
    small = device.type == "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        work = a.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        steps = [("a", lambda: check_environment(device)),
                 ("b", lambda: check_tests(device, a.budget_s - (time.perf_counter() - started))),
                 ("c", lambda: check_extraction(device, work / "c", small)),
                 ("d", lambda: check_scan(device, small)),
                 ("e", lambda: check_training(device, work / "e"))]
        for item, step in steps:
            if item not in a.parts:
                continue
            reason = _cuda_reason(device) if item != "a" else None
            spent = time.perf_counter() - started
            if reason is None and spent > a.budget_s:
                reason = f"time budget of {a.budget_s:.0f} s spent ({spent:.0f} s)"
            if reason is not None:
                report("SKIP", item, reason)
                continue
            (work / item).mkdir(exist_ok=True)
            try:
                step()
            except Skip as e:
                report("SKIP", item, str(e))
            except Exception as e:  # noqa: BLE001 - a crash is this check's FAIL, and the others still run
                traceback.print_exc()
                report("FAIL", item, f"{type(e).__name__}: {e}")
    failed = sum(s == "FAIL" for s, _, _ in RESULTS)
    print(f"gpu_check: {sum(s == 'PASS' for s, _, _ in RESULTS)} passed, {failed} failed, "
          f"{sum(s == 'SKIP' for s, _, _ in RESULTS)} skipped in {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
