"""Optimizer parameter groups built from the model's anatomy (layer-wise learning-rate decay).

A tool for any LightningModule: call :func:`build_param_groups` in ``configure_optimizers``. On timm
models the groups and scales are timm's own (``param_groups_layer_decay``): its fine grouping, its layer
ids, its ``no_weight_decay()`` names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_transfer.anatomy import list_blocks, timm_layer_ids

__all__ = ["build_param_groups", "check_fresh_state_supported", "norm_and_bias_ids", "reset_optimizer_state"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def norm_and_bias_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that are biases, 1-d gains, or belong to a normalization layer."""
    ids = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    ids |= {id(p) for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}
    return ids | _declared_no_weight_decay(model)


def _fused_momentum(group: dict[str, Any]) -> bool:
    """A param group of torch's fused SGD with momentum: its step needs a momentum buffer for every parameter
    it updates, or for none (its first step), so a parameter cannot join it later without one."""
    return bool(group.get("fused")) and bool(group.get("momentum")) and "dampening" in group


def check_fresh_state_supported(optimizers: Sequence[torch.optim.Optimizer], owner: str) -> None:
    """Refuse, before any step, an optimizer in which ``owner`` could not give parameters fresh state.

    Fresh state for a parameter of a fused SGD group with momentum is a zero momentum buffer (see
    :func:`reset_optimizer_state`), which equals torch's first step (``buf = g``) only without dampening.
    """
    for opt in optimizers:
        for group in opt.param_groups:
            if _fused_momentum(group) and group["dampening"]:
                raise ValueError(
                    f"{owner} gives the parameters it unfreezes or re-initializes fresh optimizer state, which "
                    f"torch's fused SGD with momentum and dampening={group['dampening']} cannot take exactly (its "
                    "step needs a momentum buffer for every parameter). Use dampening=0, or fused=False.")


@torch.no_grad()
def reset_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], params: Sequence[nn.Parameter]) -> None:
    """Give ``params`` fresh optimizer state: as if each took its first step now (momentum, Adam moments).

    The state is deleted, except in a group of torch's fused SGD with momentum whose other parameters
    already hold buffers: there each of ``params`` gets a zero momentum buffer, which the next step turns
    into ``g`` exactly as a first step does (dampening 0, checked by :func:`check_fresh_state_supported`);
    without it the fused step fails ("expected Tensor as element i ... got NoneType").
    """
    ids = {id(p) for p in params}
    for opt in optimizers:
        for p in [p for p in opt.state if id(p) in ids]:
            del opt.state[p]
        for group in opt.param_groups:
            mine = [p for p in group["params"] if id(p) in ids]
            if mine and _fused_momentum(group) and any("momentum_buffer" in opt.state.get(p, {}) for p in group["params"]):
                for p in mine:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)


def _declared_no_weight_decay(model: nn.Module) -> set[int]:
    """Parameters a module declares exempt through timm's ``no_weight_decay()`` (position embeddings,
    class tokens): names relative to that module, wildcards allowed."""
    ids: set[int] = set()
    for module in model.modules():
        declared = getattr(module, "no_weight_decay", None)
        if not callable(declared):
            continue
        patterns = set(declared())
        ids |= {id(p) for n, p in module.named_parameters()
                if any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns)}
    return ids


def _timm_levels(model: nn.Module, found: list[tuple[str, nn.Module]]) -> list[int] | None:
    """Each block's distance below the head by timm's layer ids, when every block lies inside one timm model."""
    for module in model.modules():
        layer_ids = timm_layer_ids(module)
        if layer_ids is None:
            continue
        by_param = {id(p): layer_ids[n] for n, p in module.named_parameters()}
        if any(id(p) not in by_param for _, block in found for p in block.parameters()):
            return None  # parameters outside the timm model: count blocks instead
        top = max(layer_ids.values())
        return [top - by_param[id(next(block.parameters()))] for _, block in found]
    return None


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    decay_norm_and_bias: bool = False,
    blocks: Sequence[str] | None = None,
    head: str | None = None,
) -> list[dict[str, Any]]:
    """Named optimizer parameter groups.

    Without ``layer_decay``: one group ``"decay"`` and one ``"no_decay"`` (norm and bias tensors, unless
    ``decay_norm_and_bias``; parameters a timm model lists in ``no_weight_decay()`` count as norms). With
    ``layer_decay = ξ``: one pair per block of :func:`list_blocks`, the block at distance ``d`` from the
    head getting ``lr·ξ^d`` (the head ``lr``); on a timm model, timm's fine blocks and layer ids, so the
    groups equal ``timm.optim.param_groups_layer_decay``'s. Frozen parameters are kept
    (they get no gradient, hence no update, and train at their group's rate once unfrozen). Each group carries ``name`` (``LearningRateMonitor`` shows it) and ``initial_lr_scale``.

    Example::

        >>> import torchvision
        >>> groups = build_param_groups(torchvision.models.resnet18(weights=None), 0.1, 1e-4, layer_decay=0.5)
        >>> [(g["name"], g["lr"]) for g in groups][:2]
        [('conv1|bn1', 0.003125), ('conv1|bn1.no_decay', 0.003125)]
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}. Use None to turn it off.")
    no_decay = set() if decay_norm_and_bias else norm_and_bias_ids(model)
    if layer_decay is None:
        sections = [("", 1.0, [p for p in model.parameters()])]
    else:
        found = list_blocks(model, blocks=blocks, head=head, fine=blocks is None)
        levels = (_timm_levels(model, found) if blocks is None else None) or list(range(len(found) - 1, -1, -1))
        sections = [(name, layer_decay**level, list(block.parameters())) for level, (name, block) in zip(levels, found)]

    groups: list[dict[str, Any]] = []
    for name, scale, params in sections:
        decay = [p for p in params if id(p) not in no_decay]
        plain = [p for p in params if id(p) in no_decay]
        for suffix, members, wd in (("", decay, weight_decay), ("no_decay", plain, 0.0)):
            if members:
                label = ".".join(x for x in (name, suffix) if x) or "decay"
                groups.append({"name": label, "params": members, "lr": lr * scale, "weight_decay": wd,
                               "initial_lr_scale": scale})
    return groups
