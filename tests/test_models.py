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
from wsiomics.models.blocks import CrossAttentionBlock, SelfAttentionBlock
from wsiomics.models.gene_gmsa import GeneGMSA, GeneGMSAConfig, group_index
from wsiomics.models.slide_transformer import SlideTransformer, SlideTransformerConfig, sincos_2d

torch.set_num_threads(2)
ATOL = 1e-5


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


# ---------------------------------------------------------------- blocks


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
    torch.manual_seed(0)
    model = SlideTransformer(SlideTransformerConfig(in_dim=32, dim=32, depth=1, heads=1, dropout=0.0)).eval()
    n = 20_000
    feats = torch.randn(1, n, 32)
    pos = torch.stack([torch.arange(n) % 200, torch.arange(n) // 200], -1).float()[None]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    start = time.perf_counter()
    with torch.no_grad():
        cls, tok, att = model.encode_with_attention(model.embed(feats), pos, None)
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert torch.isfinite(cls).all() and tok.shape == (1, n, 32)
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
