"""Batch Spectral Shrinkage (Chen et al., NeurIPS 2019): penalize the smallest singular values of the features."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bss_penalty", "bss_penalty_grad"]


def _matrix(features: Tensor) -> Tensor:
    return features.reshape(features.shape[0], -1).float()


def bss_penalty(features: Tensor, eta: float, k: int = 1) -> Tensor:
    """``η·Σ_{i≤k} σ_i²`` over the ``k`` smallest singular values of the ``(B, D)`` batch feature matrix (a
    ``(B, ...)`` input is flattened to ``(B, D)``), in float32 and differentiable in ``features``.

    Example::

        >>> float(bss_penalty(torch.diag(torch.tensor([3.0, 2.0, 1.0])), eta=0.5, k=2))  # 0.5·(1 + 4)
        2.5
    """
    s = torch.linalg.svdvals(_matrix(features))  # descending
    return eta * s[max(s.numel() - k, 0):].square().sum()


@torch.no_grad()
def bss_penalty_grad(features: Tensor, eta: float, k: int = 1) -> tuple[Tensor, Tensor]:
    """``(value, ∂value/∂features)`` of :func:`bss_penalty` without autograd (float32, shaped like ``features``).

    With ``F = U·diag(σ)·Vᵀ``: ``∂(σ_i²)/∂F = 2σ_i·u_i·v_iᵀ``, so the gradient is ``2η·Σ_{i≤k} σ_i·u_i·v_iᵀ``
    over the ``k`` smallest (one thin SVD of the small ``B × D`` matrix).
    """
    with torch.autocast(features.device.type, enabled=False):  # float32 throughout, also inside autocast
        f = _matrix(features)
        u, s, vh = torch.linalg.svd(f, full_matrices=False)
        lo = max(s.numel() - k, 0)
        u, s, vh = u[:, lo:], s[lo:], vh[lo:]
        value = eta * s.square().sum()
        grad = (2 * eta) * (u * s) @ vh
    return value, grad.reshape(features.shape)
