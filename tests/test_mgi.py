"""MGI: InfoNCE, the contrastive model, retrieval metrics, pretraining + evaluation + fine-tuning, resume, CCA."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from test_datasets import grid_coords, write_store

from wsiomics.datasets import load_fold
from wsiomics.models.batch import Batch
from wsiomics.models.mgi import MGI, MGIConfig, info_nce, tile_view
from wsiomics.models.slide_transformer import SlideTransformerConfig
from wsiomics.train import loop
from wsiomics.train.build import build_model
from wsiomics.train.embedding_evaluation import evaluate_embeddings as evaluate_pretrained
from wsiomics.train.evaluate import retrieval_metrics
from wsiomics.train.methods import METHODS, deep_merge, method_config
from wsiomics.train.stages import data_params, finetune, pretrain

N_GENES = 12
FEATURE_DIM = 32
CFG = {
    "seed": 0, "device": "cpu", "threads": 1, "num_workers": 0,
    "data": {"batch_size": 8, "max_tokens": 12, "crop": "window", "cache_mb": 64},
    "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "dropout": 0.0, "head": "linear",
              "gene_encoder": "mamba", "genes_per_token": 3, "d_state": 4, "d_conv": 2, "expand": 2,
              "bidirectional": False, "gene_hidden": 16, "embed_dim": 8, "projection": "linear",
              "temperature": 0.07, "learn_temperature": True, "max_logit_scale": 100.0},
    "pretrain": {"epochs": 12, "lr": 3e-3, "encoder_lr_scale": 1.0, "weight_decay": 0.0, "warmup_epochs": 1,
                 "min_lr_ratio": 0.1, "grad_clip": 1.0, "patience": 0, "min_epochs": 1, "label_smoothing": 0.0},
    "finetune": {"epochs": 15, "lr": 1e-2, "encoder_lr_scale": 0.5, "weight_decay": 0.0, "warmup_epochs": 1,
                 "min_lr_ratio": 0.1, "grad_clip": 1.0, "patience": 0, "min_epochs": 1, "label_smoothing": 0.0},
    "cca": {"pca_components": 4, "components": 2},
    "methods": {},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is several times faster than two on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- pure functions


def test_info_nce_equals_the_hand_computed_value():
    image = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # normalised: e0, e1
    gene = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # normalised: e0, (e0 + e1) / sqrt 2
    s = 2.0
    c = 1 / math.sqrt(2)
    # similarities: i0.g0 = 1, i0.g1 = c, i1.g0 = 0, i1.g1 = c; logits = s * sim
    i2g = (-math.log(math.exp(s) / (math.exp(s) + math.exp(s * c)))
           - math.log(math.exp(s * c) / (math.exp(0) + math.exp(s * c)))) / 2
    g2i = (-math.log(math.exp(s) / (math.exp(s) + math.exp(0)))  # column g0: (1, 0), partner i0
           - math.log(0.5)) / 2  # column g1: (c, c), partner i1
    expected = (i2g + g2i) / 2
    assert abs(float(info_nce(image, gene, s)) - expected) < 1e-6
    assert float(info_nce(image[:0], gene[:0], s)) == 0.0


def test_retrieval_metrics_from_known_embeddings():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))
    perfect = retrieval_metrics(x, x * 3.0)  # identity pairing, scale-free (cosine)
    assert perfect == {"n_retrieval": 7, "recall_i2g@1": 1.0, "recall_i2g@5": 1.0, "recall_g2i@1": 1.0,
                       "recall_g2i@5": 1.0, "recall_chance@1": 1 / 7, "recall_chance@5": 5 / 7}
    eye = np.eye(6)
    # each partner scores 0, one other scores 1 and the 4 others 0 too: the partner is at rank 2..6, each
    # equally likely, so within the top 5 with probability 4/5 (it used to count as a sure hit)
    shifted = retrieval_metrics(eye, np.roll(eye, 1, axis=0))
    assert shifted["recall_i2g@1"] == 0.0 and shifted["recall_g2i@1"] == 0.0
    assert shifted["recall_i2g@5"] == pytest.approx(0.8) and shifted["recall_g2i@5"] == pytest.approx(0.8)
    # a pairing where query 0's partner ranks 3rd of 4
    img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    gene = np.array([[-1.0, 0.1], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    r = retrieval_metrics(img, gene)
    assert r["recall_i2g@1"] == 0.75  # queries 1, 2, 3 find their partner first
    assert retrieval_metrics(np.zeros((0, 3)), np.zeros((0, 3)))["n_retrieval"] == 0


@pytest.mark.parametrize("n", [3, 8])
def test_constant_embeddings_score_chance_not_perfect_recall(n):
    """A collapsed model (every patient on one point) ranks nothing: the expected recall@k over random
    tie-breaks is k / n, which is also the chance level reported beside it."""
    rng = np.random.default_rng(0)
    const = np.tile(rng.normal(size=(1, 4)), (n, 1))
    for gene in (const * 2.0, rng.normal(size=(n, 4))):  # constant on one side is enough for i2g to tie
        r = retrieval_metrics(const, gene)
        assert r["recall_i2g@1"] == pytest.approx(1 / n)
        assert r["recall_i2g@5"] == pytest.approx(min(5, n) / n)
        assert r["recall_g2i@1"] == pytest.approx(1 / n) and r["recall_g2i@5"] == pytest.approx(min(5, n) / n)
        assert r["recall_chance@1"] == pytest.approx(1 / n) and r["recall_chance@5"] == pytest.approx(min(5, n) / n)
    zeros = retrieval_metrics(np.zeros((n, 4)), np.zeros((n, 4)))  # all-zero embeddings: cosine 0 everywhere
    assert zeros["recall_g2i@1"] == pytest.approx(1 / n)


def test_ties_count_as_the_expected_rank_over_random_tie_breaks():
    # image query 0 against 4 gene candidates: its partner (g0) ties with g1 and g2 for first place, g3 is worse.
    # Broken at random, g0 is first with probability 1/3 and within the first 2 with probability 2/3.
    img = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    gene = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [-0.6, 0.8]])
    r = retrieval_metrics(img, gene, ks=(1, 2, 3))
    # query 0: sims (1, 1, 1, -.6): b=0, t=2 -> 1/3, 2/3, 1
    # query 1: sims (0, 0, 0, .8): partner g1 has one better (g3) and two tied (g0, g2): b=1, t=2 -> 0, 1/3, 2/3
    # query 2: sims (.6, .6, .6, .28): b=0, t=2 -> 1/3, 2/3, 1
    # query 3: sims (-1, -1, -1, .6): partner first alone -> 1, 1, 1
    assert r["recall_i2g@1"] == pytest.approx((1 / 3 + 0 + 1 / 3 + 1) / 4)
    assert r["recall_i2g@2"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3 + 1) / 4)
    assert r["recall_i2g@3"] == pytest.approx((1 + 2 / 3 + 1 + 1) / 4)
    assert r["recall_chance@2"] == pytest.approx(0.5)
    # query 0's partner is first and the two others tie behind it, which changes nothing; rows 1 and 2 are the
    # same point on both sides, so each of their queries is a coin toss at k = 1
    r = retrieval_metrics(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]),
                          np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), ks=(1,))
    assert r["recall_i2g@1"] == pytest.approx((1 + 0.5 + 0.5) / 3)


# ---------------------------------------------------------------- model


def _batch(b=4, length=5, d=6, genes=N_GENES, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 3:] = False
    return Batch(features=torch.randn(b, length, d, generator=g), positions=torch.rand(b, length, 2, generator=g) * 4,
                 slide_index=torch.where(mask, 0, -1), token_mask=mask, genes=torch.randn(b, genes, generator=g),
                 has_image=torch.ones(b, dtype=torch.bool), has_gene=torch.ones(b, dtype=torch.bool),
                 labels=torch.tensor([0, 1, 0, 1])[:b], patient_index=torch.arange(b))


def _model(kind="mamba", **kw):
    gene = {"dim": 16, "depth": 1, "genes_per_token": 3}
    if kind == "mamba":
        gene.update(d_state=4, d_conv=2)
    if kind == "mlp":
        gene = {"dim": 16, "hidden": (16,)}
    torch.manual_seed(0)
    return MGI(MGIConfig(image=SlideTransformerConfig(in_dim=6, dim=16, depth=1, heads=2, dropout=0.0),
                         n_genes=N_GENES, n_classes=2, gene_encoder=kind, gene=gene, embed_dim=8, **kw))


@pytest.mark.parametrize("kind", ["mamba", "transformer", "mlp"])
def test_mgi_outputs_and_missing_modalities_leave_the_contrastive_loss(kind):
    model = _model(kind).eval()
    batch = _batch()
    out = model(batch)
    assert out.logits.shape == (4, 2) and out.image.shape == (4, 8) and out.gene.shape == (4, 8)
    # the head reads the encoders' outputs ([CLS] 16 + pooled genes 16), or the two projections (8 + 8)
    assert out.fused.shape == (4, 32) and out.attention.shape == (4, 5)
    assert torch.allclose(out.attention.sum(1), torch.ones(4), atol=1e-5)
    on_projections = _model(kind, head_input="projection").eval()(batch)
    assert on_projections.fused.shape == (4, 16)
    assert torch.allclose(on_projections.fused, torch.cat([on_projections.image, on_projections.gene], 1))
    # patient 3 without expression, patient 2 without slides: the loss is InfoNCE over patients 0 and 1 only
    batch.has_gene[3] = False
    batch.genes[3] = 0
    batch.has_image[2] = False
    batch.token_mask[2] = False
    batch.slide_index[2] = -1
    with torch.no_grad():
        loss = model.pretrain_loss(batch)["loss"]
        img = model.encode_image(batch)[0]
        gene = model.encode_gene(batch)[0]
        expected = float(info_nce(img[:2], gene[:2], model.scale()))
    assert abs(float(loss) - expected) < 1e-5
    batch.features[2] += 5.0  # an excluded patient is not even a negative
    batch.genes[2] += 5.0
    with torch.no_grad():
        assert abs(float(model.pretrain_loss(batch)["loss"]) - float(loss)) < 1e-6
    # fewer than two pairs: zero loss without grad, which tells the training loop to skip the batch
    batch.has_gene[1] = False
    lone = model.pretrain_loss(batch)["loss"]
    assert float(lone) == 0.0 and not lone.requires_grad


def test_temperature_starts_at_0_07_and_is_clamped():
    model = _model()
    assert abs(float(model.scale()) - 1 / 0.07) < 1e-4
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert float(model.scale()) == pytest.approx(100.0)
    fixed = _model(learn_temperature=False)
    assert "logit_scale" not in dict(fixed.named_parameters())
    head = {id(p) for p in fixed.head_parameters()}
    assert head and not head & {id(p) for p in fixed.encoder_parameters()}


def test_contrastive_training_aligns_paired_embeddings():
    """A few steps of InfoNCE on one batch lift image->gene recall@1 to 1 on that batch."""
    model = _model()
    batch = _batch(b=4)
    batch.genes[:, :6] = batch.features.mean(1)  # a learnable image-gene pairing
    # seed-sensitive: at lr 1e-3, 4 to 6 of 8 initialisations reach recall 1 in 200 steps; at 3e-3, 5 to 7 of 8
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        opt.zero_grad()
        model.pretrain_loss(batch)["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert retrieval_metrics(out.image.numpy(), out.gene.numpy())["recall_i2g@1"] == 1.0


def test_tile_view_keeps_a_random_share_of_each_patients_own_tokens_in_order():
    b, length = 3, 10
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[0] = True
    mask[1, :4] = True  # patient 2: no token at all
    ids = torch.arange(b * length, dtype=torch.float32).view(b, length, 1)  # a token's identity as its feature
    batch = Batch(features=ids.expand(b, length, 3).clone(), positions=ids.expand(b, length, 2).clone(),
                  slide_index=torch.where(mask, 0, -1), token_mask=mask, genes=torch.zeros(b, 4),
                  has_image=mask.any(1), has_gene=torch.ones(b, dtype=torch.bool), labels=torch.zeros(b).long(),
                  patient_index=torch.arange(b), tile_targets=torch.zeros(b, length))
    drawn = []
    for seed in range(6):
        view = tile_view(batch, 0.5, torch.Generator().manual_seed(seed))
        assert view.features.shape == (b, 5, 3) and view.tile_targets is None
        assert view.token_mask.sum(1).tolist() == [5, 2, 0]  # ceil(0.5 x n) of each patient's n tokens
        for i in range(2):
            kept = view.features[i, view.token_mask[i], 0]
            own = ids[i, mask[i], 0]
            assert set(kept.tolist()) <= set(own.tolist())  # its own real tokens only, never padding
            assert torch.equal(kept, kept.sort().values)  # raster order kept
            assert torch.equal(view.positions[i, view.token_mask[i], 0], kept)  # positions travel with features
        assert (view.slide_index[~view.token_mask] == -1).all()
        drawn.append(tuple(view.features[1, view.token_mask[1], 0].tolist()))
    assert len(set(drawn)) > 1  # random subsets, not always the first tokens
    again = tile_view(batch, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again.features, tile_view(batch, 0.5, torch.Generator().manual_seed(0)).features)


def test_views_intra_term_and_gene_dropout_in_the_pretraining_loss():
    batch = _batch()
    plain = _model()
    viewed = _model(views=2, view_fraction=0.6, intra_weight=0.5)
    out = viewed.pretrain_loss(batch, torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "infonce", "intra", "logit_scale"}
    assert float(out["loss"]) == pytest.approx(float(out["infonce"]) + 0.5 * float(out["intra"]), rel=1e-5)
    out["loss"].backward()
    assert viewed.image_encoder.cls_token.grad is not None
    # views: 1 (default) sees every token: no randomness, no intra term
    a = plain.pretrain_loss(batch, torch.Generator().manual_seed(0))
    b = plain.pretrain_loss(batch, torch.Generator().manual_seed(1))
    assert set(a) == {"loss", "infonce", "logit_scale"} and float(a["loss"]) == pytest.approx(float(b["loss"]))
    # gene dropout zeroes about that share of the genes the encoder sees, drawn from the generator
    seen = []
    dropping = _model(gene_dropout=0.5)
    dropping.encode_gene = lambda bt: (seen.append(bt.genes.clone()), plain.encode_gene(bt))[1]
    dropping.pretrain_loss(batch, torch.Generator().manual_seed(0))
    zeroed = float((seen[0] == 0).float().mean())
    assert 0.3 < zeroed < 0.7
    kept = seen[0] != 0
    assert torch.equal(seen[0][kept], batch.genes[kept])
    with pytest.raises(ValueError, match="views: 2"):
        _model(intra_weight=1.0)
    with pytest.raises(ValueError, match="view_fraction"):
        _model(views=2, view_fraction=0.0)


def _padded(batch, extra=3, fill=7.0):
    """``batch`` with ``extra`` padded tokens appended to every patient, holding garbage features and positions."""
    b, _, d = batch.features.shape
    pad = lambda x, value: torch.cat([x, torch.full((b, extra, *x.shape[2:]), value, dtype=x.dtype)], 1)  # noqa: E731
    return Batch(features=pad(batch.features, fill), positions=pad(batch.positions, 50.0),
                 slide_index=pad(batch.slide_index, -1), token_mask=pad(batch.token_mask, False), genes=batch.genes,
                 has_image=batch.has_image, has_gene=batch.has_gene, labels=batch.labels,
                 patient_index=batch.patient_index)


def test_image_pooling_default_is_the_cls_token_unchanged():
    """``image_pooling: cls`` (the default) is the [CLS] path bit for bit: the projection of the masked [CLS]."""
    assert MGIConfig(image=SlideTransformerConfig(in_dim=6), n_genes=3, n_classes=2).image_pooling == "cls"
    model = _model().eval()
    batch = _batch()
    batch.has_image[2] = False
    with torch.no_grad():
        image, out, _, slide = model.encode_image(batch)
        enc = model.image_encoder
        cls, _ = enc.encode(enc.embed(model.feature_norm(batch.features)), batch.positions, batch.token_mask)
        cls = torch.where(batch.has_image[:, None], cls, model.image_missing)
        assert torch.equal(slide, cls) and torch.equal(image, model.image_proj(cls))
        assert torch.equal(model(batch).fused[:, :16], cls)
        explicit = _model(image_pooling="cls").eval()
        assert torch.equal(explicit(batch).image, model(batch).image)
    with pytest.raises(ValueError, match="image_pooling"):
        _model(image_pooling="mean")


def test_image_pooling_cls_mean_adds_the_masked_mean_of_the_embedded_tiles():
    model = _model(image_pooling="cls_mean").eval()
    plain = _model().eval()  # same seed: same weights
    batch = _batch()  # patient 1 has 3 of its 5 tokens
    batch.has_image[2] = False
    batch.token_mask[2] = False
    batch.slide_index[2] = -1
    with torch.no_grad():
        image, _, _, slide = model.encode_image(batch)
        tokens = model.image_encoder.embed(model.feature_norm(batch.features))
        cls = plain.encode_image(batch)[3]
        for i in (0, 1, 3):
            mean = tokens[i, batch.token_mask[i]].mean(0)
            assert torch.allclose(slide[i], cls[i] + mean, atol=1e-6)
        # (c) a patient without image still gets the learned missing-image vector
        assert torch.equal(slide[2], model.image_missing) and torch.equal(slide[2], cls[2])
        assert torch.allclose(image, model.image_proj(slide)) and torch.equal(model(batch).fused[:, :16], slide)
        # (b) padded tokens change nothing, whatever they hold
        padded = model.encode_image(_padded(batch))
        assert torch.allclose(padded[3], slide, atol=1e-5) and torch.allclose(padded[0], image, atol=1e-5)


# ---------------------------------------------------------------- end to end on a tiny on-disk cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("mgi_cohort"))


def make_cohort(root):
    """16 patients; two continuous latent factors drive image features and genes alike; label = a shift in
    both. P14 has expression only, P15 slides only."""
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(3, FEATURE_DIM))  # latent factors and label spread over every feature dimension
    slides, expr_ids, expr_rows, rows = [], [], [], []
    roles = ["train"] * 9 + ["val"] * 3 + ["test"] * 4
    for i in range(16):
        pid, label = f"P{i:02d}", "ab"[i % 2]
        shift = 1.5 if label == "b" else -1.5
        z = rng.uniform(-2, 2, size=2)
        rows.append({"patient_id": pid, "fold": 0, "role": roles[(i * 7) % 16], "label": label})
        if i != 14:
            sid = f"{pid}-S0"
            slides.append({"patient_id": pid, "slide_id": sid})
            coords = grid_coords(4, 3, 224)
            feats = rng.normal(scale=0.3, size=(len(coords), FEATURE_DIM)) + np.r_[z, shift] @ mix
            write_store(root / "features" / f"{sid}.zarr", coords, feats, 224.0)
        if i != 15:
            g = rng.normal(scale=0.3, size=N_GENES)
            g[:2] += z
            g[2:4] += shift
            expr_ids.append(pid)
            expr_rows.append(g)
    adata = ad.AnnData(X=np.array(expr_rows, np.float32), obs=pd.DataFrame(index=expr_ids),
                       var=pd.DataFrame(index=[f"G{j}" for j in range(N_GENES)]))
    adata.write_zarr(root / "fold0.zarr")
    return pd.DataFrame(rows), pd.DataFrame(slides), root / "features", root / "fold0.zarr"


def _data(cohort, modalities=("image", "gene")):
    folds, slides, features, expr = cohort
    return load_fold(folds, 0, slides, features if "image" in modalities else None,
                     expr if "gene" in modalities else None)


@pytest.mark.slow
def test_mgi_pretrain_evaluates_retrieval_then_finetunes(cohort, tmp_path):
    cfg = method_config(CFG, "mgi")
    assert cfg["model"]["gene_encoder"] == "mamba"
    data = _data(cohort)
    out = tmp_path / "mgi" / "fold0"
    pretrain("mgi", cfg, data, out)
    pre = json.loads((out / "pretrain" / "metrics.json").read_text())
    paired_test = sorted(p.patient_id for p in data.role("test") if p.slides and p.genes is not None)
    assert pre["n_retrieval"] == len(paired_test)
    emb = zarr.open_group(str(out / "pretrain" / "embeddings.zarr"), mode="r")
    assert sorted(emb["patient_id"][:]) == sorted(p.patient_id for p in data.patients)
    assert emb["image"].shape == (16, 8) and emb["gene"].shape == (16, 8)
    # the metrics are those of the stored test embeddings, counted here by brute force: a query's partner is
    # within the top k when fewer than k other candidates are more cosine-similar to the query
    ids, roles = list(emb["patient_id"][:]), list(emb["role"][:])
    idx = [ids.index(p) for p in paired_test]
    assert all(roles[i] == "test" for i in idx)
    img, gene = emb["image"][:][idx], emb["gene"][:][idx]
    img, gene = img / np.linalg.norm(img, axis=1, keepdims=True), gene / np.linalg.norm(gene, axis=1, keepdims=True)
    for name, queries, candidates in (("i2g", img, gene), ("g2i", gene, img)):
        for k in (1, 5):
            hits = [sum(float(queries[i] @ c) > float(queries[i] @ candidates[i]) for c in candidates) < k
                    for i in range(len(queries))]
            assert pre[f"recall_{name}@{k}"] == pytest.approx(np.mean(hits)), (name, k)

    finetune("mgi", cfg, data, out, pretrained=out / "pretrain" / "model.pt")
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("recall_i2g@1", "recall_i2g@5", "recall_g2i@1", "recall_g2i@5", "n_retrieval",
                "linear_probe_balanced_accuracy"):
        assert metrics[key] == pre[key], key  # retrieval is the pretrained model's, not the fine-tuned one's
    assert metrics["balanced_accuracy"] >= 0.75, metrics
    pred = pd.read_csv(out / "predictions.tsv", sep="\t")
    assert len(pred) == len(data.role("test"))


@pytest.mark.slow
def test_killed_mgi_pretraining_resumes_bit_identically(cohort, tmp_path, monkeypatch):
    cfg = deep_merge(method_config(CFG, "mgi"), {"pretrain": {"epochs": 4}})
    data = _data(cohort)
    pretrain("mgi", cfg, data, tmp_path / "straight")
    saves = []
    real = loop._save_state

    def killed_after_two(path, state):
        real(path, state)
        saves.append(state["epoch"])
        if len(saves) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop, "_save_state", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        pretrain("mgi", cfg, data, tmp_path / "resumed")
    monkeypatch.setattr(loop, "_save_state", real)
    assert not (tmp_path / "resumed" / "pretrain" / "model.pt").exists()
    info = pretrain("mgi", cfg, data, tmp_path / "resumed")
    assert info["epochs"] == 4
    a = torch.load(tmp_path / "straight" / "pretrain" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "pretrain" / "model.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = pd.read_csv(tmp_path / "straight" / "pretrain" / "history.tsv", sep="\t")
    hb = pd.read_csv(tmp_path / "resumed" / "pretrain" / "history.tsv", sep="\t")
    pd.testing.assert_series_equal(ha["train_loss"], hb["train_loss"])


@pytest.mark.parametrize("name", ["mgi_transformer_genes", "mgi_mlp_genes"])
def test_gene_encoder_ablations_pretrain(cohort, tmp_path, name):
    cfg = deep_merge(method_config(CFG, name), {"pretrain": {"epochs": 2}})
    assert cfg["model"]["gene_encoder"] == METHODS[name].overrides["model"]["gene_encoder"]
    pretrain(name, cfg, _data(cohort), tmp_path)
    state = torch.load(tmp_path / "pretrain" / "model.pt", weights_only=True)
    kind = cfg["model"]["gene_encoder"]
    assert any(k.startswith("gene_encoder.blocks") for k in state["model"]) == (kind == "transformer")
    assert json.loads((tmp_path / "pretrain" / "metrics.json").read_text())["n_retrieval"] >= 2


def test_mgi_no_pretrain_reports_the_initial_models_retrieval(cohort, tmp_path):
    cfg = deep_merge(method_config(CFG, "mgi_no_pretrain"), {"finetune": {"epochs": 2}})
    finetune("mgi_no_pretrain", cfg, _data(cohort), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pretrain"]["stage"].startswith("initial") and "recall_i2g@5" in metrics
    assert metrics["recall_chance@1"] == pytest.approx(1 / metrics["n_retrieval"])  # beside the recall, top level


def test_image_pooling_auto_is_resolved_on_the_pretraining_pool_alike_in_every_stage(cohort, tmp_path, monkeypatch):
    """``image_pooling: auto`` counts the paired patients of the fold's pretraining pool (train + unlabelled
    under ``pool: all``; never val or test, never a patient missing a modality) whatever the stage, so the
    fine-tune builds the pooling its checkpoint was pretrained with, and every checkpoint records the value."""
    from wsiomics.train import build
    from wsiomics.train.loop import load_model_state

    folds, *rest = cohort
    train_ids = sorted(folds.loc[folds["role"] == "train", "patient_id"])
    folds = folds.copy()
    folds.loc[folds["patient_id"].isin(train_ids[:3]), ["role", "label"]] = ["unlabelled", ""]
    data = _data((folds, *rest))
    paired = {p.patient_id for p in data.patients if p.slides and p.genes is not None}
    pool = sum(p.role in ("train", "unlabelled") and p.patient_id in paired for p in data.patients)
    assert build.pretraining_pairs({"pretrain": {"pool": "all"}}, data) == pool
    assert build.pretraining_pairs({"pretrain": {"pool": "labelled"}}, data) == pool - 3
    monkeypatch.setattr(build, "CLS_MEAN_FROM_PAIRS", pool)  # the pool reaches it; its train patients alone do not

    cfg = deep_merge(method_config(CFG, "mgi"), {"model": {"image_pooling": "auto"}, "pretrain": {"epochs": 1},
                                                 "finetune": {"epochs": 1}})
    pretrain("mgi", cfg, data, tmp_path)
    finetune("mgi", cfg, data, tmp_path, pretrained=tmp_path / "pretrain" / "model.pt")
    for path in (tmp_path / "pretrain" / "model.pt", tmp_path / "model.pt"):
        assert load_model_state(path)["metadata"]["config"]["model"]["image_pooling"] == "cls_mean", path
    assert build.resolve_fold_settings(deep_merge(cfg, {"pretrain": {"pool": "labelled"}}),
                                       data)["model"]["image_pooling"] == "cls"
    monkeypatch.setattr(build, "CLS_MEAN_FROM_PAIRS", pool + 1)
    assert build.resolve_fold_settings(cfg, data)["model"]["image_pooling"] == "cls"
    assert build.build_model(METHODS["mgi"], cfg, data).cfg.image_pooling == "cls"  # resolved on a direct build too
    explicit = deep_merge(cfg, {"model": {"image_pooling": "cls_mean"}})
    assert build.resolve_fold_settings(explicit, data) is explicit  # a concrete choice is the user's


def test_a_collapsed_model_retrieves_at_chance(cohort):
    """Projection heads that map every patient to one point: recall@1 is 1 / n, not 1."""
    data = _data(cohort)
    cfg = deep_merge(method_config(CFG, "mgi"), {"model": {"projection": "linear"}})
    torch.manual_seed(0)
    model = build_model(METHODS["mgi"], cfg, data)
    with torch.no_grad():
        for proj in (model.image_proj, model.gene_proj):
            proj.weight.zero_()
            proj.bias.fill_(0.5)
    metrics, _ = evaluate_pretrained(model, data, torch.device("cpu"), data_params(cfg, 0), 0, retrieval=True)
    n = metrics["n_retrieval"]
    assert n >= 3
    for d in ("i2g", "g2i"):
        assert metrics[f"recall_{d}@1"] == pytest.approx(1 / n)
    assert metrics["recall_chance@1"] == pytest.approx(1 / n)


def test_cca_retrieval_and_predictions(cohort, tmp_path):
    data = _data(cohort)
    finetune("cca", method_config(CFG, "cca"), data, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    paired_test = [p for p in data.role("test") if p.slides and p.genes is not None]
    assert metrics["n_retrieval"] == len(paired_test)
    assert metrics["recall_i2g@1"] >= 0.5, metrics  # the latent factors are linear in both modalities
    assert metrics["balanced_accuracy"] >= 0.75, metrics
    assert metrics["training"]["train_canonical_correlations"][0] > 0.9
    pred = pd.read_csv(tmp_path / "predictions.tsv", sep="\t")
    assert sorted(pred["patient_id"]) == sorted(p.patient_id for p in data.role("test"))
    emb = zarr.open_group(str(tmp_path / "embeddings.zarr"), mode="r")
    assert emb["image"].shape == (len(data.role("test")), 2)


@pytest.mark.parametrize("labels", ["none", "one_class"])
def test_cca_on_a_label_free_cohort_reports_retrieval_only(cohort, tmp_path, labels):
    """Retrieval needs no label: without two classes cca still writes its contract, with no predictions (a
    one-class 'accuracy' of 1.0 would be meaningless) and its retrieval metrics."""
    folds, *rest = cohort
    data = _data((folds.assign(label="" if labels == "none" else "a"), *rest))
    finetune("cca", method_config(CFG, "cca"), data, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["recall_i2g@1"] >= 0.5 and metrics["n_retrieval"] > 0, metrics
    assert metrics["balanced_accuracy"] is None and metrics["n_test"] == 0
    pred = pd.read_csv(tmp_path / "predictions.tsv", sep="\t")
    assert pred.empty and [c for c in pred.columns if c.startswith("prob_")] == [f"prob_{c}" for c in data.classes]
    emb = zarr.open_group(str(tmp_path / "embeddings.zarr"), mode="r")
    assert emb["image"].shape == (len(data.role("test")), 2)


def test_mgi_pretrains_on_a_label_free_cohort(cohort, tmp_path):
    """MGI's pretraining (InfoNCE) and its retrieval need no label: the workflow runs it on a label-free cohort
    (for mgi_seg, and the summary's retrieval row); the linear probe is left empty."""
    folds, *rest = cohort
    cfg = deep_merge(method_config(CFG, "mgi"), {"pretrain": {"epochs": 2}})
    pretrain("mgi", cfg, _data((folds.assign(label=""), *rest)), tmp_path)
    metrics = json.loads((tmp_path / "pretrain" / "metrics.json").read_text())
    assert metrics["n_retrieval"] > 0 and metrics["recall_i2g@5"] is not None
    assert metrics["linear_probe_balanced_accuracy"] is None
