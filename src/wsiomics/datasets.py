"""Patient datasets: each patient's patch features (all slides), expression, label and modality flags.

One dataset serves every method. A patient is the unit (splits are by patient): its slides' feature
rows are put in raster order of their grid positions (``coords / patch_size_level0``, so a 40x and a
20x scan of the same tissue get the same positions), concatenated slide after slide with a slide index.
Training crops each slide to ``max_tokens`` (a contiguous raster window, or an order-keeping random
sample); evaluation sees every token. Features stream from the zarr stores through a bounded LRU cache,
so a cohort larger than memory trains. Every random choice is drawn from ``(seed, epoch, patient)``,
so batches do not depend on worker count or on where a resumed run starts.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from wsiomics.models.batch import Batch

log = logging.getLogger(__name__)

CROPS = ("window", "sample")


class DatasetError(ValueError):
    """The inputs cannot form a patient dataset; the message names the file and the fix."""


@dataclass(frozen=True)
class DatasetParams:
    max_tokens: int = 4096  # per slide, in training (evaluation sees every token)
    crop: str = "window"  # window: contiguous raster window | sample: random tokens kept in raster order
    cache_mb: float = 2048.0  # bound of the in-memory feature cache (per data-loading process)
    seed: int = 0


@dataclass
class SlideRecord:
    slide_id: str
    store: str  # path of the features zarr store
    n_tokens: int
    order: np.ndarray  # (N,) stored row of each token in raster order (None-like: arange when already raster)
    positions: np.ndarray  # (N, 2) float32 grid (col, row), raster order
    contiguous: bool  # stored rows already in raster order: a window is one slice of the store
    targets: np.ndarray | None = None  # (N,) float32 per-tile target in raster order (segmentation); None = none


@dataclass
class PatientRecord:
    patient_id: str
    label: str
    role: str
    slides: list[SlideRecord] = field(default_factory=list)
    genes: np.ndarray | None = None  # (G,) float32 normalised expression, None when missing
    outcome: np.ndarray | None = None  # (K,) float32 patient-level task target (survival: time, event); None = none

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.slides)


@dataclass
class PatientItem:
    """One patient as numpy arrays, before padding."""

    index: int
    features: np.ndarray  # (L, D) float16/32
    positions: np.ndarray  # (L, 2) float32
    slide_index: np.ndarray  # (L,) int64
    genes: np.ndarray | None  # (G,)
    label: int
    targets: np.ndarray | None = None  # (L,) float32 per-token target (NaN = none); None when no slide has targets
    outcome: np.ndarray | None = None  # (K,) float32 patient-level target (NaN = none); None = none


class FeatureCache:
    """Whole-slide feature arrays kept in memory up to ``max_bytes``, least recently used evicted first.

    Slides larger than a quarter of the bound are never cached: their windows are read from the store
    directly (one contiguous slice when the store is in raster order), so one huge slide cannot flush
    the cache. The cache belongs to one process: pickled (a DataLoader worker started by spawn or
    forkserver) it arrives empty, with a lock of its own, and fills from the stores there.
    """

    def __init__(self, max_bytes: float) -> None:
        self.max_bytes = float(max_bytes)
        self._clear()

    def _clear(self) -> None:
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}  # neither the lock nor the parent's arrays travel

    def __setstate__(self, state: dict) -> None:
        self.max_bytes = state["max_bytes"]
        self._clear()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def read(self, slide: SlideRecord, raster_rows: np.ndarray | None) -> np.ndarray:
        """Feature rows of ``slide`` at the given raster-order positions (all rows when None). Keyed by the
        store, not the slide id: two cohorts (a run's and a deploy cohort's) may reuse slide ids."""
        key = str(slide.store)
        with self._lock:
            cached = self._items.get(key)
            if cached is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if cached is not None:
            return cached if raster_rows is None else cached[raster_rows]
        self.misses += 1
        array = zarr.open_array(f"{slide.store}/features", mode="r")
        size = slide.n_tokens * int(array.shape[1]) * array.dtype.itemsize
        if size <= self.max_bytes / 4:
            whole = _read_rows(array, slide, None)
            self._put(key, whole)
            return whole if raster_rows is None else whole[raster_rows]
        return _read_rows(array, slide, raster_rows)

    def _put(self, key: str, value: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes


def _read_rows(array: zarr.Array, slide: SlideRecord, raster_rows: np.ndarray | None) -> np.ndarray:
    if raster_rows is None:
        data = array[:]
        return data if slide.contiguous else data[slide.order]
    if len(raster_rows) == 0:
        return np.zeros((0, array.shape[1]), dtype=array.dtype)
    if slide.contiguous and raster_rows[-1] - raster_rows[0] + 1 == len(raster_rows):
        return array[int(raster_rows[0]):int(raster_rows[-1]) + 1]
    stored = slide.order[raster_rows]
    lo, hi = int(stored.min()), int(stored.max()) + 1
    return array[lo:hi][stored - lo]  # one ranged read, then the rows wanted


def read_slide_record(slide_id: str, store: str | Path) -> SlideRecord | None:
    """Coordinates of a finished feature store in raster order; None for a slide without usable features."""
    store = str(store)
    try:
        root = zarr.open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise DatasetError(f"{store}: no feature store; run the extract_features rule for slide {slide_id}") from None
    attrs = dict(root.attrs)
    if not attrs.get("complete", False):
        raise DatasetError(f"{store}: feature store is incomplete (its writer was interrupted); delete it and re-run")
    if attrs.get("status", "ok") != "ok" or "coords" not in root or root["coords"].shape[0] == 0:
        log.info("slide %s has no usable features (status %s): skipped", slide_id, attrs.get("status"))
        return None
    coords = root["coords"][:].astype(np.float64)
    step = float(attrs.get("patch_size_level0") or 0)
    if step <= 0:
        raise DatasetError(f"{store}: attr patch_size_level0 is missing or not positive; re-extract the slide "
                           "(or re-import it with its patch geometry) so grid positions can be computed")
    grid = coords / step
    order = np.lexsort((grid[:, 0], grid[:, 1]))  # by row, then column
    return SlideRecord(slide_id=slide_id, store=store, n_tokens=len(order), order=order,
                       positions=grid[order].astype(np.float32),
                       contiguous=bool(np.array_equal(order, np.arange(len(order)))))


def read_fold_expression(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The fold's normalised expression (patients x genes, z-scores) and its gene metadata."""
    import anndata as ad

    try:
        fold = ad.read_zarr(str(path))
    except Exception as e:  # anndata raises several kinds for a missing or broken store
        raise DatasetError(f"{path}: cannot read the fold's expression ({e}); run normalize_expression") from None
    x = fold.X.toarray() if hasattr(fold.X, "toarray") else np.asarray(fold.X)
    table = pd.DataFrame(x.astype(np.float32), index=fold.obs_names.astype(str), columns=fold.var_names)
    has = fold.obs["has_expression"].astype(bool) if "has_expression" in fold.obs else pd.Series(True, fold.obs_names)
    table = table[has.to_numpy()]
    meta = {"genes": list(fold.var_names)}
    if "gene_groups" in fold.var:
        meta["gene_groups"] = [str(g) for g in fold.var["gene_groups"]]
    return table, meta


def class_names(labels: Sequence[str]) -> list[str]:
    """Sorted distinct non-empty labels: the class order of every output (``prob_<class>``)."""
    return sorted({str(x) for x in labels if str(x) != ""})


class PatientDataset(torch.utils.data.Dataset):
    """Patients of one fold and role set; items are drawn for ``(index, epoch)`` keys."""

    def __init__(self, patients: list[PatientRecord], classes: list[str], n_genes: int,
                 params: DatasetParams, train: bool) -> None:
        self.patients = patients
        self.classes = classes
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.n_genes = n_genes
        self.params = params
        self.train = train
        if params.crop not in CROPS:
            raise DatasetError(f"train.crop is {params.crop!r}; choose one of {', '.join(CROPS)}")
        self.cache = FeatureCache(params.cache_mb * 2**20)

    def __len__(self) -> int:
        return len(self.patients)

    def _crop(self, n: int, rng: np.random.Generator) -> np.ndarray:
        budget = self.params.max_tokens
        if not self.train or n <= budget:
            return np.arange(n)
        if self.params.crop == "window":
            start = int(rng.integers(0, n - budget + 1))
            return np.arange(start, start + budget)
        return np.sort(rng.choice(n, budget, replace=False))

    def __getitem__(self, key: int | tuple[int, int]) -> PatientItem:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        patient = self.patients[index]
        rng = np.random.default_rng([self.params.seed, epoch, index])
        feats, pos, sidx, targets = [], [], [], []
        for k, slide in enumerate(patient.slides):
            rows = self._crop(slide.n_tokens, rng)
            whole = len(rows) == slide.n_tokens
            feats.append(self.cache.read(slide, None if whole else rows))
            pos.append(slide.positions[rows])
            sidx.append(np.full(len(rows), k, dtype=np.int64))
            targets.append(np.full(len(rows), np.nan, np.float32) if slide.targets is None else slide.targets[rows])
        has_targets = any(s.targets is not None for s in patient.slides)
        dim = feats[0].shape[1] if feats else 0
        return PatientItem(
            index=index,
            features=np.concatenate(feats) if feats else np.zeros((0, dim), np.float16),
            positions=np.concatenate(pos) if pos else np.zeros((0, 2), np.float32),
            slide_index=np.concatenate(sidx) if sidx else np.zeros(0, np.int64),
            genes=patient.genes,
            label=self.class_index.get(patient.label, -1),
            targets=np.concatenate(targets).astype(np.float32) if has_targets else None,
            outcome=patient.outcome,
        )


def collate(items: list[PatientItem], feature_dim: int, n_genes: int) -> Batch:
    """Pad a list of patients into one :class:`Batch` (padding: mask False, slide index -1).

    A cohort without slides or without expression still gets one (zero, masked) feature or gene column:
    the models are built with at least one (``max(1, ...)``), and a missing modality is flagged, not absent.
    """
    b = len(items)
    length = max(1, max(len(it.positions) for it in items))
    features = torch.zeros(b, length, max(1, feature_dim))
    positions = torch.zeros(b, length, 2)
    slide_index = torch.full((b, length), -1, dtype=torch.long)
    genes = torch.zeros(b, max(1, n_genes))
    for i, it in enumerate(items):
        n = len(it.positions)
        if n:
            features[i, :n] = torch.from_numpy(np.asarray(it.features, dtype=np.float32))
            positions[i, :n] = torch.from_numpy(it.positions)
            slide_index[i, :n] = torch.from_numpy(it.slide_index)
        if it.genes is not None:
            genes[i] = torch.from_numpy(it.genes)
    tile_targets = None
    if any(it.targets is not None for it in items):
        tile_targets = torch.full((b, length), float("nan"))
        for i, it in enumerate(items):
            if it.targets is not None and len(it.targets):
                tile_targets[i, :len(it.targets)] = torch.from_numpy(it.targets)
    outcomes = None
    widths = {len(it.outcome) for it in items if it.outcome is not None}
    if widths:
        outcomes = torch.full((b, max(widths)), float("nan"))
        for i, it in enumerate(items):
            if it.outcome is not None:
                outcomes[i, :len(it.outcome)] = torch.from_numpy(np.asarray(it.outcome, np.float32))
    return Batch(
        features=features, positions=positions, slide_index=slide_index, token_mask=slide_index >= 0,
        genes=genes,
        has_image=torch.tensor([len(it.positions) > 0 for it in items]),
        has_gene=torch.tensor([it.genes is not None for it in items]),
        labels=torch.tensor([it.label for it in items], dtype=torch.long),
        patient_index=torch.tensor([it.index for it in items], dtype=torch.long),
        tile_targets=tile_targets, outcomes=outcomes,
    )


class EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(index, epoch)`` keys: a seeded shuffle per epoch (training) or the fixed order."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, drop_last: bool = False) -> None:
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = n, batch_size, seed, shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 1 << 20]).permutation(self.n)
        for start in range(0, self.n, self.batch_size):
            chunk = order[start:start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size and start > 0:
                return
            yield [(int(i), self.epoch) for i in chunk]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not (self.drop_last and full) else 0)


@dataclass
class FoldData:
    """Everything a fold's training needs, built once from the stores."""

    fold: int
    patients: list[PatientRecord]
    classes: list[str]
    genes: list[str]
    gene_groups: list[str] | None
    feature_dim: int
    #: the roles this stage fits on (training batches, feature standardisation): ``train``, or in pretraining
    #: the roles of ``train.pretrain.pool`` (:func:`wsiomics.train.roles.pretrain_roles`)
    fit_roles: tuple[str, ...] = ("train",)

    def role(self, *roles: str) -> list[PatientRecord]:
        return [p for p in self.patients if p.role in roles]

    def dataset(self, roles: Sequence[str], params: DatasetParams, train: bool) -> PatientDataset:
        return PatientDataset(self.role(*roles), self.classes, len(self.genes), params, train)

    def loader(self, dataset: PatientDataset, batch_size: int, shuffle: bool, num_workers: int = 0,
               seed: int = 0, multiprocessing_context: str | None = None,
               batch_sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.DataLoader:
        """Workers persist across epochs, so each keeps its feature cache; the epoch reaches them inside
        the ``(index, epoch)`` keys the batch sampler draws in this process, never as worker state.
        The loader draws its workers' base seed from a generator of its own: from the global RNG it
        would take one draw per epoch without persistent workers and one in all with them, shifting the
        model's dropout masks (nothing here uses the workers' seeds; every choice comes from the keys).
        ``multiprocessing_context``: fork, spawn or forkserver (None: the platform's default).
        ``batch_sampler`` (one with ``set_epoch``, e.g. :class:`wsiomics.samplers.ClassBalancedBatches`)
        replaces the seeded shuffle."""
        sampler = batch_sampler or EpochBatches(len(dataset), batch_size, seed, shuffle)
        dim, n_genes = self.feature_dim, len(self.genes)
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_Collate(dim, n_genes),
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
            multiprocessing_context=multiprocessing_context if num_workers else None,
            generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class _Collate:
    feature_dim: int
    n_genes: int

    def __call__(self, items: list[PatientItem]) -> Batch:
        return collate(items, self.feature_dim, self.n_genes)


def load_fold(folds: pd.DataFrame, fold: int, slides: pd.DataFrame, feature_dir: str | Path | None,
              expression: str | Path | None) -> FoldData:
    """Build a fold's patients.

    folds: the folds table (``patient_id``, ``fold``, ``role``, ``label``); slides: ``patient_id``,
    ``slide_id`` of every slide of the sheet; feature_dir: ``results/features/<encoder>`` (None: no image
    modality); expression: the fold's normalised AnnData store (None: no expression modality).
    Patients whose only slides failed get no image tokens; none is dropped.
    """
    rows = folds[folds["fold"] == fold]
    if rows.empty:
        raise DatasetError(f"fold {fold} is not in the folds table (folds: {sorted(set(folds['fold']))})")
    genes_table, meta = (read_fold_expression(expression) if expression else (pd.DataFrame(), {"genes": []}))
    slides_of = slides.groupby("patient_id")["slide_id"].apply(sorted).to_dict() if len(slides) else {}
    feature_dim = 0
    patients = []
    for r in rows.sort_values("patient_id").itertuples():
        record = PatientRecord(patient_id=str(r.patient_id), label=str(r.label or ""), role=str(r.role))
        if feature_dir is not None:
            for slide_id in slides_of.get(record.patient_id, []):
                slide = read_slide_record(slide_id, Path(feature_dir) / f"{slide_id}.zarr")
                if slide is not None:
                    record.slides.append(slide)
                    dim = int(zarr.open_array(f"{slide.store}/features", mode="r").shape[1])
                    if feature_dim and dim != feature_dim:
                        raise DatasetError(f"{slide.store}: {dim}-d features, but other slides have {feature_dim}-d; "
                                           "every slide must come from the same encoder")
                    feature_dim = dim
        if record.patient_id in genes_table.index:
            record.genes = genes_table.loc[record.patient_id].to_numpy(np.float32)
        patients.append(record)
    groups = meta.get("gene_groups")
    return FoldData(fold=fold, patients=patients, classes=class_names(rows["label"]), genes=meta["genes"],
                    gene_groups=groups, feature_dim=feature_dim)
