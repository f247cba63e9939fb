"""DTNH's one-sided conflict projection of a regularizer gradient against the task gradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["project_conflicting", "project_conflicting_"]


def _dots(g: Sequence[Tensor], r: Sequence[Tensor]) -> Tensor:
    """Per-tensor ⟨g_i, r_i⟩ in float32, without full-size temporaries on CPU, in 3 kernels on GPU."""
    if g[0].is_cuda:
        products = torch._foreach_mul(list(g), list(r))
        flat = torch.cat([p.reshape(-1).float() for p in products])
        lengths = torch.tensor([t.numel() for t in g], device=g[0].device)
        return torch.segment_reduce(flat, "sum", lengths=lengths)
    return torch.stack([torch.dot(a.reshape(-1).float(), b.reshape(-1).float()) for a, b in zip(g, r)])


def _squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack(torch._foreach_norm(list(tensors))).float().square()


def project_conflicting_(
    g: Sequence[Tensor],
    r: Sequence[Tensor],
    granularity: Literal["tensor", "global"] = "tensor",
    eps: float = 1e-20,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """In place: ``g ← g + r'`` (see :func:`project_conflicting`); returns the statistics.

    Reads ``g`` and ``r`` a few times and writes ``g`` twice; no full-size temporary on CPU, a handful of
    fused ``_foreach`` kernels on GPU, and no host synchronization.

    ``reduce`` makes it work on shards (FSDP2): ``g`` and ``r`` are then this rank's local pieces of
    each tensor, and ``reduce`` sums a vector of per-rank partial sums over the ranks (one all-reduce,
    e.g. :func:`~lightning_transfer.functional.sharding.reduce_partial_sums`): the per-tensor
    ``⟨r, g⟩``, ``‖g‖²`` and ``‖r‖²`` are summed over the shards before any decision, so every rank
    projects with the coefficients of the whole tensor.
    """
    if granularity not in ("tensor", "global"):
        raise ValueError(f"granularity must be 'tensor' or 'global', got {granularity!r}.")
    if len(g) != len(r):
        raise ValueError(f"g and r differ in length: {len(g)} vs {len(r)}.")
    if not g:
        zero = torch.zeros(())
        return {"projected": zero, "cosine": zero, "removed_norm": zero}
    g, r = list(g), [t if t.dtype == g[i].dtype else t.to(g[i].dtype) for i, t in enumerate(r)]
    dot, gg, rr = _dots(g, r), _squared_norms(g), _squared_norms(r)
    if reduce is not None:
        dot, gg, rr = reduce(torch.cat([dot, gg, rr])).split(len(g))
    finite = torch.isfinite(gg.sum())
    if granularity == "global":
        dot, gg, rr = dot.sum().view(1), gg.sum().view(1), rr.sum().view(1)
    conflict = (dot < 0) & (gg > eps) & finite
    coef = torch.where(conflict, dot / torch.where(gg > eps, gg, torch.ones_like(gg)), torch.zeros_like(gg))
    scale = (1.0 - coef).expand(len(g)) if granularity == "global" else 1.0 - coef
    torch._foreach_mul_(g, list(scale.to(g[0].dtype).unbind()))  # (not addcmul: inf·0 would make NaN)
    keep = finite.to(g[0].dtype)  # non-finite g: leave it untouched (the AMP scaler skips the step)
    torch._foreach_addcmul_(g, r, [keep] * len(g))
    denom = (gg * rr).sqrt()
    cosine = torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    return {
        "projected": conflict.float().mean(),
        "cosine": cosine.mean(),
        "removed_norm": torch.where(finite, (coef.square() * gg).sum().sqrt(), torch.zeros_like(finite, dtype=torch.float32)),
    }


def project_conflicting(
    g: Sequence[Tensor],
    r: Sequence[Tensor],
    granularity: Literal["tensor", "global"] = "tensor",
    eps: float = 1e-20,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Return ``d = g + r'`` with ``r' = r − (⟨r,g⟩/‖g‖²)·g`` where ``⟨r,g⟩ < 0``, else ``r' = r``.

    Then ``⟨d, g⟩ ≥ ‖g‖²`` per tensor (``"tensor"``) or over all tensors (``"global"``): to first order
    the regularizer never slows the task loss (Wan et al., ICDM 2019). :func:`project_conflicting_`
    does the same in place on ``g`` (what :class:`~lightning_transfer.DTNH` uses).

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
    d = [t.clone() for t in g]
    return d, project_conflicting_(d, r, granularity, eps)
