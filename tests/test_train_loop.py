"""The shared training loop: resumes bit-identically, is seeded, stops early on val, checkpoints safely."""

from __future__ import annotations

import pytest
import torch
from test_datasets import _cohort

from wsiomics.datasets import DatasetParams, load_fold
from wsiomics.models.batch import ModelOutput
from wsiomics.train import loop
from wsiomics.train.loop import OptimParams, fit
from wsiomics.train.tasks.classify import classify_objective


class TinyMIL(torch.nn.Module):
    """Mean-pooled tokens + genes -> logits, with dropout so the RNG state matters on resume."""

    def __init__(self, in_dim: int, n_genes: int, n_classes: int) -> None:
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(in_dim, 16), torch.nn.GELU(), torch.nn.Dropout(0.3))
        self.gene = torch.nn.Linear(n_genes, 16)
        self.head = torch.nn.Linear(32, n_classes)

    def encoder_parameters(self):
        return list(self.enc.parameters()) + list(self.gene.parameters())

    def forward(self, batch):
        m = batch.token_mask.unsqueeze(-1).float()
        pooled = (self.enc(batch.features) * m).sum(1) / m.sum(1).clamp(min=1)
        return ModelOutput(logits=self.head(torch.cat([pooled, self.gene(batch.genes)], -1)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folds, slides, stores, expr, _ = _cohort(tmp_path_factory.mktemp("cohort"))
    return load_fold(folds, 0, slides, stores, expr)


@pytest.fixture
def tmp_path(tmp_path, cohort):  # every test here also gets the module's cohort through _setup
    _DATA["fold"] = cohort
    return tmp_path


_DATA: dict = {}


def _setup(tmp_path, workers=0, context=None):
    data = _DATA["fold"]
    params = DatasetParams(max_tokens=9, crop="sample", seed=0)
    train = data.loader(data.dataset(("train",), params, train=True), 2, shuffle=True, seed=0, num_workers=workers,
                        multiprocessing_context=context)
    val = data.loader(data.dataset(("val",), params, train=False), 2, shuffle=False)
    return data, train, val


def _run(tmp_path, state, epochs=6, workers=0, context=None, **kw):
    data, train, val = _setup(tmp_path, workers, context)
    torch.manual_seed(0)
    model = TinyMIL(data.feature_dim, len(data.genes), len(data.classes))
    params = OptimParams(epochs=epochs, lr=3e-3, warmup_epochs=1, patience=0, **kw)
    result = fit(model, classify_objective(0.0), train, val, params, state, {"x": 1}, torch.device("cpu"), seed=0)
    return model, result


def test_same_seed_same_weights(tmp_path):
    a, ra = _run(tmp_path, tmp_path / "a.pt")
    b, rb = _run(tmp_path, tmp_path / "b.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]


@pytest.mark.slow
@pytest.mark.parametrize("context", [None, "spawn"])  # None: the platform's default (fork on Linux)
def test_worker_processes_train_the_same_weights(tmp_path, context):
    """Crops and order come from (seed, epoch, patient) in the keys the main process sends, so two persistent
    workers (the dataset pickled into each under spawn) give the very batches, hence weights, of none."""
    a, ra = _run(tmp_path, tmp_path / "a.pt", epochs=3)
    b, rb = _run(tmp_path, tmp_path / "b.pt", epochs=3, workers=2, context=context)
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_killed_run_resumes_bit_identically(tmp_path, monkeypatch):
    straight, _ = _run(tmp_path, tmp_path / "straight.pt")
    saves = []
    real = loop._save_state

    def killed_after_three(path, state):
        real(path, state)
        saves.append(state["epoch"])
        if len(saves) == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop, "_save_state", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tmp_path / "resumed.pt")
    monkeypatch.setattr(loop, "_save_state", real)
    slots = [torch.load(f, weights_only=True)["epoch"] for f in loop.state_slots(tmp_path / "resumed.pt")]
    assert sorted(slots) == [1, 2] and loop.load_state(tmp_path / "resumed.pt")["epoch"] == 2  # safe loading works
    resumed, result = _run(tmp_path, tmp_path / "resumed.pt")
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    for (k, va), vb in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_states_never_rename_onto_a_file_and_a_damaged_slot_falls_back(tmp_path, monkeypatch):
    import os

    real_replace = os.replace

    def replace(src, dst):
        assert not os.path.exists(dst), f"rename onto existing {dst}"
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    _run(tmp_path, tmp_path / "s.pt", epochs=3)
    monkeypatch.setattr(os, "replace", real_replace)
    epoch_of = {f: torch.load(f, weights_only=True)["epoch"] for f in loop.state_slots(tmp_path / "s.pt")}
    newest, older = sorted(epoch_of, key=lambda f: -epoch_of[f])
    newest.write_bytes(b"torn")  # e.g. a disk fault: the previous epoch's state is used
    assert loop.load_state(tmp_path / "s.pt")["epoch"] == 1
    older.write_bytes(b"torn")
    assert loop.load_state(tmp_path / "s.pt") is None


def test_other_config_starts_afresh(tmp_path):
    _run(tmp_path, tmp_path / "s.pt", epochs=2)
    _, result = _run(tmp_path, tmp_path / "s.pt", epochs=3)  # different optimiser settings: digest differs
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


def test_early_stopping_keeps_the_best_val_weights(tmp_path):
    model, result = _run(tmp_path, tmp_path / "e.pt", epochs=10, min_epochs=1)
    vals = [h["val_loss"] for h in result.history]
    assert result.best_epoch == 1 + vals.index(min(vals))
    # fit with patience: stops before the epoch budget once val stops improving
    data, train, val = _setup(tmp_path)
    torch.manual_seed(0)
    m = TinyMIL(data.feature_dim, len(data.genes), len(data.classes))
    r = fit(m, classify_objective(0.0), train, val, OptimParams(epochs=60, lr=3e-2, patience=2, min_epochs=1),
            tmp_path / "p.pt", {}, torch.device("cpu"), seed=0)
    assert r.stopped_early and len(r.history) < 60
    assert len(r.history) - r.best_epoch == 2


def _kill_after(monkeypatch, n_saves: int) -> list[int]:
    """Make fit raise after writing ``n_saves`` epoch states (a killed job); returns the saved epochs."""
    saves: list[int] = []
    real = loop._save_state

    def save(path, state):
        real(path, state)
        saves.append(int(state["epoch"]))
        if len(saves) == n_saves:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop, "_save_state", save)
    return saves


def _fit_with(tmp_path, state, config, epochs=3):
    data, train, val = _setup(tmp_path)
    torch.manual_seed(0)
    model = TinyMIL(data.feature_dim, len(data.genes), len(data.classes))
    params = OptimParams(epochs=epochs, lr=3e-3, warmup_epochs=1, patience=0)
    return fit(model, classify_objective(0.0), train, val, params, state, config, torch.device("cpu"), seed=0)


def test_a_stale_slot_never_shadows_a_matching_one(tmp_path, monkeypatch):
    """The newest slot was written for other data (say, a run killed after the folds changed): the job
    resumes from the older slot that matches, instead of starting afresh or resuming the stale one."""
    key = {"x": 1, "data_fingerprint": {"patients": "a"}}
    _kill_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _fit_with(tmp_path, tmp_path / "s.pt", key)
    stale_slot, good_slot = loop.state_slots(tmp_path / "s.pt")  # epochs 0 and 1 -> slots 0 and 1
    stale = torch.load(good_slot, weights_only=True)
    stale.update(digest="written-for-other-data", epoch=4)
    torch.save(stale, stale_slot)
    saves = _kill_after(monkeypatch, 99)
    result = _fit_with(tmp_path, tmp_path / "s.pt", key)
    assert saves == [2]  # resumed after epoch 2 of 3 from the matching slot
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


def test_execution_settings_resume_but_other_data_starts_afresh(tmp_path, monkeypatch):
    key = {"x": 1, "threads": 1, "num_workers": 0, "device": "cpu", "data_fingerprint": {"patients": "a"}}
    _kill_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _fit_with(tmp_path, tmp_path / "s.pt", key)
    saves = _kill_after(monkeypatch, 99)
    _fit_with(tmp_path, tmp_path / "s.pt", {**key, "threads": 8, "num_workers": 2, "device": "auto"})
    assert saves == [2]  # a resubmitted job on more threads resumes
    saves = _kill_after(monkeypatch, 99)
    _fit_with(tmp_path, tmp_path / "s.pt", {**key, "data_fingerprint": {"patients": "b"}})
    assert saves == [0, 1, 2]  # the finished state of other data is not resumed


def test_clear_state_removes_both_slots_and_the_empty_folder(tmp_path):
    _fit_with(tmp_path, tmp_path / ".state" / "s.pt", {"x": 1}, epochs=2)
    assert all(s.exists() for s in loop.state_slots(tmp_path / ".state" / "s.pt"))
    (tmp_path / ".state" / "other.0.pt").write_bytes(b"another stage's state")
    loop.clear_state(tmp_path / ".state" / "s.pt")
    assert not any(s.exists() for s in loop.state_slots(tmp_path / ".state" / "s.pt"))
    assert (tmp_path / ".state" / "other.0.pt").exists()
    (tmp_path / ".state" / "other.0.pt").unlink()
    loop.clear_state(tmp_path / ".state" / "s.pt")
    assert not (tmp_path / ".state").exists()
