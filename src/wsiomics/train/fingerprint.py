"""What a training state was computed from, so that a saved state is resumed only on the same data.

A training job resumes from its last epoch when its state's key matches. The key is the method's
configuration (without execution-only settings) plus :func:`data_fingerprint`: the fold's patients with
their roles and labels, each slide's feature store identity and tile positions, the expression values the
model sees, per-tile targets (segmentation), the pretrained checkpoint's sha256 and the package version.
New folds, one more patient, re-extracted features, re-normalised expression or a new pretraining
checkpoint therefore start training afresh instead of scoring stale weights on new test patients.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from wsiomics.datasets import FoldData

# Settings that change where or how fast a job runs, not what it computes: a job resubmitted with more
# threads or on another device resumes its state.
EXECUTION_KEYS = ("threads", "num_workers", "device")


def package_version() -> str:
    try:
        return metadata.version("wsiomics")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _array_digest(values: np.ndarray | None) -> str:
    if values is None:
        return ""
    values = np.ascontiguousarray(values)
    return hashlib.sha256(f"{values.dtype.str}{values.shape}".encode() + values.tobytes()).hexdigest()[:16]


def _store_digest(store: str) -> str:
    """The store's root and features metadata: attrs record the extraction (encoder, weights, timings), so a
    re-extracted or re-imported store differs even when its tiles are the same; reading them costs one small
    file per slide, not the features themselves."""
    digest = hashlib.sha256()
    for part in ("zarr.json", "features/zarr.json"):
        path = Path(store) / part
        digest.update(path.read_bytes() if path.exists() else b"-")
    return digest.hexdigest()[:16]


def data_fingerprint(data: FoldData, pretrained: str | Path | None = None) -> dict[str, Any]:
    """A small JSON-able summary of everything the fold's training reads, for the training state's key."""
    patients = []
    for p in data.patients:
        slides = [[s.slide_id, _store_digest(s.store), s.n_tokens, _array_digest(s.positions),
                   _array_digest(s.targets)] for s in p.slides]
        patients.append([p.patient_id, p.role, p.label, _array_digest(p.genes), slides])
    summary = {"fold": data.fold, "classes": data.classes, "genes": data.genes, "gene_groups": data.gene_groups,
               "feature_dim": data.feature_dim, "patients": patients}
    return {
        "patients": hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16],
        "pretrained_sha256": file_sha256(pretrained) if pretrained else "",
        "wsiomics": package_version(),
    }


def state_key_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the execution-only settings (top level)."""
    return {k: v for k, v in config.items() if k not in EXECUTION_KEYS}
