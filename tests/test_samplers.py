"""Class-balanced P x K batches: balanced, seeded per epoch, covering every patient; GiMP's pretraining uses them."""

from __future__ import annotations

import numpy as np
import pytest
from test_train import TRAIN_CFG, _data, cohort  # noqa: F401  (cohort: the module fixture)

from wsiomics.models.gimp import triplet_anchors
from wsiomics.samplers import ClassBalancedBatches
from wsiomics.train.methods import method_config
from wsiomics.train.stages import _loaders, data_params, stage_config

LABELS = [0] * 5 + [1] * 6 + [2] * 3 + [3] * 1 + [-1] * 3


def _epoch(sampler: ClassBalancedBatches, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert all(e == epoch for b in batches for _, e in b)
    return [[i for i, _ in b] for b in batches]


@pytest.mark.parametrize("p,k", [(2, 4), (2, 2), (3, 2)])
def test_batches_hold_p_classes_of_k_patients_and_cover_everyone(p, k):
    labels = np.array(LABELS)
    sampler = ClassBalancedBatches(LABELS, p, k, seed=0)
    for epoch in range(4):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler)
        seen = set()
        for b in batches:
            assert len(set(b)) == len(b)  # nobody twice in a batch
            labelled = [i for i in b if labels[i] >= 0]
            per_class = np.bincount(labels[labelled], minlength=4)
            assert (per_class > 0).sum() == p
            for c in np.flatnonzero(per_class):
                assert per_class[c] == min(k, (labels == c).sum())
            seen |= set(b)
        assert seen == set(range(len(LABELS)))  # every patient, unlabelled ones too, each epoch


def test_batches_are_seeded_per_epoch():
    a, b = ClassBalancedBatches(LABELS, 2, 4, seed=0), ClassBalancedBatches(LABELS, 2, 4, seed=0)
    assert _epoch(a, 3) == _epoch(b, 3)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(ClassBalancedBatches(LABELS, 2, 4, seed=1), 0) != _epoch(a, 0)


@pytest.mark.parametrize("n_unlabelled", [3, 40])
def test_unlabelled_patients_never_more_than_double_a_batch(n_unlabelled):
    """Many unlabelled patients (pretraining pool all: most of a cohort may be unlabelled) add batches, each
    still P classes x K labelled patients plus at most P x K unlabelled ones, and all of them every epoch."""
    labels = np.array([0] * 5 + [1] * 6 + [-1] * n_unlabelled)
    sampler = ClassBalancedBatches(labels, 2, 2, seed=0)
    batches = _epoch(sampler, 1)
    assert len(batches) == len(sampler) and max(map(len, batches)) <= 8
    assert set(np.concatenate(batches)) == set(range(len(labels)))
    for b in batches:
        assert len(set(b)) == len(b) and sorted(np.bincount(labels[[i for i in b if labels[i] >= 0]])) == [2, 2]


def test_without_labels_the_batches_are_plain_shuffles():
    sampler = ClassBalancedBatches([-1] * 10, 2, 2, seed=0)
    batches = _epoch(sampler, 0)
    assert len(batches) == len(sampler) == 3 and sorted(i for b in batches for i in b) == list(range(10))


def _gimp_loader(cohort, **model):  # noqa: F811
    cfg = stage_config(method_config({**TRAIN_CFG, "model": {**TRAIN_CFG["model"], **model}}, "gimp"), "pretrain")
    data = _data(cohort)
    train, _ = _loaders(data, cfg, data_params(cfg, 0), seed=0, stage="pretrain")
    return train


def test_gimp_label_pretraining_sees_a_valid_triplet_in_every_batch(cohort):  # noqa: F811
    train = _gimp_loader(cohort)
    for epoch in range(3):
        train.batch_sampler.set_epoch(epoch)
        for batch in train:
            assert bool(triplet_anchors(batch.labels, batch.labels >= 0)[2].any())
            assert len(batch) >= 4


def test_instance_positives_keep_random_batches(cohort):  # noqa: F811
    assert not isinstance(_gimp_loader(cohort, positives="instance").batch_sampler, ClassBalancedBatches)
