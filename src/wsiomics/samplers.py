"""Class-balanced batches (P classes x K patients), seeded per epoch, for losses that need positives and negatives.

A batch-hard triplet loss with label positives (GiMP's pretraining) learns only from anchors that have a
patient of their own class and one of another class in the same batch; random batches of a few patients
often have none (4 patients of 4 classes: never). This sampler builds each batch from P classes with K
patients each (the "PK" batches of Hermans et al. 2017, *In Defense of the Triplet Loss*), so every batch
holds valid triplets whenever the cohort has two classes with two patients.

Every patient appears at least once per epoch: each class's patients, shuffled, are cut into chunks of K
(the last topped up with other patients of its class); each batch takes a chunk from each of the P classes
with the most chunks left (a class whose chunks are used up lends a fresh random chunk when fewer than P
classes are left). Unlabelled patients (label -1: no triplet anchor, but MPM learns from them) are spread
over the batches, at most P x K of them per batch: when they outnumber that, the epoch gets more batches (more
rounds of labelled chunks), so a batch never holds more than twice the labelled P x K however much of the
cohort is unlabelled. A class with fewer than K patients gives all it has. Batches are ``(index, epoch)``
keys as :class:`wsiomics.datasets.EpochBatches` yields, drawn from ``(seed, epoch)`` only, so the data
order does not depend on worker count or on where a resumed run starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


class ClassBalancedBatches(torch.utils.data.Sampler):
    """Batches of ``classes_per_batch`` classes x ``per_class`` patients (plus a share of the unlabelled ones)."""

    def __init__(self, labels: Sequence[int], classes_per_batch: int, per_class: int, seed: int) -> None:
        if classes_per_batch < 1 or per_class < 1:
            raise ValueError(f"need classes_per_batch >= 1 and per_class >= 1; got {classes_per_batch}, {per_class}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes_per_batch, self.per_class, self.seed = classes_per_batch, per_class, seed
        self.members = {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels[self.labels >= 0])}
        self.unlabelled = np.flatnonzero(self.labels < 0)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunks(self, members: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(members)
        k = min(self.per_class, len(order))
        chunks = [order[i:i + k] for i in range(0, len(order), k)]
        if len(chunks[-1]) < k:  # top up the last chunk with other patients of the class
            rest = np.setdiff1d(order, chunks[-1])
            chunks[-1] = np.concatenate([chunks[-1], rng.choice(rest, k - len(chunks[-1]), replace=False)])
        return chunks

    def _plan(self, counts: dict[int, int], rng: np.random.Generator | None) -> list[list[int]]:
        """Per batch, the classes it draws from: the P classes with the most chunks left (random tie-break)."""
        left = dict(counts)
        plan = []
        while any(left.values()):
            ties = rng.permutation(len(left)) if rng is not None else np.arange(len(left))
            ranked = sorted(zip(left, ties, strict=True), key=lambda ct: (-left[ct[0]], ct[1]))
            chosen = [c for c, _ in ranked[:self.classes_per_batch]]
            for c in chosen:
                left[c] = max(0, left[c] - 1)
            plan.append(chosen)
        return plan

    def _batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        if not self.members:  # nobody labelled: plain shuffled batches of the same size
            size = self.classes_per_batch * self.per_class
            order = rng.permutation(self.unlabelled)
            return [order[i:i + size] for i in range(0, len(order), size)]
        batches: list[np.ndarray] = []
        while not batches or len(batches) < self._unlabelled_batches():
            batches += self._round(rng)
        batches = batches[:max(self._unlabelled_batches(), len(self._round_plan(None)))]
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        extra = rng.permutation(self.unlabelled)
        return [np.concatenate([b, extra[i::len(batches)]]) for i, b in enumerate(batches)]

    def _round(self, rng: np.random.Generator) -> list[np.ndarray]:
        """One round: every labelled patient in P x K batches."""
        chunks = {c: self._chunks(m, rng) for c, m in self.members.items()}
        batches = []
        for chosen in self._plan({c: len(v) for c, v in chunks.items()}, rng):
            parts = [chunks[c].pop() if chunks[c] else self._chunks(self.members[c], rng)[0] for c in chosen]
            batches.append(np.concatenate(parts))
        return batches

    def _round_plan(self, rng: np.random.Generator | None) -> list[list[int]]:
        k = {c: min(self.per_class, len(m)) for c, m in self.members.items()}
        return self._plan({c: math.ceil(len(m) / k[c]) for c, m in self.members.items()}, rng)

    def _unlabelled_batches(self) -> int:
        """Batches needed to hold the unlabelled patients at P x K per batch."""
        return math.ceil(len(self.unlabelled) / (self.classes_per_batch * self.per_class))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch, 2 << 20])
        for batch in self._batches(rng):
            yield [(int(i), self.epoch) for i in batch]

    def __len__(self) -> int:
        if not self.members:
            return self._unlabelled_batches()
        return max(self._unlabelled_batches(), len(self._round_plan(None)))
