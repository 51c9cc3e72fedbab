"""Shared output helpers: every store or file the pipeline writes goes through here.

Outputs are first written next to their destination under a hidden temporary name and renamed
into place only when complete, so a killed job never leaves something that looks finished.
Each zarr store carries provenance attrs (package version, command line, time, host).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsiomics import __version__

if TYPE_CHECKING:
    import zarr

TMP_PREFIX = ".tmp-"

# Snakemake marks finished directory outputs with a `.snakemake_timestamp` file, which zarr warns about on
# every open of a store the workflow wrote; it is expected there, not a sign of damage.
warnings.filterwarnings("ignore", message=r"Object at \.snakemake_timestamp is not recognized")


def provenance() -> dict[str, Any]:
    """What produced an output: recorded under the ``provenance`` attr of every store."""
    return {
        "package": "wsiomics",
        "version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "argv": list(sys.argv),
    }


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in platform.node()) or "host"


def _temp_sibling(path: Path) -> Path:
    """Hidden sibling named after the target, host and pid, so leftovers can be traced and swept."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(path: Path) -> list[Path]:
    """Remove temporary siblings of ``path`` left by killed writers on this host (their pid is gone).

    Writers on other hosts (shared cluster filesystems) are never touched: their pid means nothing here.
    """
    removed = []
    prefix = f"{TMP_PREFIX}{path.name}."
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        if not candidate.name.startswith(prefix):
            continue
        parts = candidate.name[len(prefix):].split(".")
        if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
            continue
        if not _pid_alive(int(parts[1])):
            _remove(candidate)
            removed.append(candidate)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; an existing directory is moved aside first, then deleted."""
    if final.is_dir() and not final.is_symlink():
        trash = _temp_sibling(final)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; rename it onto ``path`` on success.

    On any exception the temporary output is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(final)
    tmp = _temp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary path for {final}")
        _replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_zarr(path: str | os.PathLike, attrs: dict[str, Any] | None = None) -> Iterator[zarr.Group]:
    """Create a zarr v3 group at a temporary path, yield it, then rename it onto ``path``.

    ``attrs`` plus a ``provenance`` entry are written to the root group; a ``complete`` attr is set
    last, so readers can tell a finished store from one copied mid-write.
    """
    import zarr  # here, not at the top: the workflow parses with write_text, and zarr costs a launcher dependency

    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update({**(attrs or {}), "provenance": provenance(), "complete": False})
        yield root
        root.attrs["complete"] = True


def write_array(group: zarr.Group, name: str, data: np.ndarray, chunk_rows: int | None = None) -> zarr.Array:
    """Write ``data`` as array ``name``; chunked by rows when ``chunk_rows`` is given."""
    chunks: Any = "auto"
    if chunk_rows is not None:
        chunks = (max(1, min(chunk_rows, max(1, data.shape[0]))),) + tuple(data.shape[1:])
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
    if data.size:
        arr[...] = data
    return arr


def open_store(path: str | os.PathLike) -> zarr.Group:
    """Open a finished store read-only; a store without ``complete`` is reported as unfinished."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such store; run the rule that produces it first")
    import zarr

    root = zarr.open_group(str(p), mode="r")
    if not root.attrs.get("complete", False):
        raise RuntimeError(f"{p}: store is incomplete (its writer was interrupted); delete it and re-run")
    return root


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(value: Any) -> Any:
    """Convert numpy scalars/arrays and paths so a value can go into zarr attrs."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
