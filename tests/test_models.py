"""Model-level tests: attention blocks, slide transformer, GMSA gene encoder, ABMIL, GiMP and the baselines.

Tiny widths on CPU; every check compares numbers that a wrong model would get wrong.
"""

from __future__ import annotations

import math
import resource
import time

import pytest
import torch

from wsiomics.models.abmil import ABMIL, ABMILConfig
from wsiomics.models.baselines import (
    GeneOnly,
    GeneOnlyConfig,
    ImageOnlyMIL,
    ImageOnlyMILConfig,
    LateFusion,
    LateFusionConfig,
)
from wsiomics.models.batch import Batch
from wsiomics.models.blocks import CrossAttentionBlock, DropPath, Mlp, SelfAttentionBlock, trunc_normal_
from wsiomics.models.gene_gmsa import GeneGMSA, GeneGMSAConfig, group_index
from wsiomics.models.gimp import GiMP, GiMPConfig, batch_hard_triplet_loss, mpm_loss, span_mask
from wsiomics.models.slide_transformer import SlideTransformer, SlideTransformerConfig, sincos_2d

ATOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run much faster on one thread (no OpenMP hand-off per op on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pad_pair(long_n: int, short_n: int, din: int, seed: int = 0):
    """Two patients, the second shorter and padded: features, positions, token_mask."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, long_n, din, generator=g)
    pos = torch.randint(0, 30, (2, long_n, 2), generator=g).float()
    mask = torch.ones(2, long_n, dtype=torch.bool)
    mask[1, short_n:] = False
    feats[1, short_n:] = 123.0  # garbage at padding must not leak
    pos[1, short_n:] = -7.0
    return feats, pos, mask


def make_batch(slides: list[list[int]], din: int = 12, n_genes: int = 20, has_gene: list[bool] | None = None,
               labels: list[int] | None = None, seed: int = 0, pad_to: int | None = None) -> Batch:
    """A padded batch laid out as wsiomics.datasets does: per patient, its slides one after another.

    ``slides[i]`` lists the token counts of patient i's slides ([] = no image). Positions are a raster
    grid per slide (8 columns). Padding carries garbage features so that a leak would show.
    """
    g = torch.Generator().manual_seed(seed)
    b = len(slides)
    n_max = max([sum(s) for s in slides] + [1, pad_to or 0])
    features = torch.full((b, n_max, din), 77.0)
    positions = torch.full((b, n_max, 2), -3.0)
    slide_index = torch.full((b, n_max), -1, dtype=torch.long)
    for i, lens in enumerate(slides):
        k = 0
        for j, n in enumerate(lens):
            features[i, k:k + n] = torch.randn(n, din, generator=g) + i  # patients differ
            r = torch.arange(n)
            positions[i, k:k + n] = torch.stack([r % 8, r // 8], -1).float()
            slide_index[i, k:k + n] = j
            k += n
    has_gene_t = torch.ones(b, dtype=torch.bool) if has_gene is None else torch.tensor(has_gene)
    genes = torch.randn(b, n_genes, generator=g) * has_gene_t[:, None]
    return Batch(features=features, positions=positions, slide_index=slide_index, token_mask=slide_index >= 0,
                 genes=genes, has_image=torch.tensor([sum(s) > 0 for s in slides]), has_gene=has_gene_t,
                 labels=torch.tensor(labels if labels is not None else [i % 2 for i in range(b)]),
                 patient_index=torch.arange(b))


def select(batch: Batch, i: int) -> Batch:
    """Patient i alone, unpadded (as a batch of one)."""
    n = int(batch.token_mask[i].sum())
    sl = slice(0, max(n, 1))
    return Batch(features=batch.features[i:i + 1, sl], positions=batch.positions[i:i + 1, sl],
                 slide_index=batch.slide_index[i:i + 1, sl], token_mask=batch.token_mask[i:i + 1, sl],
                 genes=batch.genes[i:i + 1], has_image=batch.has_image[i:i + 1], has_gene=batch.has_gene[i:i + 1],
                 labels=batch.labels[i:i + 1], patient_index=batch.patient_index[i:i + 1])


# ---------------------------------------------------------------- blocks


def test_mlp_drop_path_and_init_match_timm_layers():
    """Our Mlp is timm's (same parameter names, so the same state dict and output); trunc_normal_ draws
    timm's values; DropPath drops whole samples and keeps the expectation, like timm's."""
    timm_layers = pytest.importorskip("timm.layers")
    ours_init, ref_init = torch.empty(3, 50), torch.empty(3, 50)
    torch.manual_seed(0)
    trunc_normal_(ours_init, std=0.02)
    torch.manual_seed(0)
    timm_layers.trunc_normal_(ref_init, std=0.02)
    torch.testing.assert_close(ours_init, ref_init)
    assert ours_init.abs().max() <= 2.0
    ours, ref = Mlp(6, 10, 3, drop=(0.1, 0.0)), timm_layers.Mlp(6, 10, 3, drop=(0.1, 0.0))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 5, 6)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))

    drop = DropPath(0.25)
    y = torch.ones(4000, 3, 2)
    assert torch.equal(drop.eval()(y), y)
    out = drop.train()(y)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # a sample is dropped whole
    assert abs(out.mean().item() - 1.0) < 0.05 and 0.2 < (per_sample[:, 0] == 0).float().mean().item() < 0.3


def test_self_attention_block_ignores_masked_keys():
    torch.manual_seed(0)
    block = SelfAttentionBlock(16, 4, dropout=0.0).eval()
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[True, True, True, False, False, True]])
    ref = block(x, mask)
    x2 = x.clone()
    x2[0, 3:5] = 1e3 * torch.randn(2, 16)  # change only masked keys
    out = block(x2, mask)
    assert torch.allclose(ref[0, mask[0]], out[0, mask[0]], atol=ATOL)


def test_cross_attention_empty_context_is_a_zero_update():
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 2, context_dim=8, dropout=0.0).eval()
    x = torch.randn(2, 5, 16, requires_grad=True)
    ctx = torch.randn(2, 3, 8)
    cmask = torch.tensor([[True, False, True], [False, False, False]])
    out = block(x, ctx, cmask)
    assert torch.isfinite(out).all()
    # the empty-context row is the residual through the MLP only: same as with any context, as long as masked
    out_other = block(x, torch.randn(2, 3, 8) * 50, cmask)
    assert torch.allclose(out[1], out_other[1], atol=ATOL)
    expected = x[1] + block.mlp(block.norm2(x[1]))
    assert torch.allclose(out[1], expected, atol=ATOL)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- slide transformer


def _slide_model(**kw) -> SlideTransformer:
    torch.manual_seed(0)
    cfg = SlideTransformerConfig(in_dim=12, dim=16, depth=2, heads=2, dropout=0.0, **kw)
    return SlideTransformer(cfg).eval()


def test_sincos_depends_on_grid_position_only():
    pos = torch.tensor([[0.0, 0.0], [3.0, 5.0], [2.5, 1.0]])
    enc = sincos_2d(pos, 16)
    assert enc.shape == (3, 16)
    assert torch.allclose(enc[0], sincos_2d(torch.zeros(2), 16))
    assert not torch.allclose(enc[1], enc[2])
    # swapping col and row changes the encoding (the two axes are distinct)
    assert not torch.allclose(sincos_2d(torch.tensor([3.0, 5.0]), 16), sincos_2d(torch.tensor([5.0, 3.0]), 16))


def test_positional_encoding_independent_of_scan_resolution():
    model = _slide_model()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 9, 12, generator=g)
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="xy"), -1).reshape(1, 9, 2)
    patch20, patch40 = 256, 512  # the same tissue: a 40x scan has twice the level-0 pixels per patch
    coords20, coords40 = grid * patch20, grid * patch40
    assert not torch.equal(coords20, coords40)
    with torch.no_grad():
        cls20, tok20 = model(feats, coords20 / patch20)
        cls40, tok40 = model(feats, coords40 / patch40)
        cls_shift, _ = model(feats, grid + torch.tensor([4.0, 0.0]))
        cls_nopos, _ = _slide_model(pos_encoding="none")(feats, grid + 4.0)
        cls_nopos0, _ = _slide_model(pos_encoding="none")(feats, grid)
    assert torch.equal(cls20, cls40) and torch.equal(tok20, tok40)
    assert (cls20 - cls_shift).abs().max() > 1e-3  # shifting the grid changes the output
    assert torch.allclose(cls_nopos, cls_nopos0, atol=ATOL)  # "none" ignores positions


def test_slide_transformer_padding_does_not_change_a_patient():
    model = _slide_model()
    feats, pos, mask = _pad_pair(11, 6, 12)
    with torch.no_grad():
        cls, tok, att = model.encode_with_attention(model.embed(feats), pos, mask)
        cls1, tok1, att1 = model.encode_with_attention(model.embed(feats[1:, :6]), pos[1:, :6], None)
        cls0, _, _ = model.encode_with_attention(model.embed(feats[:1]), pos[:1], mask[:1])
    assert torch.allclose(cls[1], cls1[0], atol=ATOL)
    assert torch.allclose(tok[1, :6], tok1[0], atol=ATOL)
    assert torch.allclose(att[1, :6], att1[0], atol=ATOL)
    assert torch.allclose(cls[0], cls0[0], atol=ATOL)
    assert torch.all(att[1, 6:] == 0)


def test_cls_attention_sums_to_one_over_valid_tokens():
    model = _slide_model()
    with torch.no_grad():  # sharpen attention so a wrong normalisation would show
        for block in model.blocks:
            block.attn.q.weight.normal_(0, 1.0)
            block.attn.kv.weight.normal_(0, 1.0)
    feats, pos, mask = _pad_pair(10, 4, 12, seed=3)
    mask = torch.cat([mask, torch.zeros(1, 10, dtype=torch.bool)])  # a patient with no tokens at all
    feats, pos = torch.cat([feats, feats[:1]]), torch.cat([pos, pos[:1]])
    with torch.no_grad():
        att = model.cls_attention(model.embed(feats), pos, mask)
        _, _, att_again = model.encode_with_attention(model.embed(feats), pos, mask)
    assert att.shape == (3, 10)
    assert torch.allclose(att[:2].sum(1), torch.ones(2), atol=1e-5)
    assert torch.all(att[~mask] == 0) and torch.all(att[2] == 0)
    assert att[0].max() > 0.2  # not uniform: the check above is not vacuous
    assert torch.equal(att, att_again)


@pytest.mark.slow
def test_slide_transformer_memory_is_linear_in_tokens():
    """L=20,000 tokens: a (L, L) fp32 score matrix per head would be 1.6 GB; SDPA never builds one."""
    torch.set_num_threads(2)  # one long attention: worth both cores
    torch.manual_seed(0)
    model = SlideTransformer(SlideTransformerConfig(in_dim=32, dim=32, depth=1, heads=1, dropout=0.0)).eval()
    n = 20_000
    feats = torch.randn(1, n, 32)
    pos = torch.stack([torch.arange(n) % 200, torch.arange(n) // 200], -1).float()[None]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    start = time.perf_counter()
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, -1] = False  # one padded token: the key-padding-mask path, the one that could fall back to (L, L)
    with torch.no_grad():
        cls, tok, att = model.encode_with_attention(model.embed(feats), pos, mask)
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert torch.isfinite(cls).all() and tok.shape == (1, n, 32) and att[0, -1] == 0
    assert math.isclose(float(att.sum()), 1.0, rel_tol=1e-4)
    assert grown < 800, f"peak RSS grew by {grown:.0f} MiB"
    assert seconds < 60


# ---------------------------------------------------------------- GMSA gene encoder


def test_contiguous_groups_are_even_and_cover_every_gene_once():
    index, valid = group_index(GeneGMSAConfig(n_genes=10, n_groups=4))
    groups = [index[g][valid[g]].tolist() for g in range(4)]
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    index, valid = group_index(GeneGMSAConfig(n_genes=3, n_groups=5))  # fewer genes than groups
    assert valid.sum(1).tolist() == [1, 1, 1, 0, 0]


def test_gmsa_group_embedding_uses_per_group_weights():
    torch.manual_seed(0)
    cfg = GeneGMSAConfig(n_genes=10, n_groups=4, dim=8, depth=1, heads=2, dropout=0.0)
    model = GeneGMSA(cfg).eval()
    genes = torch.randn(3, 10)
    tokens = model.embed(genes)  # (3, 4, 8)
    index, valid = group_index(cfg)
    for g in range(4):  # reference: an explicit linear per group
        w = model.group_weight[g][valid[g]]  # (size_g, D)
        ref = genes[:, index[g][valid[g]]] @ w + model.group_bias[g] + model.group_embed[0, g]
        assert torch.allclose(tokens[:, g], ref, atol=ATOL)
    genes2 = genes.clone()
    genes2[:, 4] += 5.0  # gene 4 is in group 1 only
    changed = (model.embed(genes2) - tokens).abs().amax(dim=(0, 2))
    assert changed[1] > 1e-3 and torch.all(changed[[0, 2, 3]] == 0)


def test_gmsa_gene_set_groups_drop_unassigned_genes_and_mask_empty_groups():
    torch.manual_seed(0)
    assign = (0, 0, 1, -1, 1, 3, 3, -1)  # group 2 is empty, genes 3 and 7 are dropped
    model = GeneGMSA(GeneGMSAConfig(n_genes=8, n_groups=4, dim=8, depth=2, heads=2, dropout=0.0,
                                    group_of_gene=assign)).eval()
    assert model.group_valid.tolist() == [True, True, False, True]
    genes = torch.randn(2, 8)
    cls, tokens = model(genes)
    assert cls.shape == (2, 8) and tokens.shape == (2, 4, 8)
    genes2 = genes.clone()
    genes2[:, [3, 7]] = 99.0
    assert torch.equal(model(genes2)[0], cls)  # dropped genes have no effect
    with torch.no_grad():
        model.group_embed[0, 2] += 50.0  # the empty group's token is not a key for anyone
    assert torch.allclose(model(genes)[0], cls, atol=ATOL)
    genes3 = genes.clone()
    genes3[:, 5] += 3.0
    assert (model(genes3)[0] - cls).abs().max() > 1e-4  # a kept gene matters
    with pytest.raises(ValueError, match="one group index per gene"):
        GeneGMSAConfig(n_genes=8, n_groups=4, group_of_gene=(0, 1))


def test_gmsa_patients_are_independent_in_a_batch():
    torch.manual_seed(0)
    model = GeneGMSA(GeneGMSAConfig(n_genes=20, n_groups=4, dim=8, depth=2, heads=2, dropout=0.0)).eval()
    genes = torch.randn(3, 20)
    genes[1] = 0.0  # a patient without expression: zeros, as the batch carries it
    with torch.no_grad():
        cls, tokens = model(genes)
        for i in range(3):
            c, t = model(genes[i:i + 1])
            assert torch.allclose(cls[i], c[0], atol=ATOL) and torch.allclose(tokens[i], t[0], atol=ATOL)
    assert torch.isfinite(cls).all()


# ---------------------------------------------------------------- ABMIL


def test_abmil_padding_and_empty_bags():
    torch.manual_seed(0)
    model = ABMIL(ABMILConfig(in_dim=12, dim=16, attn_dim=8, dropout=0.0)).eval()
    with torch.no_grad():
        for layer in (model.proj[0], model.attn_v[0], model.attn_u[0], model.attn_w):
            layer.weight.normal_(0, 1.0)  # peaked attention, so the checks below are not on a uniform one
    feats, _, mask = _pad_pair(9, 5, 12)
    feats = torch.cat([feats, torch.randn(1, 9, 12)]).requires_grad_(True)
    mask = torch.cat([mask, torch.zeros(1, 9, dtype=torch.bool)])  # patient 2: no tokens at all
    pooled, att = model(feats, mask)
    alone, att_alone = model(feats[1:2, :5].detach(), None)
    assert torch.allclose(pooled[1], alone[0], atol=ATOL) and torch.allclose(att[1, :5], att_alone[0], atol=ATOL)
    assert torch.allclose(att[:2].sum(1), torch.ones(2), atol=1e-6)
    assert torch.all(att[~mask] == 0) and att[0].max() > 0.2
    assert torch.all(pooled[2] == 0) and torch.all(att[2] == 0)
    # pooled is the attention-weighted mean of the projected tokens
    h = model.proj(feats[0])
    assert torch.allclose(pooled[0], att[0] @ h, atol=ATOL)
    pooled.sum().backward()
    assert torch.isfinite(feats.grad).all() and torch.all(feats.grad[2] == 0)


# ---------------------------------------------------------------- GiMP: masking and losses


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    runs, start = [], None
    for k, f in enumerate([*flags, False]):
        if f and start is None:
            start = k
        elif not f and start is not None:
            runs.append((start, k - start))
            start = None
    return runs


def test_span_mask_one_contiguous_span_per_slide_clipped_never_padding():
    # patient 0: slides of 10 and 3 tokens; 1: one slide of 20; 2: slides of 1 and 5 tokens; 3: no slide
    batch = make_batch([[10, 3], [20], [1, 5], []])
    mask_length = 4
    starts: dict[tuple[int, int], set[int]] = {}
    for seed in range(60):
        masked = span_mask(batch.slide_index, batch.token_mask, mask_length, torch.Generator().manual_seed(seed))
        assert masked.shape == batch.token_mask.shape and masked.dtype == torch.bool
        assert not (masked & ~batch.token_mask).any()  # never padding
        for i in range(4):
            for j in range(int(batch.slide_index[i].max()) + 1):
                in_slide = batch.slide_index[i] == j
                n = int(in_slide.sum())
                runs = _runs(masked[i][in_slide].tolist())
                expected = min(mask_length, n - 1)  # clipped so one token stays visible
                if expected == 0:
                    assert runs == []
                    continue
                assert len(runs) == 1, (i, j, runs)  # one contiguous span per slide
                start, length = runs[0]
                assert length == expected and start + length <= n
                starts.setdefault((i, j), set()).add(start)
        again = span_mask(batch.slide_index, batch.token_mask, mask_length, torch.Generator().manual_seed(seed))
        assert torch.equal(masked, again)  # deterministic given the generator
    assert starts[(0, 0)] == set(range(0, 10 - 4 + 1))  # every admissible start is drawn
    assert starts[(0, 1)] == {0, 1}  # 3 tokens: span of 2, start 0 or 1
    assert starts[(2, 1)] == {0, 1}  # 5 tokens: span of 4, start 0 or 1
    assert starts[(1, 0)] == set(range(0, 17))


def test_mpm_loss_counts_masked_positions_only():
    pred = torch.zeros(1, 4, 2, requires_grad=True)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [5.0, 5.0], [9.0, 9.0]]])
    masked = torch.tensor([[True, True, False, False]])
    loss = mpm_loss(pred, target, masked)
    assert math.isclose(loss.item(), (1 + 1 + 4 + 0) / 4)  # mean over 2 masked tokens x 2 features
    other = pred.detach().clone()
    other[0, 2:] = 1e6  # changing unmasked predictions does not change the loss
    assert mpm_loss(other, target, masked).item() == loss.item()
    none = mpm_loss(pred, target, torch.zeros(1, 4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert torch.all(pred.grad == 0)


def test_batch_hard_triplet_matches_hand_computed_value():
    # unit directions at 0, 60, 90 and 180 degrees, scaled (the loss normalises); ids 0, 0, 1, 1.
    deg = torch.tensor([0.0, 60.0, 90.0, 180.0]) * math.pi / 180
    scale = torch.tensor([2.0, 1.0, 3.0, 0.5])
    emb = (torch.stack([deg.cos(), deg.sin()], 1) * scale[:, None]).requires_grad_(True)
    ids = torch.tensor([0, 0, 1, 1])
    # chord distances 2 sin(dtheta/2): d01 = 1, d02 = sqrt2, d03 = 2, d12 = 2 sin15, d13 = sqrt3, d23 = sqrt2
    # anchor 0: ap 1,     an min(sqrt2, 2)      = sqrt2  -> relu(1 - 1.41421 + 0.3) = 0
    # anchor 1: ap 1,     an min(2 sin15, sqrt3) = 0.51764 -> 1.3 - 0.51764 = 0.78236
    # anchor 2: ap sqrt2, an min(sqrt2, 2 sin15) = 0.51764 -> 1.71421 - 0.51764 = 1.19658
    # anchor 3: ap sqrt2, an min(2, sqrt3)      = sqrt3  -> relu(1.71421 - 1.73205) = 0
    expected = (0.7823619098 + 1.1965754722) / 4  # = 0.4947343455
    loss = batch_hard_triplet_loss(emb, ids, margin=0.3)
    assert math.isclose(loss.item(), expected, abs_tol=1e-5)
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    # anchors 0 and 1 only (2 and 3 invalid, e.g. unlabelled): no negatives left -> 0, with grad
    zero = batch_hard_triplet_loss(emb, ids, 0.3, valid=torch.tensor([True, True, False, False]))
    assert zero.item() == 0.0 and zero.requires_grad
    # anchors 0, 1, 2 valid: anchor 2 has no positive; anchor 1's nearest negative is 2 -> mean(0, 0.78236)
    part = batch_hard_triplet_loss(emb, ids, 0.3, valid=torch.tensor([True, True, True, False]))
    assert math.isclose(part.item(), 0.7823619098 / 2, abs_tol=1e-5)


# ---------------------------------------------------------------- GiMP model


def _gimp(seed: int = 0, **kw) -> GiMP:
    torch.manual_seed(seed)
    cfg = GiMPConfig(image=dict(in_dim=12, dim=16, depth=2, heads=2, dropout=0.0),
                     gene=dict(n_genes=20, n_groups=4, dim=16, depth=1, heads=2, dropout=0.0),
                     n_classes=3, fusion_dim=16, mask_length=3, dropout=0.0, **kw)
    return GiMP(cfg)


def test_gimp_padding_does_not_change_a_patient():
    model = _gimp().eval()
    batch = make_batch([[9, 6], [4], [], [3, 2]], has_gene=[True, False, True, True], labels=[0, 1, 2, 0])
    with torch.no_grad():
        out = model(batch)
        for i in range(4):
            alone = model(select(batch, i))
            n = int(batch.token_mask[i].sum())
            for name in ("logits", "image", "gene", "fused"):
                assert torch.allclose(getattr(out, name)[i], getattr(alone, name)[0], atol=ATOL), (i, name)
            assert torch.allclose(out.attention[i, :n], alone.attention[0, :n], atol=ATOL)
            assert torch.all(out.attention[i, n:] == 0)
    assert out.logits.shape == (4, 3) and out.fused.shape == (4, 16) and out.attention.shape == (4, 15)
    assert torch.allclose(out.image[2], model.image_missing) and torch.allclose(out.gene[1], model.gene_missing)


def test_gimp_missing_modalities_give_finite_outputs_and_gradients():
    model = _gimp(positives="instance").train()
    batch = make_batch([[5, 3], [], [6], []], has_gene=[True, True, False, False], labels=[0, 1, -1, 2])
    out = model(batch)
    assert all(torch.isfinite(t).all() for t in (out.logits, out.image, out.gene, out.fused, out.attention))
    loss = torch.nn.functional.cross_entropy(out.logits, batch.labels.clamp(min=0))
    parts = model.pretrain_loss(batch, torch.Generator().manual_seed(0))
    (loss + parts["loss"]).backward()
    assert all(torch.isfinite(v) for v in parts.values()) and float(parts["mpm"]) > 0
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert model.image_missing.grad.abs().sum() > 0 and model.gene_missing.grad.abs().sum() > 0
    assert model.mask_token.grad.abs().sum() > 0


def test_gimp_unlabelled_patients_train_mpm_but_never_the_label_triplet():
    """An unlabelled patient (label -1) in a label-positive batch: changing its features moves MPM and leaves
    the triplet term bit-equal; given a label it joins the triplet."""
    model = _gimp().eval()
    batch = make_batch([[6], [6], [6], [6], [6]], labels=[0, 0, 1, 1, -1])

    def parts(b):
        return model.pretrain_loss(b, torch.Generator().manual_seed(3))

    base = parts(batch)
    batch.features[4, :6] += 3.0
    moved = parts(batch)
    assert torch.equal(moved["triplet"], base["triplet"]) and float(moved["mpm"]) != float(base["mpm"])
    batch.labels[4] = 0
    assert float(parts(batch)["triplet"]) != float(moved["triplet"])


def test_gimp_decoder_is_gene_induced():
    model = _gimp(use_triplet=False).eval()
    with torch.no_grad():  # a decoder that is not near-silent at init, so the gene effect is measurable
        for p in model.decoder.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    batch = make_batch([[8], [8]], has_gene=[True, False])
    base = float(model.pretrain_loss(batch, torch.Generator().manual_seed(1))["mpm"])
    genes = batch.genes.clone()
    batch.genes[0] += 2.0
    changed = float(model.pretrain_loss(batch, torch.Generator().manual_seed(1))["mpm"])
    assert abs(changed - base) > 1e-3  # the reconstruction looks at the gene tokens
    batch.genes = genes
    batch.genes[1] = 5.0  # a patient marked without expression: its genes are never read
    assert float(model.pretrain_loss(batch, torch.Generator().manual_seed(1))["mpm"]) == base


def test_gimp_parameter_groups_partition_the_model():
    model = _gimp(head="mlp")
    enc, head = list(model.encoder_parameters()), list(model.head_parameters())
    ids = [id(p) for p in enc + head]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in head} == {id(p) for p in model.head.parameters()}


def test_gimp_pretrain_loss_switches():
    batch = make_batch([[6], [7], [5], [6]], labels=[0, 0, 1, 1])
    g = torch.Generator
    full = _gimp().pretrain_loss(batch, g().manual_seed(0))
    assert float(full["mpm"]) > 0 and float(full["triplet"]) > 0
    assert math.isclose(full["loss"].item(), float(full["mpm"] + full["triplet"]), rel_tol=1e-6)
    no_mpm = _gimp(use_mpm=False, triplet_weight=2.0).pretrain_loss(batch, g().manual_seed(0))
    assert float(no_mpm["mpm"]) == 0 and math.isclose(no_mpm["loss"].item(), 2 * float(no_mpm["triplet"]))
    no_tri = _gimp(use_triplet=False).pretrain_loss(batch, g().manual_seed(0))
    assert float(no_tri["triplet"]) == 0 and no_tri["loss"].item() == float(no_tri["mpm"])
    assert float(no_tri["mpm"]) == float(full["mpm"])  # same generator -> same mask
    with pytest.raises(ValueError, match="no loss"):
        _gimp(use_mpm=False, use_triplet=False).pretrain_loss(batch, g().manual_seed(0))
    with pytest.raises(ValueError, match="positives"):
        _gimp(positives="patient")


def test_small_gimp_overfits_a_tiny_batch():
    batch = make_batch([[6, 4], [8], [5], [7, 3], [9], []], has_gene=[True, True, False, True, True, True],
                       labels=[0, 1, 2, 0, 1, 2], seed=3)
    torch.manual_seed(1)
    model = GiMP(GiMPConfig(image=dict(in_dim=12, dim=16, depth=1, heads=2, dropout=0.0),
                            gene=dict(n_genes=20, n_groups=4, dim=16, depth=1, heads=2, dropout=0.0),
                            n_classes=3, fusion_dim=16, mask_length=3, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    gen = torch.Generator().manual_seed(0)
    pre = []
    for _ in range(15):  # pre-training: the loss goes down
        opt.zero_grad()
        loss = model.pretrain_loss(batch, gen)["loss"]
        loss.backward()
        opt.step()
        pre.append(loss.item())
    assert sum(pre[-5:]) / 5 < 0.7 * sum(pre[:5]) / 5, pre
    for _ in range(50):  # fine-tuning: the classifier memorises the batch (patients missing a modality too)
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(model(batch).logits, batch.labels)
        ce.backward()
        opt.step()
    assert ce.item() < 0.05


# ---------------------------------------------------------------- baselines


def _baselines() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    image = dict(in_dim=12, dim=16, depth=2, heads=2, dropout=0.0)
    gene = dict(n_genes=20, n_groups=4, dim=16, depth=1, heads=2, dropout=0.0)
    return {
        "image_only": ImageOnlyMIL(ImageOnlyMILConfig(mil=dict(in_dim=12, dim=16, attn_dim=8, dropout=0.0),
                                                      n_classes=3)),
        "gene_only": GeneOnly(GeneOnlyConfig(gene=gene, n_classes=3, head="mlp", dropout=0.0)),
        "late_fusion": LateFusion(LateFusionConfig(image=image, gene=gene, n_classes=3)),
    }


def test_baselines_padding_does_not_change_a_patient_and_missing_modalities_are_finite():
    batch = make_batch([[9, 6], [4], [], [3, 2]], has_gene=[True, False, True, False], labels=[0, 1, 2, 0])
    for name, model in _baselines().items():
        model.eval()
        with torch.no_grad():
            out = model(batch)
            for i in range(4):
                alone = model(select(batch, i))
                assert torch.allclose(out.logits[i], alone.logits[0], atol=ATOL), (name, i)
                if out.attention is not None:
                    n = int(batch.token_mask[i].sum())
                    assert torch.allclose(out.attention[i, :n], alone.attention[0, :n], atol=ATOL), (name, i)
                    assert torch.all(out.attention[i, n:] == 0)
        model.train()
        out = model(batch)
        assert out.logits.shape == (4, 3) and torch.isfinite(out.logits).all(), name
        torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
        for pname, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (name, pname)
        enc, head = list(model.encoder_parameters()), list(model.head_parameters())
        assert len({id(p) for p in enc + head}) == len(enc) + len(head) == len(list(model.parameters())), name
        assert head and enc


@pytest.mark.parametrize("rule", ["sum_logits", "mean_prob"])
def test_late_fusion_joins_the_class_scores_of_present_modalities(rule):
    model = _baselines()["late_fusion"].eval()
    model.cfg.fusion_rule = rule
    with torch.no_grad():  # heads that disagree, so the joining is visible
        model.image_head.weight.normal_(0, 3.0)
        model.gene_head.weight.normal_(0, 3.0)
    batch = make_batch([[5], [6], [], []], has_gene=[True, False, True, False])
    with torch.no_grad():
        out = model(batch)
        enc = model.image_encoder
        cls, _ = enc(batch.features, batch.positions, batch.token_mask)
        p_img = model.image_head(torch.where(batch.has_image[:, None], cls, model.image_missing)).softmax(-1)
        gcls, _ = model.gene_encoder(batch.genes)
        p_gene = model.gene_head(torch.where(batch.has_gene[:, None], gcls, model.gene_missing)).softmax(-1)

    def joined(i: int) -> torch.Tensor:
        if rule == "mean_prob":
            return (p_img[i] + p_gene[i]) / 2
        product = p_img[i] * p_gene[i]
        return product / product.sum()

    probs = out.logits.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)  # log-probabilities
    assert torch.allclose(probs[0], joined(0), atol=1e-5)  # both present
    assert torch.allclose(probs[1], p_img[1], atol=1e-5)  # image only
    assert torch.allclose(probs[2], p_gene[2], atol=1e-5)  # gene only
    assert torch.allclose(probs[3], joined(3), atol=1e-5)  # neither: both missing tokens
    assert out.fused is None and out.image.shape == (4, 16) and out.gene.shape == (4, 16)


def test_late_fusion_product_reaches_a_class_neither_modality_identifies_alone():
    """Classes = (tissue, programme): an image branch sure of the tissue and a gene branch sure of the
    programme. Adding log-probabilities picks the right class outright; averaging leaves it at 0.5."""
    torch.manual_seed(0)
    image = dict(in_dim=12, dim=16, depth=1, heads=2, dropout=0.0)
    gene = dict(n_genes=20, n_groups=4, dim=16, depth=1, heads=2, dropout=0.0)
    batch = make_batch([[5]], has_gene=[True])
    p_img = torch.tensor([0.5, 0.5, 1e-4, 1e-4])  # tissue 0: classes 0 and 1
    p_gene = torch.tensor([0.5, 1e-4, 0.5, 1e-4])  # programme 0: classes 0 and 2
    top = {}
    for rule in ("sum_logits", "mean_prob"):
        model = LateFusion(LateFusionConfig(image=image, gene=gene, n_classes=4, fusion_rule=rule)).eval()
        with torch.no_grad():
            for head, p in ((model.image_head, p_img), (model.gene_head, p_gene)):
                head.weight.zero_()
                head.bias.copy_(p.log())
            probs = model(batch).logits.exp()[0]
        top[rule] = (int(probs.argmax()), float(probs.max()))
    assert top["sum_logits"][0] == 0 and top["sum_logits"][1] > 0.99
    assert top["mean_prob"][1] == pytest.approx(0.5, abs=0.01)


def test_image_only_uses_the_missing_token_for_a_patient_without_slides():
    model = _baselines()["image_only"].eval()
    batch = make_batch([[5], []], has_gene=[False, False])
    with torch.no_grad():
        out = model(batch)
    assert torch.equal(out.image[1], model.image_missing) and torch.all(out.attention[1] == 0)
    assert torch.allclose(out.attention[0].sum(), torch.tensor(1.0), atol=1e-6)


def test_a_cohort_without_expression_trains_gimp_through_the_missing_gene_token():
    """No expression in the whole cohort (0 genes): the batch still has one masked gene column, as the model
    is built with max(1, n_genes) genes, and every loss and prediction runs (found by bench/train.py)."""
    import numpy as np

    from wsiomics.datasets import PatientItem, collate

    rng = np.random.default_rng(0)
    items = [PatientItem(i, rng.standard_normal((n, 12)).astype(np.float32),
                         np.stack([np.arange(n), np.zeros(n)], 1).astype(np.float32), np.zeros(n, np.int64),
                         None, i % 3) for i, n in enumerate([7, 5, 6])]
    batch = collate(items, feature_dim=12, n_genes=0)
    assert batch.genes.shape == (3, 1) and not batch.has_gene.any()
    torch.manual_seed(0)
    model = GiMP(GiMPConfig(image=dict(in_dim=12, dim=16, depth=1, heads=2, dropout=0.0),
                            gene=dict(n_genes=1, n_groups=1, dim=16, depth=1, heads=2, dropout=0.0),
                            n_classes=3, fusion_dim=16, mask_length=3, dropout=0.0))
    loss = model.pretrain_loss(batch, torch.Generator().manual_seed(0))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert model(batch).logits.shape == (3, 3)
