"""Gene encoders: shapes, tokenisation, learning a tiny task, determinism, the factory."""

from __future__ import annotations

import pytest
import torch

from wsiomics.models.gene_mamba import (
    GeneEncoding,
    GeneMambaConfig,
    GeneMambaEncoder,
    GeneTokenizer,
    build_gene_encoder,
)

torch.set_num_threads(2)
TINY = {
    "mamba": dict(dim=16, depth=1, d_state=4, genes_per_token=3),
    "transformer": dict(dim=16, depth=1, heads=2, genes_per_token=3),
    "mlp": dict(dim=16, hidden=(32,), dropout=0.0),
}


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
@pytest.mark.parametrize(("gpt", "n_tokens"), [(1, 23), (4, 6), (23, 1), (50, 1)])
def test_token_encoders_shapes(kind, gpt, n_tokens):
    torch.manual_seed(0)
    enc = build_gene_encoder(kind, 23, genes_per_token=gpt, dim=16, depth=1, out_dim=8, head="mlp")
    out = enc(torch.randn(3, 23))
    assert isinstance(out, GeneEncoding)
    assert out.pooled.shape == (3, 8) and out.tokens.shape == (3, n_tokens, 16)
    assert enc.n_tokens == n_tokens and enc.dim == 16 and enc.out_dim == 8


def test_mlp_encoder_shapes():
    enc = build_gene_encoder("mlp", 23, dim=16, hidden=(32, 24))
    pooled, tokens = enc(torch.randn(3, 23))
    assert pooled.shape == (3, 16) and tokens.shape == (3, 1, 16) and enc.n_tokens == 1


def test_tokenizer_pads_the_last_token_with_zeros():
    tok = GeneTokenizer(5, 2, 4, projection="shared")
    with torch.no_grad():
        tok.position.zero_()
        tok.value.bias.zero_()
        tok.value.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    out = tok(x)  # tokens (1,2), (3,4), (5,0)
    assert torch.equal(out[0, :, 0], torch.tensor([1.0, 3.0, 5.0]))
    assert torch.equal(out[0, :, 1], torch.tensor([2.0, 4.0, 0.0]))
    assert torch.equal(out[0, :, 2], torch.tensor([3.0, 7.0, 5.0]))


def test_per_token_projection_weights_each_gene_by_itself():
    """Token t = W_t x_t + b_t + pos_t, with one W_t per token (the shared projection has a single W)."""
    torch.manual_seed(0)
    tok = GeneTokenizer(5, 2, 4)  # per_token by default
    assert tok.weight.shape == (3, 2, 4) and tok.bias.shape == (3, 4)
    x = torch.randn(2, 5)
    padded = torch.nn.functional.pad(x, (0, 1)).view(2, 3, 2)
    expected = torch.stack([padded[:, t] @ tok.weight[t] + tok.bias[t] for t in range(3)], 1) + tok.position
    assert torch.allclose(tok(x), expected, atol=1e-6)
    # the same values in two tokens give different embeddings (their genes differ); shared: only the position
    same = torch.ones(1, 4)
    per_token, shared = GeneTokenizer(4, 2, 4), GeneTokenizer(4, 2, 4, projection="shared")
    for t in (per_token, shared):
        torch.nn.init.zeros_(t.position)
    assert not torch.allclose(per_token(same)[0, 0], per_token(same)[0, 1])
    assert torch.allclose(shared(same)[0, 0], shared(same)[0, 1])
    with pytest.raises(ValueError, match="token_projection"):
        GeneTokenizer(4, 2, 4, projection="grouped")


def test_mamba_encoder_reads_genes_in_order():
    """Causal unidirectional stack: the last token sees all genes, the first only its own."""
    torch.manual_seed(0)
    enc = GeneMambaEncoder(GeneMambaConfig(n_genes=12, genes_per_token=2, dim=16, depth=2, d_state=4))
    x = torch.randn(2, 12)
    x2 = x.clone()
    x2[:, 10:] += 1.0
    t1, t2 = enc(x).tokens, enc(x2).tokens
    assert torch.allclose(t1[:, :5], t2[:, :5], atol=1e-6) and not torch.allclose(t1[:, 5], t2[:, 5])
    bi = GeneMambaEncoder(GeneMambaConfig(n_genes=12, genes_per_token=2, dim=16, depth=1, d_state=4,
                                          bidirectional=True, norm="layernorm"))
    assert not torch.allclose(bi(x).tokens[:, 0], bi(x2).tokens[:, 0])


@pytest.mark.slow  # 100 optimiser steps: ~1-2 s of CPU each, far longer on a loaded machine
@pytest.mark.parametrize("kind", ["mamba", "transformer", "mlp"])
def test_encoders_learn_a_tiny_batch(kind):
    torch.manual_seed(0)
    genes = torch.randn(8, 20)
    target = torch.randn(8, 1)
    labels = torch.tensor([0, 1] * 4)
    enc = build_gene_encoder(kind, 20, out_dim=3, **TINY[kind])
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)

    def loss_fn():
        pooled = enc(genes).pooled
        return (torch.nn.functional.mse_loss(pooled[:, :1], target)
                + torch.nn.functional.cross_entropy(pooled[:, 1:], labels))

    first = loss_fn().item()
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        pooled = enc(genes).pooled
        assert loss_fn().item() < 0.1 * first
    assert (pooled[:, 1:].argmax(1) == labels).all()


@pytest.mark.parametrize("kind", ["mamba", "transformer", "mlp"])
def test_encoders_deterministic_given_seed(kind):
    x = torch.randn(2, 20)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        enc = build_gene_encoder(kind, 20, **TINY[kind]).eval()
        outs.append(enc(x).pooled)
    assert torch.equal(outs[0], outs[1])


def test_factory_and_config_errors():
    with pytest.raises(ValueError, match="unknown gene encoder 'gru'"):
        build_gene_encoder("gru", 10)
    with pytest.raises(ValueError, match="unknown option.*heads"):
        build_gene_encoder("mamba", 10, heads=4)
    with pytest.raises(ValueError, match="divisible"):
        build_gene_encoder("transformer", 10, dim=10, heads=4)
    with pytest.raises(ValueError, match="head must be"):
        build_gene_encoder("mlp", 10, head="conv")
    enc = build_gene_encoder("mamba", 10, dim=8, depth=1, d_state=4)
    with pytest.raises(ValueError, match=r"\(batch, 10\)"):
        enc(torch.randn(2, 11))


@pytest.mark.parametrize(("recompute_length", "checkpointed"), [(None, 2), (4, 0)])  # 4 < 10 tokens: stretches
def test_mamba_checkpointing_gives_the_same_gradients(recompute_length, checkpointed, monkeypatch):
    """checkpoint: true runs each block under torch's checkpoint (counted, so the two sides really take
    different paths) with the gradients of the plain encoder; blocks already running in recomputed
    stretches are not wrapped again, and match the whole-sequence encoder."""
    torch.manual_seed(0)
    opts = dict(dim=16, depth=2, d_state=4, genes_per_token=2)
    plain = build_gene_encoder("mamba", 20, recompute_length=None, **opts)
    ckpt = build_gene_encoder("mamba", 20, checkpoint=True, recompute_length=recompute_length, **opts)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    x = torch.randn(3, 20)
    grads = []
    for enc in (plain, ckpt):
        enc(x).pooled.square().sum().backward()
        grads.append([p.grad for p in enc.parameters()])
    assert len(calls) == checkpointed
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
