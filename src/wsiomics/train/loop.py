"""The one training loop: AdamW, warm-up + cosine, clipping, early stopping on ``val``, atomic resumable checkpoints.

Every method trains through :func:`fit` with its own objective (a function of model, batch and a
torch generator returning named loss tensors, ``loss`` first). An objective returns a ``loss`` that does
not require grad when no sample of the batch contributes (no labelled patient, no valid triplet, fewer
than two InfoNCE pairs): that batch is skipped, with no optimiser step (AdamW would apply weight decay
and its stale momentum to a zero gradient) and no share in the epoch's mean loss; the learning-rate
schedule still advances, so it stays a function of the batch count. After each epoch the whole state
(model, optimiser, schedule, RNG states, early-stopping bookkeeping, history) is written atomically, so a
killed job resumes from its last finished epoch and, on CPU, continues bit-identically: data order and
crops are drawn from (seed, epoch), masks from a generator whose state is checkpointed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from wsiomics import devices
from wsiomics.io import atomic_path
from wsiomics.models.batch import Batch
from wsiomics.train.fingerprint import state_key_config
from wsiomics.train.optim import param_groups

log = logging.getLogger(__name__)

Objective = Callable[[torch.nn.Module, Batch, torch.Generator], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class OptimParams:
    epochs: int = 30
    lr: float = 1e-3
    encoder_lr_scale: float = 1.0  # encoders' learning rate = lr * this (fine-tuning: < 1)
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.01  # cosine floor, as a share of lr
    grad_clip: float = 1.0  # max gradient norm (0: off)
    patience: int = 10  # epochs without val improvement before stopping (0: never stop early)
    min_epochs: int = 5  # no early stop before this many epochs


def resolve_device(spec: str) -> torch.device:
    return devices.resolve_device(spec, key="train.device")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (deterministic, and small models gain nothing there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _param_groups(model: torch.nn.Module, params: OptimParams) -> list[dict]:
    return param_groups(model, params.lr, params.weight_decay, params.encoder_lr_scale)


def _schedule(optimizer: torch.optim.Optimizer, params: OptimParams, steps_per_epoch: int):
    total = max(1, params.epochs * steps_per_epoch)
    warmup = int(round(params.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return params.min_lr_ratio + (1 - params.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _advance(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One schedule step for a skipped batch (torch warns when that precedes the first optimiser step)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    stopped_early: bool


def _mean_losses(model: torch.nn.Module, objective: Objective, loader: Iterable[Batch], device: torch.device,
                 seed: int) -> dict[str, float]:
    """Mean of each named loss over a loader, in eval mode, with fixed masks (same every epoch)."""
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums: dict[str, float] = {}
    n = 0
    with torch.no_grad(), autocast(device):
        for batch in loader:
            losses = objective(model, batch.to(device), gen)
            k = len(batch)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value) * k
            n += k
    return {name: s / max(1, n) for name, s in sums.items()}


def fit(model: torch.nn.Module, objective: Objective, train_loader, val_loader, params: OptimParams,
        state_path: str | Path, config: dict[str, Any], device: torch.device, seed: int,
        desc: str = "train") -> FitResult:
    """Train ``model`` in place; on return it holds the best-on-val weights (or the last, without val).

    ``config`` is what a saved state must have been computed from to be resumed: the method's settings
    plus the data's fingerprint (:func:`wsiomics.train.fingerprint.data_fingerprint`); execution-only
    settings (threads, workers, device) are left out of the key, so a resubmitted job resumes."""
    state_path = Path(state_path)
    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, params), weight_decay=params.weight_decay)
    scheduler = _schedule(optimizer, params, len(train_loader))
    digest = config_digest({"config": state_key_config(config), "optim": asdict(params)})
    gen = torch.Generator(device="cpu").manual_seed(seed)
    history: list[dict[str, float]] = []
    best = {"epoch": -1, "value": math.inf, "state": None}
    bad_epochs, start_epoch, stopped = 0, 0, False

    state = load_state(state_path, digest)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["mask_rng"])
        history = [dict(h) for h in state["history"]]
        best = {"epoch": int(state["best_epoch"]), "value": float(state["best_value"]),
                "state": state["best_model"]}
        bad_epochs, start_epoch, stopped = int(state["bad_epochs"]), int(state["epoch"]) + 1, bool(state["stopped"])
        log.info("%s: resuming after epoch %d from %s", desc, start_epoch - 1, state_path)
    else:
        stale = [slot for slot in state_slots(state_path) if slot.exists()]
        if stale:  # written for other data or settings (or unreadable): never resumed, so removed
            log.info("%s: %s holds no state of this data and configuration; starting afresh", desc,
                     ", ".join(map(str, stale)))
            for slot in stale:
                slot.unlink()
        torch.manual_seed(seed)

    has_val = val_loader is not None and len(val_loader.batch_sampler) > 0
    for epoch in range(start_epoch, params.epochs):
        if stopped:
            break
        model.train()
        train_loader.batch_sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        n, t0 = 0, time.perf_counter()
        skipped = 0
        for batch in tqdm(train_loader, desc=f"{desc} epoch {epoch + 1}/{params.epochs}", mininterval=10,
                          leave=False):
            batch = batch.to(device)
            with autocast(device):
                losses = objective(model, batch, gen)
            if not losses["loss"].requires_grad:  # nothing in the batch to learn from
                skipped += 1
                _advance(scheduler)
                continue
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if params.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            optimizer.step()
            scheduler.step()
            k = len(batch)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * k
            n += k
        row = {"epoch": epoch + 1, **{f"train_{k}": v / max(1, n) for k, v in sums.items()},
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        if has_val:
            val = _mean_losses(model, objective, val_loader, device, seed + 1)
            row.update({f"val_{k}": v for k, v in val.items()})
            if val["loss"] < best["value"] - 1e-6:
                best = {"epoch": epoch + 1, "value": val["loss"],
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                bad_epochs = 0
            else:
                bad_epochs += 1
            stopped = (params.patience > 0 and bad_epochs >= params.patience and epoch + 1 >= params.min_epochs)
        history.append(row)
        if skipped:
            log.info("%s epoch %d: %d of %d batches had no contributing sample; no step taken on them", desc,
                     epoch + 1, skipped, len(train_loader))
        log.info("%s epoch %d: %s", desc, epoch + 1,
                 " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        _save_state(state_path, {
            "digest": digest, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "mask_rng": gen.get_state(),
            "history": history, "best_epoch": best["epoch"], "best_value": best["value"],
            "best_model": best["state"], "bad_epochs": bad_epochs, "stopped": stopped,
        })
        if stopped:
            log.info("%s: early stop after epoch %d (best val loss %.4g at epoch %d)", desc, epoch + 1,
                     best["value"], best["epoch"])
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return FitResult(history=history, best_epoch=best["epoch"] if has_val else len(history), stopped_early=stopped)


def state_slots(path: str | Path) -> tuple[Path, Path]:
    """The two files a training state alternates between: ``<stem>.0<suffix>`` and ``<stem>.1<suffix>``."""
    path = Path(path)
    return tuple(path.with_name(f"{path.stem}.{i}{path.suffix}") for i in (0, 1))


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the epoch's state into the slot of the epoch's parity, the other slot holding the previous
    epoch's complete state. The slot is removed before the atomic write, so its rename never replaces an
    existing file: ext4 flushes a file renamed over another to disk (auto_da_alloc), which cost ~30 ms
    per epoch, a few percent of a demo fine-tune."""
    slot = state_slots(path)[int(state["epoch"]) % 2]
    slot.unlink(missing_ok=True)
    with atomic_path(slot) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path, digest: str | None = None) -> dict[str, Any] | None:
    """The newest state among the slots of ``path`` that loads (a damaged one is skipped) and, when ``digest``
    is given, was written under that key (a stale slot never shadows a valid one); None if none."""
    newest = None
    for slot in state_slots(path):
        if not slot.exists():
            continue
        try:
            state = torch.load(slot, map_location="cpu", weights_only=True)
        except Exception as e:  # a file damaged outside our atomic writes: the other slot may still be good
            log.warning("training state %s is unreadable (%s); ignoring it", slot, e)
            continue
        if digest is not None and state.get("digest") != digest:
            continue
        if newest is None or int(state["epoch"]) > int(newest["epoch"]):
            newest = state
    return newest


def clear_state(path: str | Path) -> None:
    """Remove a finished stage's training state (both slots, and its folder once empty): a later run of the
    stage, forced or on changed inputs, must train, not pick up the finished state."""
    for slot in state_slots(path):
        slot.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other stages' states may still be there
        Path(path).parent.rmdir()


def save_model(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """The final weights plus everything needed to rebuild and apply the model (loads with weights_only)."""
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "metadata": json.loads(json.dumps(metadata, default=str))}, tmp)


def load_model_state(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=True)
