"""Optimiser parameter groups (weight decay only on weight matrices), the reference Mamba initialisation, and
the training loop's skipped step for a batch that has nothing to learn from."""

from __future__ import annotations

import math
import types

import pytest
import torch
from test_models import make_batch

from wsiomics.models.baselines import LateFusion, LateFusionConfig
from wsiomics.models.batch import ModelOutput
from wsiomics.models.gene_mamba import GeneMambaConfig, GeneMambaEncoder
from wsiomics.models.gimp import GiMP, GiMPConfig
from wsiomics.models.mgi import MGI, MGIConfig
from wsiomics.train.loop import OptimParams, fit
from wsiomics.train.optim import param_groups
from wsiomics.train.tasks.classify import classify_objective

IMAGE = dict(in_dim=12, dim=16, depth=1, heads=2, dropout=0.0)
GENE = dict(n_genes=20, n_groups=4, dim=16, depth=1, heads=2, dropout=0.0)


def _gimp() -> GiMP:
    return GiMP(GiMPConfig(image=IMAGE, gene=GENE, n_classes=3, fusion_dim=16, head="mlp"))


def _mgi(**gene) -> MGI:
    return MGI(MGIConfig(image=IMAGE, n_genes=20, n_classes=3, gene_encoder="mamba",
                         gene=dict(dim=16, depth=2, genes_per_token=4, **gene), embed_dim=8))


def _late_fusion() -> LateFusion:
    return LateFusion(LateFusionConfig(image=IMAGE, gene=GENE, n_classes=3))


def _named_groups(model: torch.nn.Module, **kw) -> dict[str, tuple[set[str], dict]]:
    """group name -> (parameter names, the group's settings)."""
    names = {id(p): n for n, p in model.named_parameters()}
    defaults = dict(lr=1e-3, weight_decay=0.05, encoder_lr_scale=0.5) | kw
    out = {}
    for group in param_groups(model, **defaults):
        out[group["name"]] = ({names[id(p)] for p in group["params"]},
                              {k: v for k, v in group.items() if k != "params"})
    return out


@pytest.mark.parametrize("build", [_gimp, _mgi, _late_fusion])
def test_groups_partition_the_trainable_parameters(build):
    torch.manual_seed(0)
    model = build()
    groups = _named_groups(model)
    listed = [n for names, _ in groups.values() for n in names]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable)  # every trainable parameter once, frozen ones never
    for name, (_, settings) in groups.items():
        assert settings["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.05), name
        assert settings["lr"] == (0.5e-3 if name.startswith("encoder") else 1e-3), name


def test_gimp_decays_weight_matrices_only():
    torch.manual_seed(0)
    groups = _named_groups(_gimp())
    decay = groups["head"][0] | groups["encoder"][0]
    no_decay = groups["head_no_decay"][0] | groups["encoder_no_decay"][0]
    for name in ("image_missing", "gene_missing", "mask_token", "image_encoder.cls_token",
                 "gene_encoder.cls_token", "gene_encoder.group_embed", "gene_encoder.group_bias",
                 "image_encoder.norm.weight", "image_encoder.blocks.0.attn.q.bias", "head.fc1.bias"):
        assert name in no_decay, name
    for name in ("image_encoder.blocks.0.attn.q.weight", "gene_encoder.group_weight", "fusion.fc1.weight",
                 "decoder_out.weight", "head.fc2.weight"):
        assert name in decay, name
    assert "head.fc2.weight" in groups["head"][0] and "head.fc2.bias" in groups["head_no_decay"][0]


def test_mgi_keeps_the_ssm_parameters_and_logit_scale_out_of_decay():
    torch.manual_seed(0)
    groups = _named_groups(_mgi())
    no_decay = groups["encoder_no_decay"][0]
    for name in ("gene_encoder.blocks.0.mixer.A_log", "gene_encoder.blocks.1.mixer.D", "logit_scale",
                 "gene_scale", "gene_encoder.tokenizer.position", "gene_encoder.tokenizer.bias",
                 "gene_encoder.blocks.0.mixer.dt_proj.bias", "gene_encoder.blocks.0.norm.weight"):
        assert name in no_decay, name
    for name in ("gene_encoder.blocks.0.mixer.in_proj.weight", "gene_encoder.blocks.0.mixer.x_proj.weight",
                 "gene_encoder.tokenizer.weight", "image_proj.0.weight"):
        assert name in groups["encoder"][0], name
    assert groups["head"][0] == {"head.weight"} and groups["head_no_decay"][0] == {"head.bias"}


def test_late_fusion_groups_split_both_heads():
    torch.manual_seed(0)
    groups = _named_groups(_late_fusion())
    assert groups["head"][0] == {"image_head.weight", "gene_head.weight"}
    assert groups["head_no_decay"][0] == {"image_head.bias", "gene_head.bias"}
    assert {"image_missing", "gene_missing", "image_encoder.cls_token"} <= groups["encoder_no_decay"][0]


def test_a_model_without_an_encoder_split_gets_head_groups_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    groups = _named_groups(model)
    assert groups == {"head": ({"0.weight"}, {"name": "head", "lr": 1e-3, "weight_decay": 0.05}),
                      "head_no_decay": ({"0.bias", "1.weight", "1.bias"},
                                        {"name": "head_no_decay", "lr": 1e-3, "weight_decay": 0.0})}


# ---------------------------------------------------------------- Mamba initialisation


def test_gene_mamba_rescales_out_proj_by_depth_and_zeroes_linear_biases():
    def encoder(depth: int) -> GeneMambaEncoder:
        torch.manual_seed(0)
        return GeneMambaEncoder(GeneMambaConfig(n_genes=64, genes_per_token=1, dim=32, depth=depth, head="mlp"))

    shallow, deep = encoder(1), encoder(4)
    d_inner = shallow.blocks[0].mixer.d_inner
    bound = 1.0 / math.sqrt(d_inner)  # nn.Linear's (kaiming-uniform, a = sqrt 5) bound for fan-in d_inner
    for model, depth in ((shallow, 1), (deep, 4)):
        for block in model.blocks:
            w = block.mixer.out_proj.weight.detach()
            expected_std = bound / math.sqrt(3) / math.sqrt(depth)
            assert abs(float(w.std()) / expected_std - 1) < 0.05, depth
            assert float(w.abs().max()) <= bound / math.sqrt(depth) + 1e-7
            dt = torch.nn.functional.softplus(block.mixer.dt_proj.bias.detach())  # _no_reinit: dt kept
            assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    for name, module in deep.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None and not name.endswith("dt_proj"):
            assert torch.all(module.bias == 0), name


def test_bidirectional_gene_mamba_rescales_both_directions():
    torch.manual_seed(0)
    model = GeneMambaEncoder(GeneMambaConfig(n_genes=64, dim=32, depth=4, bidirectional=True))
    bound = 1.0 / math.sqrt(model.blocks[0].mixer.forward_block.d_inner)
    for block in model.blocks:
        for mixer in (block.mixer.forward_block, block.mixer.backward_block):
            assert float(mixer.out_proj.weight.detach().abs().max()) <= bound / 2 + 1e-7


# ---------------------------------------------------------------- the training loop


class _Loader:
    """A fixed list of batches with the batch-sampler interface :func:`fit` uses."""

    def __init__(self, batches) -> None:
        self.batches = batches
        self.batch_sampler = types.SimpleNamespace(set_epoch=lambda epoch: None)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class _Tokens(torch.nn.Module):
    """Logits from a mean-pooled linear map; a learned token that the loss never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(12, 3)
        self.token = torch.nn.Parameter(torch.ones(1, 1, 4))
        self.unused = torch.nn.Parameter(torch.ones(4, 4))

    def no_weight_decay(self) -> set[str]:
        return {"token"}

    def forward(self, batch):
        m = batch.token_mask[..., None].float()
        pooled = (batch.features * m).sum(1) / m.sum(1).clamp(min=1)
        return ModelOutput(logits=self.proj(pooled) + 0.0 * (self.token.sum() + self.unused.sum()))


def _fit(model, batches, tmp_path, weight_decay=0.5, epochs=2):
    params = OptimParams(epochs=epochs, lr=0.1, weight_decay=weight_decay, warmup_epochs=0, patience=0)
    return fit(model, classify_objective(0.0), _Loader(batches), None, params, tmp_path / "state.pt", {},
               torch.device("cpu"), seed=0)


def test_fit_decays_weight_matrices_and_leaves_exempt_parameters(tmp_path):
    torch.manual_seed(0)
    model = _Tokens()
    _fit(model, [make_batch([[4], [5], [3]], labels=[0, 1, 2])], tmp_path)
    assert torch.equal(model.token.detach(), torch.ones(1, 1, 4))  # zero gradient, no decay: untouched
    assert float(model.unused.detach().max()) < 1.0  # zero gradient, decayed


def test_a_batch_without_a_labelled_patient_leaves_every_parameter_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = _Tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _fit(model, [make_batch([[4], [5]], labels=[-1, -1])], tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no decay, no momentum step
    assert len(result.history) == 2


def test_skipped_batches_neither_step_nor_count_and_the_schedule_follows_the_step_count(tmp_path):
    labelled = make_batch([[4], [5], [3]], labels=[0, 1, 2])
    torch.manual_seed(0)
    a = _Tokens()
    first = float(classify_objective(0.0)(a, labelled, None)["loss"].detach())
    ra = _fit(a, [labelled, make_batch([[4]], labels=[-1])], tmp_path / "a", epochs=3)
    assert ra.history[0]["train_loss"] == pytest.approx(first, rel=1e-6)  # the skipped batch is not a 0 in the mean
    torch.manual_seed(0)
    rc = _fit(_Tokens(), [labelled, labelled], tmp_path / "c", epochs=3)
    assert [h["lr"] for h in ra.history] == [h["lr"] for h in rc.history]  # the LR schedule counts every batch


def test_objectives_signal_a_batch_without_a_contributing_sample():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    triplet_only = GiMP(GiMPConfig(image=IMAGE, gene=GENE, n_classes=3, fusion_dim=16, use_mpm=False)).train()
    one_class = make_batch([[4], [5], [3]], labels=[1, 1, -1])
    assert not triplet_only.pretrain_loss(one_class, gen)["loss"].requires_grad  # no negative for any anchor
    two_classes = make_batch([[4], [5], [3]], labels=[1, 1, 0])
    assert triplet_only.pretrain_loss(two_classes, gen)["loss"].requires_grad
    full = GiMP(GiMPConfig(image=IMAGE, gene=GENE, n_classes=3, fusion_dim=16, mask_length=2)).train()
    assert full.pretrain_loss(one_class, gen)["loss"].requires_grad  # MPM learns from every image
    no_image = make_batch([[], [], []], labels=[1, 1, -1])
    assert not full.pretrain_loss(no_image, gen)["loss"].requires_grad
    mgi = _mgi().train()
    batch = make_batch([[4], [5], []], n_genes=20, has_gene=[True, False, True])
    assert not mgi.pretrain_loss(batch)["loss"].requires_grad  # one image-gene pair: nothing to contrast
    batch = make_batch([[4], [5], []], n_genes=20, has_gene=[True, True, True])
    assert mgi.pretrain_loss(batch)["loss"].requires_grad
