"""Stochastic normalization (Kou et al., NeurIPS 2020): per channel, running or batch statistics at random."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["stoch_norm", "stoch_norm_masks"]


def stoch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    use_running: Tensor,
    momentum: float,
    eps: float,
) -> Tensor:
    """The training-mode forward of a StochNorm layer on ``x`` of shape ``(N, C, *)``.

    Channel ``c`` is normalized with the running statistics where ``use_running[c]`` is true and with the
    batch's statistics (mean and biased variance over every dimension but ``C``) elsewhere, then scaled by
    ``weight`` and shifted by ``bias`` as BatchNorm does. The running branch uses the statistics as they were
    *before* this batch; then ``running_mean`` and ``running_var`` are updated in place exactly as BatchNorm
    updates them (``(1 − momentum)·old + momentum·batch``, the variance unbiased), for every channel, whichever
    branch it used. ``momentum`` is the factor itself: pass ``1/num_batches_tracked`` for a cumulative average.

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> x = torch.randn(8, 3) * 2 + 1
        >>> out = stoch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
        ...                  torch.tensor([True, False, True]), 0.1, bn.eps)
        >>> torch.allclose(out[:, 0], x[:, 0] / (1 + bn.eps) ** 0.5)  # running stats were mean 0, var 1
        True
        >>> bool(out[:, 1].mean().abs() < 1e-5)  # batch statistics: zero mean over the batch
        True
    """
    if use_running.dim() != 1 or use_running.numel() != x.shape[1]:
        raise ValueError(f"stoch_norm: use_running must hold one entry per channel ({x.shape[1]}), "
                         f"got shape {tuple(use_running.shape)}.")
    # with copies of the statistics before this batch: the update below is in place, and the backward of an
    # eval-mode batch_norm reads the statistics it was given when it runs
    z_running = F.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, False, 0.0, eps)
    # with the batch's statistics, which also updates the running statistics as BatchNorm does
    z_batch = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    mask = use_running.to(device=x.device, dtype=torch.bool).view(1, -1, *([1] * (x.dim() - 2)))
    return torch.where(mask, z_running, z_batch)


def stoch_norm_masks(channels: list[int], p: float, seed: int, epoch: int, batch: int) -> list[Tensor]:
    """The per-channel choices of every layer for one training batch: ``True`` (running statistics) with
    probability ``p``, on the CPU.

    A function of ``(seed, epoch, batch)`` alone (``batch``: the batch's index in its epoch), drawn from a torch
    generator seeded with all three, so a resumed run and every DDP rank draw the same masks for the same
    batch, whatever the number of optimizers or the accumulation, and the global RNG is never touched. Layer ``i``
    takes the ``i``-th slice of one draw of ``sum(channels)`` uniforms.

    Example::

        >>> a = stoch_norm_masks([4, 2], 0.5, seed=0, epoch=1, batch=7)
        >>> [m.shape[0] for m in a], all(torch.equal(x, y) for x, y in zip(a, stoch_norm_masks([4, 2], 0.5, 0, 1, 7)))
        ([4, 2], True)
    """
    key = ((seed * 1_000_003 + epoch) * 1_000_000_007 + batch) % (2**63)
    generator = torch.Generator().manual_seed(key)
    draws = torch.rand(sum(channels), generator=generator) < p
    return list(draws.split(channels))
