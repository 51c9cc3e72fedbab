"""Look inside the zarr stores the pipeline writes: tree, attrs, completeness and cheap numeric summaries.

A convenience only: every store stays readable with plain ``zarr.open_group(path, mode="r")``. Reports are
plain dicts (so ``--json`` is just a dump); :func:`render` turns one into text. Arrays are read in blocks of
whole chunks along the first axis, so memory stays bounded whatever the array's size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsiomics.io import TMP_PREFIX

SUMMARY_CAP_BYTES = 1 << 30  # arrays larger than this (uncompressed) are summarised only with --full
BLOCK_BYTES = 64 << 20  # float64 working memory per block while summarising
STORED_BYTES_MAX_CHUNKS = 100_000  # counting stored bytes lists every chunk: skipped above this unless --full
KINDS = {"anndata": "AnnData", "features": "feature store", "tiles": "tiles store", "generic": "generic zarr",
         "array": "zarr array"}


def jsonable(value: Any) -> Any:
    """Numpy scalars/arrays to Python, NaN/inf to None: ``json.dumps(..., allow_nan=False)`` must succeed."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def row_blocks(arr: zarr.Array, block_bytes: int | None = None):
    """``(start, stop)`` row ranges covering ``arr``, each a whole number of chunks (of shards if sharded)."""
    unit = (arr.shards or arr.chunks)[0]
    rows = max(unit, (block_bytes or BLOCK_BYTES) // max(1, 8 * math.prod(arr.shape[1:])) // unit * unit)
    for start in range(0, arr.shape[0], rows):
        yield start, min(start + rows, arr.shape[0])


def array_stats(arr: zarr.Array, row_norms: bool = False, column_ranges: bool = False) -> dict[str, Any]:
    """Min/mean/max of the finite values and NaN/inf counts; optionally row L2 norms and per-column ranges."""
    is_float = arr.dtype.kind == "f"
    n = nan = inf = bad_rows = zero_rows = n_norms = 0
    total = norm_sum = 0.0
    lo = norm_lo = math.inf
    hi = norm_hi = -math.inf
    cols = None
    for start, stop in row_blocks(arr):
        try:
            block = np.asarray(arr[start:stop])
        except Exception as e:  # name the rows, so the damaged chunk can be found
            raise OSError(f"rows {start}..{stop - 1} unreadable ({type(e).__name__}: {e})") from e
        finite = np.isfinite(block) if is_float else np.ones(block.shape, bool)
        if is_float:
            nan, inf = nan + int(np.isnan(block).sum()), inf + int(np.isinf(block).sum())
        values = block[finite]
        if values.size:
            n, total = n + values.size, total + float(values.sum(dtype=np.float64))
            lo, hi = min(lo, values.min().item()), max(hi, values.max().item())
        if row_norms:
            rows, good = block.reshape(len(block), -1).astype(np.float64), finite.reshape(len(block), -1).all(1)
            bad_rows, zero_rows = bad_rows + int((~good).sum()), zero_rows + int((rows == 0).all(1).sum())
            norms = np.sqrt((rows[good] ** 2).sum(1))
            if norms.size:
                n_norms, norm_sum = n_norms + norms.size, norm_sum + norms.sum()
                norm_lo, norm_hi = min(norm_lo, norms.min()), max(norm_hi, norms.max())
        if column_ranges and block.ndim == 2 and len(block):
            b = np.stack([block.min(0), block.max(0)])
            cols = b if cols is None else np.stack([np.minimum(cols[0], b[0]), np.maximum(cols[1], b[1])])
    out: dict[str, Any] = {"min": lo if n else None, "mean": total / n if n else None, "max": hi if n else None}
    if is_float:
        out.update(nan=nan, inf=inf)
    if row_norms:
        out["row_norm"] = {"min": norm_lo, "mean": norm_sum / n_norms, "max": norm_hi} if n_norms else None
        out.update(nonfinite_rows=bad_rows, zero_rows=zero_rows)
    if column_ranges:
        out["column_ranges"] = None if cols is None else cols.T.tolist()
    return out


def _codec(codec: Any) -> str:
    spec = dict(codec.to_dict() if hasattr(codec, "to_dict") else codec.get_config())  # zarr v3 / numcodecs
    conf = spec.get("configuration", spec)
    keep = [f"{k}={conf[k]}" for k in ("cname", "clevel", "level", "shuffle") if k in conf]
    return str(spec.get("name") or spec.get("id")) + (f"({', '.join(keep)})" if keep else "")


def describe_array(arr: zarr.Array, full: bool, max_bytes: int, **stats_options) -> dict[str, Any]:
    """Layout (shape, dtype, chunks, shards, codecs, bytes) and, for real numbers under the cap, a summary."""
    codecs = [*arr.filters, *([arr.serializer] if arr.serializer else []), *arr.compressors]
    node: dict[str, Any] = {
        "type": "array", "shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
        "shards": list(arr.shards) if arr.shards else None, "nbytes": arr.nbytes, "stored_bytes": None,
        "codecs": [c for c in map(_codec, codecs) if c != "bytes"], "attrs": dict(arr.attrs)}
    if full or arr.nchunks <= STORED_BYTES_MAX_CHUNKS:
        node["stored_bytes"] = arr.nbytes_stored()  # includes the array's metadata document
    if arr.ndim == 0:
        node["value"] = np.asarray(arr[()]).item()
    elif arr.dtype.kind in "iuf" and arr.size:
        if arr.nbytes > max_bytes and not full:
            node["summary"] = {"skipped": f"{_size(arr.nbytes)} > {_size(max_bytes)}; use --full"}
        else:
            try:
                node["summary"] = array_stats(arr, **stats_options)
            except OSError as e:
                node["error"] = str(e)
    return node


def walk(group: zarr.Group, kind: str, full: bool, max_bytes: int, prefix: str = "") -> dict[str, dict]:
    """Every node below ``group`` by path, groups included, in name order; a damaged array is noted, not fatal."""
    nodes: dict[str, dict] = {}
    for name, member in sorted(group.members(), key=lambda m: m[0]):
        path = prefix + name
        if isinstance(member, zarr.Group):
            nodes[path] = {"type": "group", "attrs": dict(member.attrs)}
            nodes.update(walk(member, kind, full, max_bytes, path + "/"))
            continue
        options = {"row_norms": kind == "features" and path == "features",
                   "column_ranges": kind in ("features", "tiles") and path == "coords"}
        try:
            nodes[path] = describe_array(member, full, max_bytes, **options)
        except Exception as e:  # unreadable metadata
            nodes[path] = {"type": "array", "error": f"{type(e).__name__}: {e}"}
    return nodes


def store_kind(root: zarr.Group) -> str:
    attrs, names = root.attrs, set(root.array_keys())
    if attrs.get("encoding-type") == "anndata":
        return "anndata"
    if {"features", "coords"} <= names and "encoder" in attrs:
        return "features"
    if attrs.get("store") == "tiles" or {"coords", "tissue_fraction"} <= names:
        return "tiles"
    return "generic"


def _length(node: Any) -> int:
    """Rows of an AnnData element: a dense array, a categorical/nullable group, or a sparse matrix."""
    if isinstance(node, zarr.Array):
        return node.shape[0]
    part = next((p for p in ("codes", "values") if p in node), None)
    return node[part].shape[0] if part else int(node.attrs["shape"][0])


def anndata_summary(root: zarr.Group) -> dict[str, Any]:
    """n_obs x n_vars and element names from zarr metadata alone: no anndata import, no data read."""
    obs, var, x = root["obs"], root["var"], root.get("X")
    out: dict[str, Any] = {"n_obs": _length(obs[obs.attrs["_index"]]), "n_vars": _length(var[var.attrs["_index"]]),
                           "obs_columns": list(obs.attrs.get("column-order", [])),
                           "var_columns": list(var.attrs.get("column-order", [])), "X": None}
    if x is not None:
        out["X"] = {"dtype": str(x.dtype if isinstance(x, zarr.Array) else x["data"].dtype),
                    "encoding": x.attrs.get("encoding-type")}
    for key in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
        out[key] = sorted(root[key].keys()) if key in root else []
    return out


def _summary(kind: str, attrs: dict, nodes: dict) -> tuple[dict[str, Any], list[str]]:
    """Feature/tiles summary assembled from the per-array summaries, plus consistency warnings."""
    def stats(path: str) -> dict[str, Any]:
        return nodes.get(path, {}).get("summary") or {}

    if kind not in ("features", "tiles"):
        return {}, []
    rows = nodes.get("coords", {}).get("shape", [0])[0]
    ranges = stats("coords").get("column_ranges")
    bbox = {"x": ranges[0], "y": ranges[1]} if ranges else None
    warnings = []
    if kind == "features":
        rows, dim = nodes["features"].get("shape", [0, 0])
        f = stats("features")
        out = {"rows": rows, "dim": dim, "dtype": nodes["features"].get("dtype"), "coords_bbox": bbox,
               **{k: f[k] for k in ("skipped", "row_norm", "nan", "inf", "nonfinite_rows", "zero_rows") if k in f}}
        if nodes["coords"].get("shape", [None])[0] != rows:
            warnings.append(f"coords has shape {nodes['coords'].get('shape')} but features {[rows, dim]}")
        if attrs.get("feature_dim", dim) != dim:
            warnings.append(f"attr feature_dim={attrs['feature_dim']} but features have {dim} columns")
    else:
        out = {"tiles": rows, "coords_bbox": bbox, **{k: attrs[k] for k in (
            "slide_id", "mpp", "mpp_source", "target_mpp", "patch_size", "tissue_area_mm2") if k in attrs}}
        for name in ("tissue_fraction", "artifact_fraction"):
            out[name] = {k: stats(name)[k] for k in ("min", "mean", "max")} if "min" in stats(name) else None
        out["tissue_mask_shape"] = nodes.get("tissue_mask", {}).get("shape")
    if attrs.get("n_tiles", rows) != rows:
        warnings.append(f"attr n_tiles={attrs['n_tiles']} but the store has {rows} rows")
    return out, warnings


def _incomplete(kind: str, attrs: dict) -> str | None:
    """Why a store does not count as finished (see ``wsiomics.io.atomic_zarr``), or None."""
    if kind == "anndata" and "complete" not in attrs:
        return None  # the expression stage writes AnnData under a temporary name and renames it when complete
    if "complete" not in attrs:
        return "no root attr 'complete' (not written by wsiomics, or its writer was interrupted)"
    if attrs["complete"] is not True:
        return f"root attr complete={attrs['complete']!r}: its writer was interrupted; delete it and re-run"
    return None


def inspect_store(path: str | Path, full: bool = False, max_bytes: int = SUMMARY_CAP_BYTES) -> dict[str, Any]:
    """Everything ``inspect`` knows about one store; ``ok`` is False when it is missing, unreadable or incomplete."""
    p = Path(path)
    report: dict[str, Any] = {"path": str(p), "ok": False, "kind": None, "complete": None, "incomplete_reason": None,
                              "errors": [], "warnings": [], "attrs": {}, "provenance": {}, "summary": {}, "nodes": {}}
    if not p.exists():
        report["errors"].append(f"{p}: no such file or directory")
        return jsonable(report)
    try:
        root = zarr.open(str(p), mode="r")
        report["attrs"] = attrs = dict(root.attrs)
        if isinstance(root, zarr.Array):  # a bare array: describe it; there is no attrs contract to check
            report.update(kind="array", nodes={"": describe_array(root, full, max_bytes)})
        else:
            report["kind"] = kind = store_kind(root)
            report["nodes"] = nodes = walk(root, kind, full, max_bytes)
            report["summary"], report["warnings"] = _summary(kind, attrs, nodes)
            if kind == "anndata":  # provenance lives in uns['provenance'], as scalar arrays
                report["summary"] = anndata_summary(root)
                report["provenance"] = {k.rsplit("/", 1)[1]: v["value"] for k, v in nodes.items()
                                        if k.startswith("uns/provenance/") and "value" in v}
        report["errors"] += [f"{k}: {n['error']}" for k, n in report["nodes"].items() if "error" in n]
        report["provenance"] = report["provenance"] or attrs.get("provenance") or {}
    except Exception as e:  # corrupt metadata, an AnnData missing obs/var, ...: keep what was gathered
        report["errors"].append(f"{p}: unreadable ({type(e).__name__}: {e})")
    if p.name.startswith(TMP_PREFIX):
        report["incomplete_reason"] = "a writer's temporary output (still being written, or interrupted)"
    elif report["kind"]:
        report["incomplete_reason"] = _incomplete(report["kind"], report["attrs"])
    report["complete"] = None if report["kind"] is None else report["incomplete_reason"] is None
    report["ok"] = bool(report["complete"]) and not report["errors"]
    return jsonable(report)


def to_json(reports: list[dict[str, Any]]) -> str:
    return json.dumps(jsonable(reports), indent=1, allow_nan=False)


# --- text -----------------------------------------------------------------------------------------

TEXT_WIDTH = 110  # attr values and name lists longer than this are cut in text mode (never in JSON)


def _size(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while n >= 1024 and len(units) > 1:
        n, units = n / 1024, units[1:]
    return f"{n:.0f} B" if units[0] == "B" else f"{n:.1f} {units[0]}"


def _cut(text: str, width: int = TEXT_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return _cut(f"({len(value)}) " + ", ".join(value), TEXT_WIDTH - 20) if value else "-"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "-" if value is None else str(value)


def render(report: dict[str, Any]) -> str:
    """One store's report as indented text."""
    attrs, prov = report["attrs"], report["provenance"]
    lines = [f"{report['path']}: {KINDS.get(report['kind'], 'not readable')}"]
    lines += [f"  ERROR: {e}" for e in report["errors"]]
    if report["incomplete_reason"]:
        lines.append(f"  INCOMPLETE: {report['incomplete_reason']}")
    elif report["complete"]:
        lines.append("  complete")
    lines += [f"  {k}: {_cut(str(attrs[k]), 400)}" for k in ("status", "reason") if attrs.get(k) not in (None, "")]
    if prov:
        lines.append("  provenance: " + ", ".join(f"{k} {prov.get(k, '?')}" for k in ("version", "created", "host")))
    lines += [f"  WARNING: {w}" for w in report["warnings"]]
    lines += ["  summary:"] * bool(report["summary"]) + [f"    {k}: {_fmt(v)}" for k, v in report["summary"].items()]
    shown = {k: v for k, v in attrs.items() if k not in ("provenance", "complete", "status", "reason")}
    lines += ["  attrs:"] * bool(shown) + [_cut(f"    {k}: {json.dumps(v)}") for k, v in shown.items()]
    lines += ["  tree:"] * bool(report["nodes"])
    for path, node in report["nodes"].items():
        indent, name = "    " + "  " * path.count("/"), path.rsplit("/", 1)[-1] or "(root array)"
        if node["type"] == "group" or "shape" not in node:
            lines.append(f"{indent}{name}/" if node["type"] == "group" else f"{indent}{name}  ERROR: {node['error']}")
            continue
        layout = f"{tuple(node['shape'])} {node['dtype']}  chunks {tuple(node['chunks'])}"
        layout += f"  shards {tuple(node['shards'])}" if node["shards"] else ""
        layout += f"  {'+'.join(node['codecs']) or 'uncompressed'}  {_size(node['nbytes'])}"
        layout += f" ({_size(node['stored_bytes'])} stored)" if node["stored_bytes"] is not None else ""
        lines.append(f"{indent}{name}  {layout}")
        if "value" in node:
            lines.append(_cut(f"{indent}  = {node['value']!r}"))
        if "error" in node:
            lines.append(f"{indent}  ERROR: {node['error']}")
        keys = ("skipped", "min", "mean", "max", "nan", "inf")
        summary = {k: node["summary"][k] for k in keys if (node.get("summary") or {}).get(k) is not None}
        lines += [f"{indent}  {_fmt(summary)}"] * bool(summary)
    return "\n".join(lines)
