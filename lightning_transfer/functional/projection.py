"""DTNH's one-sided conflict projection of a regularizer gradient against the task gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["project_conflicting"]


def project_conflicting(
    g: Sequence[Tensor],
    r: Sequence[Tensor],
    granularity: Literal["tensor", "global"] = "tensor",
    eps: float = 1e-20,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Return ``d = g + r'`` with ``r' = r − (⟨r,g⟩/‖g‖²)·g`` where ``⟨r,g⟩ < 0``, else ``r' = r``.

    Then ``⟨d, g⟩ ≥ ‖g‖²`` per tensor (``"tensor"``) or over all tensors (``"global"``): to first order
    the regularizer never slows the task loss (Wan et al., ICDM 2019). Works on one flat float32 buffer
    (a handful of kernels whatever the number of tensors) and never synchronizes with the host.

    Guards: where ``‖g‖² <= eps`` nothing is projected (``d = g + r``); when ``g`` holds inf/NaN, ``d``
    is ``g`` unchanged, so the AMP scaler skips the step as it would have.

    Args:
        g: Task gradients.
        r: Regularizer gradients, same shapes.
        granularity: ``"tensor"`` (one projection per tensor, the stricter guarantee) or ``"global"``.
        eps: Threshold on ``‖g‖²`` below which no projection happens.

    Returns:
        ``(d, stats)``: ``d`` in the dtypes of ``g``; ``stats`` holds ``projected`` (fraction of tensors,
        or 0/1 globally), ``cosine`` (mean cosine between r and g) and ``removed_norm`` (‖r − r'‖).

    Example::

        >>> d, stats = project_conflicting([torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])])
        >>> d[0].tolist(), float(stats["projected"])
        ([1.0, 1.0], 1.0)
    """
    if granularity not in ("tensor", "global"):
        raise ValueError(f"granularity must be 'tensor' or 'global', got {granularity!r}.")
    if len(g) != len(r):
        raise ValueError(f"g and r differ in length: {len(g)} vs {len(r)}.")
    if not g:
        zero = torch.zeros(())
        return [], {"projected": zero, "cosine": zero, "removed_norm": zero}
    sizes = [t.numel() for t in g]
    device = g[0].device
    G = torch.cat([t.reshape(-1).float() for t in g])
    R = torch.cat([t.reshape(-1).to(device, torch.float32) for t in r])
    n = len(g) if granularity == "tensor" else 1
    if granularity == "tensor":
        seg = torch.repeat_interleave(torch.arange(len(g), device=device), torch.tensor(sizes, device=device))
        dot = torch.zeros(n, device=device).index_add_(0, seg, G * R)
        gg = torch.zeros(n, device=device).index_add_(0, seg, G * G)
        rr = torch.zeros(n, device=device).index_add_(0, seg, R * R)
    else:
        dot, gg, rr = (G * R).sum().view(1), (G * G).sum().view(1), (R * R).sum().view(1)
    conflict = (dot < 0) & (gg > eps)
    coef = torch.where(conflict, dot / torch.where(gg > eps, gg, torch.ones_like(gg)), torch.zeros_like(gg))
    full_coef = coef[seg] if granularity == "tensor" else coef
    D = G + R - full_coef * G
    finite = torch.isfinite(gg.sum())
    D = torch.where(finite, D, G)
    out = [chunk.view_as(t).to(t.dtype) for chunk, t in zip(D.split(sizes), g)]
    denom = (gg * rr).sqrt()
    cosine = torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    stats = {
        "projected": conflict.float().mean(),
        "cosine": cosine.mean(),
        "removed_norm": (coef.square() * gg).sum().sqrt(),
    }
    return out, stats
