"""The shared output helper: atomic files and stores, provenance, completeness."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from wsiomics import __version__
from wsiomics.io import TMP_PREFIX, atomic_path, atomic_zarr, open_store, write_array, write_text


def test_atomic_zarr_writes_provenance_and_completes(tmp_path):
    with atomic_zarr(tmp_path / "s.zarr", {"kind": "test"}) as root:
        write_array(root, "x", np.arange(10).reshape(5, 2), chunk_rows=2)
        assert not (tmp_path / "s.zarr").exists()  # nothing at the final path until done
    store = open_store(tmp_path / "s.zarr")
    assert store.attrs["complete"] is True and store.attrs["kind"] == "test"
    assert store.attrs["provenance"]["version"] == __version__
    assert store["x"].chunks == (2, 2)
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["x"][:].sum() == 45  # plain zarr reads it


def test_failure_leaves_previous_output_untouched(tmp_path):
    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_store_replaces_existing_directory(tmp_path):
    for value in (1, 2):
        with atomic_zarr(tmp_path / "s.zarr") as root:
            write_array(root, "v", np.array([value]))
    assert open_store(tmp_path / "s.zarr")["v"][0] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_open_store_refuses_missing_and_incomplete(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the rule"):
        open_store(tmp_path / "none.zarr")
    root = zarr.open_group(str(tmp_path / "half.zarr"), mode="w")
    root.attrs["complete"] = False
    with pytest.raises(RuntimeError, match="incomplete"):
        open_store(tmp_path / "half.zarr")


def test_empty_arrays_are_written(tmp_path):
    with atomic_zarr(tmp_path / "e.zarr") as root:
        write_array(root, "coords", np.zeros((0, 2), np.int64), chunk_rows=100)
    assert open_store(tmp_path / "e.zarr")["coords"].shape == (0, 2)


def test_leftovers_of_killed_writers_are_swept(tmp_path):
    import subprocess
    import sys

    from wsiomics.io import _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{TMP_PREFIX}s.zarr.{_host()}.{int(dead.stdout)}.abcdef12"
    elsewhere = tmp_path / f"{TMP_PREFIX}s.zarr.otherhost.{int(dead.stdout)}.abcdef12"
    other_target = tmp_path / f"{TMP_PREFIX}t.zarr.{_host()}.{int(dead.stdout)}.abcdef12"
    for p in (stale, elsewhere, other_target):
        p.mkdir()
    with atomic_zarr(tmp_path / "s.zarr") as root:
        write_array(root, "v", np.array([1]))
    assert not stale.exists()
    assert elsewhere.exists() and other_target.exists()  # another host's writer, another target: untouched
