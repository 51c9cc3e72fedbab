"""CLAM / TRIDENT h5 feature files to and from our zarr feature stores.

Both tools write one h5 per slide with a ``features`` dataset (N, D; older CLAM files (1, N, D)) and a
``coords`` dataset (N, 2; level-0 x, y of each patch's top-left corner) whose attrs describe the patching:
CLAM writes ``patch_level``, ``patch_size``, ``downsample``, ``level_dim``, ``downsampled_level_dim``,
``name``; TRIDENT adds ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
``overlap``. The two disagree on what ``patch_size`` means, so files are read and written in one
*flavor*: CLAM reads ``patch_size`` pixels **at** ``patch_level`` (``patch_size * downsample`` level-0
pixels), TRIDENT's ``patch_size`` is the size at the target magnification and ``patch_size_level0`` the
level-0 side. A 40x slide tiled at 20x and read at level 0 is ``patch_size`` 448 for CLAM but 224 for
TRIDENT. Importing keeps every h5 attr (under ``h5_attrs``) so an export in the same flavor writes the same
file back; exporting a store we extracted derives the flavor's attrs from our tile geometry.

Features are copied in row blocks, so memory stays flat however many patches a slide has.

:func:`import_features` is the workflow's per-slide import (the sample sheet's ``features_path``): one h5
file or one wsiomics feature store becomes the slide's store under ``results/features/<encoder>/``, after
checking that its width is the configured encoder's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsiomics.encoders.weights import sha256_of
from wsiomics.features.extract import STORE_DTYPES, FeatureError, RowWriter
from wsiomics.io import atomic_path, atomic_zarr, json_safe, open_store

log = logging.getLogger(__name__)

BLOCK_ROWS = 65536
# Magnification ~ 10 / (um per pixel): the convention CLAM, TRIDENT and scanners use (0.25 um/px = 40x).
MAG_TIMES_MPP = 10.0


class H5FormatError(FeatureError):
    """An h5 file that is not a usable CLAM/TRIDENT feature file."""


class ImportMismatchError(FeatureError):
    """Features made by another encoder (or of another width) than the configured one."""


@dataclass(frozen=True)
class ImportResult:
    slide_id: str
    n_tiles: int
    feature_dim: int
    skipped: bool = False


def _attrs(obj: h5py.HLObject) -> dict[str, Any]:
    """h5 attrs as JSON-safe values (bytes decoded, numpy arrays as lists)."""
    out = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, np.ndarray) and value.dtype.kind in "SO":
            value = [v.decode() if isinstance(v, bytes) else str(v) for v in value.tolist()]
        out[str(key)] = json_safe(value)
    return out


def _features_view(f: h5py.File, path: Path) -> h5py.Dataset:
    if "features" not in f:
        raise H5FormatError(f"{path}: no 'features' dataset (it has: {', '.join(f.keys()) or 'nothing'}). "
                            "Point at CLAM's h5_files/ or TRIDENT's features_<encoder>/ output, not patches/")
    feats = f["features"]
    if feats.ndim == 3 and feats.shape[0] == 1:  # early CLAM: (1, N, D)
        return feats
    if feats.ndim != 2:
        raise H5FormatError(f"{path}: 'features' has shape {feats.shape}; expected (N, D) or (1, N, D). Slide-level "
                            "embeddings (one vector per slide) cannot become a patch feature store")
    return feats


def _read_block(feats: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    return feats[0, start:stop] if feats.ndim == 3 else feats[start:stop]


def _coords(f: h5py.File, path: Path, n: int) -> np.ndarray:
    if "coords" not in f:
        raise H5FormatError(f"{path}: no 'coords' dataset, so features cannot be placed on the slide. CLAM's "
                            "pt_files/ lack coords: import its h5_files/ instead")
    coords = np.asarray(f["coords"][...])
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise H5FormatError(f"{path}: 'coords' has shape {coords.shape}; expected (N, 2) level-0 x, y")
    if len(coords) != n:
        raise H5FormatError(f"{path}: {n} feature rows but {len(coords)} coords; the file is truncated or mixes "
                            "two runs. Re-extract that slide")
    if coords.dtype.kind == "f" and not np.array_equal(coords, np.round(coords)):
        raise H5FormatError(f"{path}: coords are not whole pixels; expected level-0 integer x, y")
    return coords.astype(np.int64)


FLAVORS = ("clam", "trident")


def detect_flavor(coord_attrs: dict[str, Any]) -> str:
    """TRIDENT writes ``patch_size_level0`` and magnifications; CLAM writes ``patch_level``/``downsample``."""
    if "patch_size_level0" in coord_attrs or "target_magnification" in coord_attrs:
        return "trident"
    return "clam"


def _mean(value: Any) -> float:
    return float(np.mean(value)) if np.ndim(value) else float(value)


def _geometry_from_h5(coord_attrs: dict[str, Any], flavor: str) -> dict[str, Any]:
    """Our tile-geometry attrs from CLAM/TRIDENT coords attrs, as far as they determine them."""
    geometry: dict[str, Any] = {}
    size = coord_attrs.get("patch_size")
    if flavor == "clam":  # patch_size pixels read at patch_level
        downsample = _mean(coord_attrs.get("downsample", 1.0))
        if size is not None:
            geometry.update(read_size=int(size), tile_patch_size=int(size),
                            patch_size_level0=float(size) * downsample)
        if "patch_level" in coord_attrs:
            geometry["read_level"] = int(coord_attrs["patch_level"])
        geometry["read_downsample"] = downsample
    else:  # patch_size pixels at the target magnification, patch_size_level0 at level 0
        mag0, mag = coord_attrs.get("level0_magnification"), coord_attrs.get("target_magnification")
        level0 = coord_attrs.get("patch_size_level0")
        if level0 is None and size is not None and mag0 and mag:
            level0 = float(size) * float(mag0) / float(mag)
        if level0 is not None:
            geometry["patch_size_level0"] = float(level0)
        if size is not None:
            geometry["tile_patch_size"] = int(size)
        if mag0 is not None and float(mag0) > 0:
            geometry["mpp"] = MAG_TIMES_MPP / float(mag0)
        if mag is not None and float(mag) > 0:
            geometry["target_mpp"] = MAG_TIMES_MPP / float(mag)
    return geometry


def _h5_source_encoder(path: Path, h5_attrs: dict[str, dict[str, Any]]) -> str:
    """What made an h5 file's features, when the file says: recent TRIDENT writes ``encoder`` on ``features``;
    older TRIDENT only names its output folder ``features_<encoder>/`` (also in ``savetodir``). CLAM does not say."""
    named = h5_attrs["features"].get("encoder") or h5_attrs["file"].get("encoder")
    if named:
        return str(named)
    for folder in (h5_attrs["features"].get("savetodir"), str(path.parent)):
        name = Path(str(folder).rstrip("/")).name if folder else ""
        if name.startswith("features_"):
            return name.removeprefix("features_")
    return ""


def _imported_current(out: Path, sha256: str, dtype: str) -> bool:
    try:
        attrs = dict(open_store(out).attrs)
    except (FileNotFoundError, RuntimeError, ValueError):
        return False
    return attrs.get("weights", {}).get("sha256") == sha256 and attrs.get("dtype") == dtype


def _open_h5(path: Path) -> h5py.File:
    """The h5 file for reading; a file that is not HDF5 is an H5FormatError naming it and the fix."""
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise H5FormatError(f"{path}: not a readable HDF5 file ({e}); re-copy it from the source") from e


def _feature_arrays(root, coords: np.ndarray, dim: int, dtype: str, chunk_rows: int) -> RowWriter:
    """A store's ``coords`` (written) and empty ``features`` array; returns the writer that fills the rows."""
    n = len(coords)
    rows = max(1, min(chunk_rows, n))
    array = root.create_array("features", shape=(n, dim), dtype=dtype, chunks=(rows, dim))
    root.create_array("coords", shape=(n, 2), dtype=np.int64, chunks=(max(1, n), 2))
    if n:
        root["coords"][...] = coords
    return RowWriter(array, rows)


def import_h5(h5_path: str | os.PathLike, out: str | os.PathLike, encoder: str, *, slide_id: str | None = None,
              patient_id: str = "", dtype: str = "float16", chunk_rows: int = 4096, flavor: str = "auto",
              force: bool = False) -> ImportResult:
    """Write the CLAM/TRIDENT feature file ``h5_path`` as our feature store ``out`` (atomically).

    ``encoder`` names what made the features (we cannot tell from the file); the h5 file's sha256 stands in
    for the weights hash, so re-importing an unchanged file is skipped. Non-finite rows are an error.
    ``flavor`` (clam | trident | auto: trident when the file has ``patch_size_level0``) says how to read
    the patching attrs; the two tools mean different things by ``patch_size``.
    """
    path = Path(h5_path)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {STORE_DTYPES}; got {dtype!r}")
    if flavor not in (*FLAVORS, "auto"):
        raise ValueError(f"flavor must be clam, trident or auto; got {flavor!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such h5 file")
    slide_id = slide_id or path.stem
    digest = sha256_of(path)
    if not force and _imported_current(Path(out), digest, dtype):
        log.info("%s: %s is current, skipped", slide_id, out)
        with _open_h5(path) as f:
            feats = _features_view(f, path)
            return ImportResult(slide_id, int(feats.shape[-2]), int(feats.shape[-1]), skipped=True)
    with _open_h5(path) as f:
        feats = _features_view(f, path)
        n, dim = int(feats.shape[-2]), int(feats.shape[-1])
        coords = _coords(f, path, n)
        h5_attrs = {"file": _attrs(f), "features": _attrs(feats), "coords": _attrs(f["coords"])}
        flavor = detect_flavor(h5_attrs["coords"]) if flavor == "auto" else flavor
        attrs = {
            "slide_id": slide_id, "patient_id": patient_id, "encoder": encoder,
            "weights": {"source": "imported", "name": encoder, "sha256": digest}, "precision": "unknown",
            "dtype": dtype, "feature_dim": dim, "n_tiles": n, "status": "ok", "reason": "",
            "source_h5": str(path.resolve()), "source_dtype": str(feats.dtype), "h5_attrs": h5_attrs,
            "source_encoder": _h5_source_encoder(path, h5_attrs),
            "h5_flavor": flavor, **_geometry_from_h5(h5_attrs["coords"], flavor),
        }
        with atomic_zarr(out, json_safe(attrs)) as root:
            writer = _feature_arrays(root, coords, dim, dtype, chunk_rows)
            for start in range(0, n, BLOCK_ROWS):
                block = np.asarray(_read_block(feats, start, min(n, start + BLOCK_ROWS)), dtype=np.float32)
                bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
                if len(bad):
                    i = start + int(bad[0])
                    raise H5FormatError(f"{path}: {len(bad)} feature row(s) with NaN/inf from row {start}, first "
                                        f"row {i} (level-0 x={coords[i][0]}, y={coords[i][1]}); re-extract that "
                                        "slide")
                if dtype == "float16" and np.abs(block).max(initial=0.0) > np.finfo(np.float16).max:
                    raise H5FormatError(f"{path}: feature values exceed the float16 range; import with "
                                        "--dtype float32")
                writer.append(block.astype(dtype))
            writer.close()
    log.info("%s: imported %d x %d features from %s -> %s", slide_id, n, dim, path, out)
    return ImportResult(slide_id, n, dim)


def is_feature_store(source: str | os.PathLike) -> bool:
    """A wsiomics feature store is a zarr folder; anything else is read as an h5 file."""
    return Path(source).is_dir()


def source_shape(source: str | os.PathLike) -> tuple[int, int, str]:
    """(rows, width, what made them: '' when the source does not say) of an h5 file or a feature store, from
    its header only."""
    path = Path(source)
    if is_feature_store(path):
        root = open_store(path)
        if "features" not in root:
            raise FeatureError(f"{path}: not a feature store (no 'features' array); point features_path at a "
                               "store written by extract_features or import-h5")
        n, dim = root["features"].shape
        return int(n), int(dim), str(root.attrs.get("encoder", ""))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such h5 file")
    with _open_h5(path) as f:
        feats = _features_view(f, path)
        h5_attrs = {"file": _attrs(f), "features": _attrs(feats)}
        return int(feats.shape[-2]), int(feats.shape[-1]), _h5_source_encoder(path, h5_attrs)


def import_store(source: str | os.PathLike, out: str | os.PathLike, *, slide_id: str, patient_id: str = "",
                 dtype: str = "float16", chunk_rows: int = 4096, force: bool = False) -> ImportResult:
    """Copy the wsiomics feature store ``source`` to ``out`` as slide ``slide_id`` (atomically, in row blocks).

    Every attr is kept (encoder, weights, precision, tile geometry); ``source_store`` and
    ``source_provenance`` record where it came from. A store whose status is not ok is refused.
    """
    path = Path(source)
    root = open_store(path)
    attrs = dict(root.attrs)
    if "features" not in root or "coords" not in root:
        raise FeatureError(f"{path}: not a feature store (no 'features'/'coords' arrays)")
    if attrs.get("status", "ok") != "ok":
        raise FeatureError(f"{path}: the store's status is {attrs.get('status')} ({attrs.get('reason', '')}), so it "
                           "has no usable features; re-extract that slide or drop its features_path")
    feats, coords = root["features"], np.asarray(root["coords"][...], dtype=np.int64)
    n, dim = (int(v) for v in feats.shape)
    source_provenance = attrs.get("provenance", {})
    if not force:
        try:
            done = dict(open_store(out).attrs)
        except (FileNotFoundError, RuntimeError, ValueError):
            done = {}
        if (done.get("source_store") == str(path.resolve()) and done.get("source_provenance") == source_provenance
                and done.get("dtype") == dtype and done.get("slide_id") == slide_id):
            log.info("%s: %s is current, skipped", slide_id, out)
            return ImportResult(slide_id, n, dim, skipped=True)
    kept = {k: v for k, v in attrs.items() if k not in ("complete", "provenance")}
    kept.update(slide_id=slide_id, patient_id=patient_id or kept.get("patient_id", ""), dtype=dtype,
                source_store=str(path.resolve()), source_encoder=str(attrs.get("encoder", "")),
                source_provenance=source_provenance, source_dtype=str(feats.dtype))
    with atomic_zarr(out, json_safe(kept)) as dest:
        writer = _feature_arrays(dest, coords, dim, dtype, chunk_rows)
        for start in range(0, n, BLOCK_ROWS):
            block = np.asarray(feats[start:start + BLOCK_ROWS], dtype=np.float32)
            if dtype == "float16" and np.abs(block).max(initial=0.0) > np.finfo(np.float16).max:
                raise FeatureError(f"{path}: feature values exceed the float16 range; set features.dtype: float32")
            writer.append(block.astype(dtype))
        writer.close()
    log.info("%s: imported %d x %d features from %s -> %s", slide_id, n, dim, path, out)
    return ImportResult(slide_id, n, dim)


def import_features(source: str | os.PathLike, out: str | os.PathLike, encoder: str, *, slide_id: str,
                    patient_id: str = "", dtype: str = "float16", chunk_rows: int = 4096, flavor: str = "auto",
                    expected_dim: int | None = None, force: bool = False) -> ImportResult:
    """One slide's features (the sheet's ``features_path``: a TRIDENT/CLAM h5 file or a feature store) as the
    store ``out`` of ``encoder``, the configured one.

    Checked first, from the header: the width is ``expected_dim`` (the configured encoder's, when known), and
    a feature store was made by ``encoder`` itself. h5 files rarely name their encoder in our terms (TRIDENT's
    ``uni_v1`` is our ``uni``), so for them the name is recorded (``source_encoder``) and compared across the
    cohort by the status table, not here.
    """
    n, dim, made_by = source_shape(source)
    if expected_dim is not None and dim != expected_dim:
        by = f" (made by {made_by})" if made_by else ""
        raise ImportMismatchError(
            f"{source}: {dim}-wide features{by}, but features.encoder {encoder} gives {expected_dim}-wide ones. Fix: "
            f"set features.encoder to the encoder that made these features, or point features_path at {encoder} "
            "features; one cohort cannot mix encoders")
    if is_feature_store(source):
        if made_by != encoder:
            raise ImportMismatchError(
                f"{source}: a feature store of encoder {made_by or '(unnamed)'}, but features.encoder is {encoder}. "
                f"Fix: set features.encoder: {made_by} (if every slide has its features), or point features_path "
                f"at {encoder} features")
        return import_store(source, out, slide_id=slide_id, patient_id=patient_id, dtype=dtype,
                            chunk_rows=chunk_rows, force=force)
    return import_h5(source, out, encoder, slide_id=slide_id, patient_id=patient_id, dtype=dtype,
                     chunk_rows=chunk_rows, flavor=flavor, force=force)


def _level_info(attrs: dict[str, Any], level: int) -> tuple[float | None, list | None]:
    """(downsample, level dimensions) of pyramid level ``level``: from the feature store, else its tiles store."""
    downsample = attrs.get("read_downsample")
    dims = None
    tiles_store = attrs.get("tiles_store")
    if tiles_store and Path(tiles_store).exists():
        try:
            tiles = dict(open_store(tiles_store).attrs)
            dims = list(tiles["level_dimensions"][level])
            downsample = downsample or float(tiles["level_downsamples"][level])
        except (FileNotFoundError, RuntimeError, KeyError, IndexError, ValueError):
            pass
    return (float(downsample) if downsample else None), dims


def _geometry_for_h5(attrs: dict[str, Any], flavor: str) -> dict[str, Any]:
    """The ``flavor``'s coords attrs from one of our stores (extracted, or imported in the other flavor).

    CLAM: ``patch_size`` is what is read at ``patch_level``, so ``patch_size * downsample`` is the tile's
    level-0 side; without a known read level that is level 0 with ``patch_size = patch_size_level0`` (more
    pixels, the same area). TRIDENT: ``patch_size`` at the target magnification plus ``patch_size_level0``.
    """
    level0 = attrs.get("patch_size_level0")
    out: dict[str, Any] = {"name": attrs.get("slide_id", "")}
    if flavor == "clam":
        level, size = attrs.get("read_level"), attrs.get("read_size")
        downsample, dims = _level_info(attrs, int(level)) if level is not None else (None, None)
        if level is None or size is None or downsample is None:
            level, downsample, dims = 0, 1.0, None
            size = round(float(level0)) if level0 is not None else None
        if size is not None:
            out["patch_size"] = int(size)
        out["patch_level"] = int(level)
        out["downsample"] = [downsample, downsample]
        if dims is not None:
            out["level_dim"] = dims
            out["downsampled_level_dim"] = dims  # CLAM writes the level's size twice
        return out
    out["overlap"] = 0
    size = attrs.get("tile_patch_size")
    if size is not None:
        out["patch_size"] = int(size)
    if level0 is not None:
        out["patch_size_level0"] = int(round(float(level0)))
    mpp, target = attrs.get("mpp"), attrs.get("target_mpp")
    if mpp:
        out["level0_magnification"] = MAG_TIMES_MPP / float(mpp)
    if target:
        out["target_magnification"] = MAG_TIMES_MPP / float(target)
    return out


def export_h5(store: str | os.PathLike, h5_out: str | os.PathLike, flavor: str, *,
              block_rows: int = BLOCK_ROWS) -> int:
    """Write our feature store ``store`` as a CLAM or TRIDENT h5 (float32 ``features``, int64 ``coords``).

    ``flavor`` (clam | trident) decides the coords attrs (see the module docstring). A store imported from
    an h5 of the same flavor gets its original attrs back; otherwise they are derived from the tile geometry.
    Our attrs travel as JSON in the file attr ``wsiomics``. Returns the number of rows written.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be clam or trident; got {flavor!r}")
    root = open_store(store)
    attrs = dict(root.attrs)
    if "features" not in root or "coords" not in root:
        raise H5FormatError(f"{store}: not a feature store (no 'features'/'coords' arrays)")
    feats, coords = root["features"], np.asarray(root["coords"][...])
    n, dim = feats.shape
    h5_attrs = attrs.get("h5_attrs") or {}
    same = h5_attrs.get("coords") and attrs.get("h5_flavor", detect_flavor(h5_attrs["coords"])) == flavor
    coord_attrs = h5_attrs["coords"] if same else _geometry_for_h5(attrs, flavor)
    ours = {k: v for k, v in attrs.items() if k != "h5_attrs"}
    with atomic_path(h5_out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({k: v for k, v in (h5_attrs.get("file") or {}).items() if k != "wsiomics"})
        f.attrs["wsiomics"] = json.dumps(json_safe(ours))
        out = f.create_dataset("features", shape=(n, dim), dtype=np.float32,
                               chunks=(max(1, min(n, 1024)), dim) if n else None)
        for start in range(0, n, block_rows):
            out[start:start + block_rows] = np.asarray(feats[start:start + block_rows], dtype=np.float32)
        out.attrs.update(_h5_safe(h5_attrs.get("features") or {}))
        c = f.create_dataset("coords", data=coords.astype(np.int64).reshape(n, 2))
        c.attrs.update(_h5_safe(coord_attrs))
    log.info("%s: exported %d x %d features (%s) -> %s", attrs.get("slide_id", store), n, dim, flavor, h5_out)
    return int(n)


def _h5_safe(attrs: dict[str, Any]) -> dict[str, Any]:
    """h5 attrs cannot hold None or nested dicts: drop the former, JSON-encode the latter."""
    out = {}
    for key, value in attrs.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict | list) for v in value)
                                       and not _is_numeric_matrix(value)):
            value = json.dumps(value)
        out[key] = value
    return out


def _is_numeric_matrix(value: list) -> bool:
    try:
        return np.asarray(value).dtype.kind in "iuf"
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------- CLI


def _pair(inputs: list[Path], outs: list[Path] | None, out_dir: Path | None, suffix: str) -> list[tuple[Path, Path]]:
    if outs:
        if len(outs) != len(inputs):
            raise SystemExit(f"error: {len(inputs)} inputs but {len(outs)} --out paths")
        return list(zip(inputs, outs, strict=True))
    assert out_dir is not None
    return [(p, out_dir / (p.name.removesuffix(p.suffix) + suffix)) for p in inputs]


def _import_cli(args: argparse.Namespace) -> int:
    failed = 0
    for h5, out in _pair(args.h5, args.out, args.out_dir, ".zarr"):
        try:
            import_h5(h5, out, args.encoder, dtype=args.dtype, flavor=args.flavor, force=args.force)
        except (FeatureError, FileNotFoundError, ValueError) as e:
            log.error("%s", e)
            failed += 1
    return 1 if failed else 0


def _expected_dim(encoder: str) -> int | None:
    """The width a preset or timm model gives, or None for a name neither knows (e.g. TRIDENT's conch_v15)."""
    from wsiomics.encoders import resolve_preset

    try:
        return resolve_preset(encoder).feature_dim
    except ValueError:
        log.info("encoder %s is neither a preset nor a timm model: the imported width is not checked", encoder)
        return None


def _import_one_cli(args: argparse.Namespace) -> int:
    try:
        import_features(args.source, args.out, args.encoder, slide_id=args.slide_id, patient_id=args.patient_id,
                        dtype=args.dtype, chunk_rows=args.chunk_rows, flavor=args.flavor,
                        expected_dim=_expected_dim(args.encoder), force=args.force)
    except (FeatureError, FileNotFoundError, RuntimeError, ValueError) as e:
        log.error("%s", e)
        return 1
    return 0


def _export_cli(args: argparse.Namespace) -> int:
    failed = 0
    for store, out in _pair(args.store, args.out, args.out_dir, ".h5"):
        try:
            export_h5(store, out, args.flavor)
        except (FeatureError, FileNotFoundError, RuntimeError) as e:
            log.error("%s", e)
            failed += 1
    return 1 if failed else 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """``import-h5`` and ``export-h5`` subcommands of ``python -m wsiomics.features``."""
    imp = sub.add_parser("import-h5", help="CLAM/TRIDENT h5 feature files -> our zarr feature stores")
    imp.add_argument("--h5", required=True, nargs="+", type=Path, help="h5 feature file(s), one per slide")
    dest = imp.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", nargs="+", type=Path, help="store path per h5 file")
    dest.add_argument("--out-dir", type=Path, help="write <h5 stem>.zarr here, e.g. results/features/uni")
    imp.add_argument("--encoder", required=True, help="what made the features (becomes the store's encoder attr)")
    imp.add_argument("--dtype", default="float16", choices=STORE_DTYPES, help="stored dtype")
    imp.add_argument("--flavor", default="auto", choices=(*FLAVORS, "auto"),
                     help="how to read patch_size: clam (pixels at patch_level), trident (pixels at the target "
                          "magnification); auto: trident when the file has patch_size_level0")
    imp.add_argument("--force", action="store_true", help="re-import files already imported unchanged")
    imp.set_defaults(func=_import_cli)
    one = sub.add_parser("import", help="one slide's features (CLAM/TRIDENT h5 or a feature store) as its store of "
                                        "the configured encoder (the workflow's import_features rule)")
    one.add_argument("--source", required=True, type=Path, help="h5 feature file or wsiomics feature store (.zarr)")
    one.add_argument("--out", required=True, type=Path, help="store to write: results/features/<encoder>/<slide>.zarr")
    one.add_argument("--encoder", required=True, help="the configured encoder; a preset's or timm model's width is "
                                                      "checked against the source's")
    one.add_argument("--slide-id", required=True, help="the sheet's slide_id")
    one.add_argument("--patient-id", default="", help="the sheet's patient_id")
    one.add_argument("--dtype", default="float16", choices=STORE_DTYPES, help="stored dtype")
    one.add_argument("--chunk-rows", type=int, default=4096, help="rows per chunk of the features array")
    one.add_argument("--flavor", default="auto", choices=(*FLAVORS, "auto"), help="as for import-h5")
    one.add_argument("--force", action="store_true", help="re-import a source already imported unchanged")
    one.set_defaults(func=_import_one_cli)
    exp = sub.add_parser("export-h5", help="our zarr feature stores -> CLAM/TRIDENT h5 feature files")
    exp.add_argument("--store", required=True, nargs="+", type=Path, help="feature store(s)")
    dest = exp.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", nargs="+", type=Path, help="h5 path per store")
    dest.add_argument("--out-dir", type=Path, help="write <slide>.h5 here")
    exp.add_argument("--flavor", required=True, choices=FLAVORS,
                     help="clam: patch_size is read at patch_level (CLAM's extract_features_fp); trident: "
                          "patch_size at the target magnification plus patch_size_level0")
    exp.set_defaults(func=_export_cli)

