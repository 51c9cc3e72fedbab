"""Where encoder weights come from, and loading them safely.

Three sources: none (``pretrained: false``, random weights, said loudly), a local checkpoint (the usual
case on offline clusters), or the Hugging Face hub. A hub name is looked up in the local hub cache
first; when it is not cached and the hub cannot be reached we fail within seconds with the commands
that fix it, instead of letting the download hang. Checkpoints load with ``weights_only=True`` (or as
safetensors) and their sha256 is recorded, so every feature store says exactly which weights made it.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from wsiomics.io import atomic_path

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_NAME = re.compile(r"(hf[-_]hub:)?([\w.-]+/[\w.-]+)")
_NESTING_KEYS = ("state_dict", "model", "teacher", "module")


class WeightsError(RuntimeError):
    """Weights cannot be found or do not fit the architecture; the message says how to fix it."""


@dataclass(frozen=True)
class WeightsInfo:
    """Recorded in every feature store's ``weights`` attr."""

    source: str  # "random" | "checkpoint" | "hub"
    name: str  # checkpoint path or hub repository ("" for random)
    sha256: str | None
    path: str | None = None  # the file actually loaded

    def as_attrs(self) -> dict[str, str | None]:
        """What identifies the weights (the file's location may change, e.g. a moved hub cache)."""
        return {"source": self.source, "name": self.name, "sha256": self.sha256}


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsiomics" / "sha256"


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file; hub blobs are named by it, other files are hashed once per (path, size, mtime)."""
    real = Path(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", real.name) and real.parent.name == "blobs":
        return real.name
    stat = real.stat()
    key = hashlib.sha256(f"{real}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = _cache_dir() / key
    if cached.is_file():
        return cached.read_text().strip()
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:
        with atomic_path(cached) as tmp:
            tmp.write_text(value)
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return value


def is_checkpoint_path(spec: str) -> bool:
    """A weights spec that names a file (exists, or looks like one) rather than a hub repository."""
    return Path(spec).expanduser().exists() or spec.lower().endswith(CHECKPOINT_SUFFIXES) or spec.startswith(
        (".", "/", "~"))


def hub_repo(spec: str) -> str:
    match = _HUB_NAME.fullmatch(spec.strip())
    if not match:
        raise WeightsError(f"weights '{spec}' is neither an existing checkpoint file nor a hub name like 'org/model'")
    return match.group(2)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection within ``timeout`` seconds (False when HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_file(repo: str) -> Path:
    """The weights file of a hub repository: from the local cache, else downloaded; fails fast offline."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    for filename in HUB_FILES:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    if not hub_reachable():
        raise WeightsError(
            f"encoder weights '{repo}' are not in the local Hugging Face cache and the hub cannot be reached "
            "(offline machine or HF_HUB_OFFLINE=1). Fix one of: (1) on a machine with internet run "
            f"`hf download {repo}` (after `hf auth login` for gated models) and copy the cache "
            "(~/.cache/huggingface) here, or set HF_HOME to a shared copy; (2) download the weights file and "
            "set features.weights to its local path; (3) for a test run without weights set "
            "features.pretrained: false.")
    for filename in HUB_FILES:
        try:
            return Path(hf_hub_download(repo, filename))
        except EntryNotFoundError:
            continue
        except GatedRepoError as e:
            raise WeightsError(f"'{repo}' is gated: accept its licence on huggingface.co and set HF_TOKEN "
                               "(or run `hf auth login`), then re-run") from e
        except RepositoryNotFoundError as e:
            raise WeightsError(f"hub repository '{repo}' does not exist (or needs HF_TOKEN); check the name") from e
    raise WeightsError(f"hub repository '{repo}' has none of {', '.join(HUB_FILES)}; download its weights and "
                       "set features.weights to the local file")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, unwrapped from the usual nestings (``state_dict``, ``model``, DDP ``module.``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; fix features.weights (absolute paths are safest)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/format error means the same to the user
        raise WeightsError(f"checkpoint {path} cannot be read as a tensor checkpoint ({type(e).__name__}: {e}). "
                           "Only plain state dicts load (weights_only=True); re-save it with "
                           "torch.save(model.state_dict(), path)") from e
    while isinstance(state, dict):
        nested = [k for k in _NESTING_KEYS if isinstance(state.get(k), dict)]
        if not nested or any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = state[nested[0]]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, ignorable: tuple[str, ...] = (),
              assign: bool = False):
    """Load strictly; only keys under ``ignorable`` prefixes (a classifier the encoder drops) may be extra.

    ``assign``: the checkpoint's tensors become the module's (cast to its dtypes), for a module built on the
    meta device: no second copy of the weights.
    """
    own = model.state_dict()
    unexpected = [k for k in state if k not in own and not k.startswith(ignorable)]
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if unexpected or missing or wrong:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = [f"{len(missing)} missing ({head(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({head(unexpected)})" if unexpected else "",
                 f"{len(wrong)} with the wrong shape ({head(wrong)})" if wrong else ""]
        raise WeightsError(f"{where} does not fit the architecture: " + "; ".join(p for p in parts if p)
                           + ". Check that features.encoder names the model these weights were trained for.")
    keep = {k: v for k, v in state.items() if k in own}
    if assign:  # the module's dtypes, one tensor at a time (no copy where they already match)
        for k, v in keep.items():
            keep[k] = v.to(own[k].dtype)
    model.load_state_dict(keep, strict=True, assign=assign)
