"""AdamW parameter groups: weight decay on weight matrices only, crossed with the encoder / head learning rates.

As timm (``param_groups_weight_decay``) and the reference Mamba do, decay is for the weights of linear and
attention layers. Exempt (weight decay 0): every parameter of fewer than two dimensions (biases, norm gains,
Mamba's ``D``, the InfoNCE logit scale, per-gene scales), every ``*.bias``, the parameters a module names in
its ``no_weight_decay()`` (timm's convention: names relative to that module; learned tokens, position
embeddings, Mamba's ``A_log``) and those flagged ``_no_weight_decay`` (mamba_ssm's convention). Decaying
these pulls tokens and embeddings towards zero, norm gains towards a dead layer, ``A_log`` towards a
state that never forgets and the logit scale towards temperature 1, none of which is regularisation.
"""

from __future__ import annotations

from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters of ``model`` that take no weight decay (see the module docstring)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name == "bias" or name.endswith(".bias") or getattr(p, "_no_weight_decay", False):
            names.add(name)
    return names


def param_groups(model: nn.Module, lr: float, weight_decay: float, encoder_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups ``head``, ``head_no_decay``, ``encoder``, ``encoder_no_decay`` (the empty ones left out).

    The encoder groups are ``model.encoder_parameters()`` when the model has that method (learning rate
    ``lr * encoder_lr_scale``); the rest are the head's (``lr``). Head groups come first, so group 0's
    learning rate is the one the training history reports. Frozen parameters are left out.
    """
    encoder = {id(p) for p in model.encoder_parameters()} if hasattr(model, "encoder_parameters") else set()
    exempt = no_weight_decay_names(model)
    found = {n for n, _ in model.named_parameters()}
    unknown = sorted(exempt - found)
    if unknown:
        raise ValueError(f"no_weight_decay() names parameters the model does not have: {unknown}")
    members: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            members.setdefault(("encoder" if id(p) in encoder else "head", name in exempt), []).append(p)
    groups = []
    for part, part_lr in (("head", lr), ("encoder", lr * encoder_lr_scale)):
        for no_decay in (False, True):
            params = members.get((part, no_decay))
            if params:
                groups.append({"name": f"{part}_no_decay" if no_decay else part, "params": params, "lr": part_lr,
                               "weight_decay": 0.0 if no_decay else weight_decay})
    return groups

