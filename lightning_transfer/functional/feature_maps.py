"""Feature-map distance used by DELTA-style regularization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["channel_attention", "feature_map_penalty"]


def feature_map_penalty(
    live: Sequence[Tensor], reference: Sequence[Tensor], alpha: float, weights: Sequence[Tensor] | None = None
) -> Tensor:
    """``α/2·Σ_layers mean_batch Σ_{c,h,w} a_c·(F − F0)²`` in float32, differentiable in ``live``.

    Args:
        live: Feature maps of the model being trained, ``(B, C, ...)`` each.
        reference: The same layers of the reference (pre-trained) model; no gradient flows into them.
        alpha: Strength.
        weights: Optional per-channel weights ``a`` (``(C,)`` per layer), e.g. DELTA's attention.

    Example::

        >>> f, f0 = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
        >>> float(feature_map_penalty([f], [f0], alpha=1.0))
        24.0
    """
    total = torch.zeros((), dtype=torch.float32, device=live[0].device)
    for i, (f, f0) in enumerate(zip(live, reference)):
        if f.shape != f0.shape:
            raise ValueError(f"Feature map {i}: live shape {tuple(f.shape)} differs from reference {tuple(f0.shape)}.")
        sq = (f.float() - f0.detach().float()).square()
        if weights is not None:
            sq = sq * weights[i].float().view(1, -1, *([1] * (sq.ndim - 2)))
        total = total + sq.flatten(1).sum(1).mean()
    return 0.5 * alpha * total


def channel_attention(loss_increase: Tensor, temperature: float = 1.0) -> Tensor:
    """DELTA's channel weights from the loss increase of zeroing each channel: ``C·softmax(Δ/T)`` (mean 1).

    Example::

        >>> channel_attention(torch.zeros(4)).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    delta = loss_increase.float().flatten()
    return delta.numel() * torch.softmax(delta / temperature, dim=0)
