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


_SMALL = 1 << 15  # elements: tensors below this are reduced together, larger ones one BLAS dot each


def _sums(g: Sequence[Tensor], r: Sequence[Tensor], with_rr: bool) -> list[Tensor]:
    """Per-tensor ``⟨g, r⟩``, ``‖g‖²`` (and ``‖r‖²``) as float32 vectors, in a handful of calls.

    On GPU: fused ``_foreach`` kernels and a segmented sum. On CPU: the small tensors concatenated and
    reduced by segments in one call per statistic; each large one by BLAS dots (faster than norms there).
    """
    if g[0].is_cuda:
        return [_dots(g, r), _squared_norms(g)] + ([_squared_norms(r)] if with_rr else [])
    out = torch.zeros(3 if with_rr else 2, len(g), dtype=torch.float32)
    small = [i for i, t in enumerate(g) if t.numel() < _SMALL]
    if small:
        gs = torch.cat([g[i].reshape(-1).float() for i in small])
        rs = torch.cat([r[i].reshape(-1).float() for i in small])
        lengths = torch.tensor([g[i].numel() for i in small])
        products = [gs * rs, gs * gs] + ([rs * rs] if with_rr else [])
        out[:, small] = torch.stack([torch.segment_reduce(v, "sum", lengths=lengths) for v in products])
    big = [i for i, t in enumerate(g) if t.numel() >= _SMALL]
    if big:
        rows = []
        for i in big:
            a, b = g[i].reshape(-1).float(), r[i].reshape(-1).float()
            rows.append(torch.stack([torch.dot(a, b), torch.dot(a, a)] + ([torch.dot(b, b)] if with_rr else [])))
        out[:, big] = torch.stack(rows, 1)
    return list(out.unbind())


def project_conflicting_(
    g: Sequence[Tensor],
    r: Sequence[Tensor],
    granularity: Literal["tensor", "global"] = "tensor",
    eps: float | Tensor = 1e-20,
    reduce: Callable[[Tensor], Tensor] | None = None,
    cosine: bool = True,
) -> dict[str, Tensor]:
    """In place: ``g ← g + r'`` (see :func:`project_conflicting`); returns the statistics.

    ``eps`` may be a 0-d tensor (e.g. ``S²·eps`` for gradients that carry an AMP scale ``S``).
    ``cosine=False`` leaves out the ``cosine`` statistic, the only use of ``‖r‖²`` (one pass over ``r``).

    Cost: the per-tensor ``⟨g, r⟩`` and ``‖g‖²`` in batched reductions stacked into vectors (fused
    ``_foreach`` kernels and a segmented sum on GPU; on CPU one segmented sum over the small tensors and a
    BLAS dot per large one), the coefficients computed on those vectors, then ``g ← s·g + r`` in place
    (two ``_foreach`` kernels; on CPU one ``addcmul`` pass per large tensor). No full-size temporary on
    CPU, and no host synchronization (on CPU the finiteness flag is read: there is no device to wait for).

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
        return {"projected": zero, "removed_norm": zero, **({"cosine": zero} if cosine else {})}
    g, r = list(g), [t if t.dtype == g[i].dtype else t.to(g[i].dtype) for i, t in enumerate(r)]
    sums = _sums(g, r, cosine)
    if reduce is not None:
        sums = list(reduce(torch.cat(sums)).split(len(g)))
    finite = torch.isfinite(sums[1].sum())
    if granularity == "global":
        sums = [v.sum().view(1) for v in sums]
    dot, gg = sums[0], sums[1]
    conflict = (dot < 0) & (gg > eps) & finite
    coef = torch.where(conflict, dot / torch.where(gg > eps, gg, torch.ones_like(gg)), torch.zeros_like(gg))
    scale = (1.0 - coef).expand(len(g)) if granularity == "global" else 1.0 - coef
    scale = scale.to(g[0].dtype)
    if g[0].device.type == "cpu" and bool(finite):  # on CPU reading the flag costs no synchronization
        _scale_and_add_cpu(g, r, scale)
    else:
        torch._foreach_mul_(g, list(scale.unbind()))  # (not addcmul: inf·0 would make NaN)
        keep = finite.to(g[0].dtype)  # non-finite g: leave it untouched (the AMP scaler skips the step)
        torch._foreach_addcmul_(g, r, [keep] * len(g))
    stats = {
        "projected": conflict.float().mean(),
        "removed_norm": torch.where(finite, (coef.square() * gg).sum().sqrt(), torch.zeros_like(finite, dtype=torch.float32)),
    }
    if cosine:
        denom = (gg * sums[2]).sqrt()
        cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
        stats["cosine"] = cos.mean()
    return stats


@torch.no_grad()
def _scale_and_add_cpu(g: list[Tensor], r: list[Tensor], scale: Tensor) -> None:
    """``g ← s·g + r`` in place: one pass per large tensor (``addcmul`` written into ``g``), two ``_foreach``
    calls for the small ones."""
    small = [i for i, t in enumerate(g) if t.numel() < _SMALL]
    if small:
        torch._foreach_mul_([g[i] for i in small], list(scale[small].unbind()))
        torch._foreach_add_([g[i] for i in small], [r[i] for i in small])
    for i, t in enumerate(g):
        if t.numel() >= _SMALL:
            torch.addcmul(r[i], t, scale[i], out=t)


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
