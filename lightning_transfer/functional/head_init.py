"""Head initializations: maximum-entropy zeroing (MEI) and seeded re-initialization (RIFLE)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from lightning_transfer.functional.sharding import copy_full_, full_tensor, is_sharded, plain_parameters

__all__ = ["output_entropy", "reinitialize_", "zero_head_"]


def output_entropy(logits: Tensor) -> Tensor:
    """Mean softmax entropy of a batch of logits (nats)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@torch.no_grad()
def zero_head_(layer: nn.Module, log_prior: Tensor | None = None) -> float:
    """Set ``W = 0`` and ``b = 0`` (or ``b = log prior``) in place; return the resulting output entropy.

    Example::

        >>> head = nn.Linear(8, 4)
        >>> round(zero_head_(head), 4)  # log 4
        1.3863
    """
    layer.weight.zero_()
    bias = getattr(layer, "bias", None)
    if bias is not None:
        if log_prior is None:
            bias.zero_()
        else:
            copy_full_(bias, log_prior)  # each rank its shard under FSDP2
    elif log_prior is not None:
        raise ValueError("bias='log_prior' needs a head layer with a bias.")
    k = layer.weight.shape[0]
    logits = torch.zeros(k) if bias is None else full_tensor(bias.detach(), bias).float().cpu()
    return float(output_entropy(logits.view(1, k)))


@torch.no_grad()
def reinitialize_(module: nn.Module, seed: int) -> int:
    """Re-initialize every submodule that has ``reset_parameters`` with its own initializer.

    The draw uses ``seed`` inside a forked RNG, so it is reproducible (identical on every DDP rank and
    after a resume) and leaves the global RNG stream untouched. Returns the number of layers reset.

    Under FSDP2 (DTensor parameters) the layers are reset as plain full-size tensors, so the draw is the
    full tensor a single-process run draws, and each rank keeps its shard of it.
    """
    layers = [m for m in module.modules() if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no layer with reset_parameters() to re-initialize.")
    devices = sorted({p.device.index for p in module.parameters() if p.device.type == "cuda"})
    sharded = any(is_sharded(p) for p in module.parameters())
    with plain_parameters(module) if sharded else nullcontext(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for m in layers:
            m.reset_parameters()
    return len(layers)
