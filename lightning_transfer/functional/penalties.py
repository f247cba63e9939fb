"""Penalties toward a starting point and their analytic gradients (L2, L2-SP, L1-SP, Group-Lasso-SP, Fisher).

Pure tensor functions, no Lightning. Every function takes lists of tensors (parameters ``w``, anchors
``w0``, optional diagonal Fisher ``F``) and works with ``torch._foreach_*`` kernels over groups of
tensors of one device and dtype; the per-group arithmetic is done in float32.

Notation (Li, Grandvalet & Davoine, ICML 2018), with ``d = w - w0`` (``d = w`` for plain L2):

* ``"l2"``:           ``α/2·Σ F·d²``                      gradient ``α·F·d``
* ``"l1"``:           ``α·Σ F·|d|``                       gradient ``α·F·sign(d)``
* ``"group_lasso"``:  ``α·Σ_g √N_g·√(Σ_{i∈g} F_i·d_i²)``  gradient ``α·√N_g·F·d / √(Σ_g F·d²)``

with ``F = 1`` when no Fisher is given. Groups are the rows along dim 0 (one per conv output channel or
linear output unit); a 1-d tensor (bias, norm gain) is one group per element.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["NORMS", "Norm", "add_l2sp_grad_", "group_by_device_dtype", "sp_penalty_and_grad"]

Norm = Literal["l2", "l1", "group_lasso"]
#: The penalty norms of :class:`~lightning_transfer.L2SP` (``norm=``).
NORMS = ("l2", "l1", "group_lasso")


def group_by_device_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), the unit a fused ``_foreach`` kernel takes."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups


def _deltas(params: Sequence[Tensor], anchors: Sequence[Tensor] | None) -> list[Tensor]:
    """``w - w0`` (new tensors, in the parameters' dtype), or copies of ``w`` when there is no anchor."""
    if anchors is None:
        return [p.detach().clone() for p in params]
    if any(a.dtype != p.dtype for a, p in zip(anchors, params)):
        anchors = [a.to(p.dtype) for a, p in zip(anchors, params)]
    return list(torch._foreach_sub([p.detach() for p in params], list(anchors)))


def _group_norms(d: Tensor, fisher: Tensor | None) -> Tensor:
    """√(Σ_g F·d²) per group (rows along dim 0), shaped to broadcast against ``d``."""
    sq = d.float().square() if fisher is None else d.float().square() * fisher
    if d.ndim <= 1:
        return sq.sqrt()
    return sq.flatten(1).sum(1).sqrt().view(-1, *([1] * (d.ndim - 1)))


def sp_penalty_and_grad(
    params: Sequence[Tensor],
    anchors: Sequence[Tensor] | None,
    alpha: float,
    norm: Norm = "l2",
    fisher: Sequence[Tensor] | None = None,
    compute_value: bool = True,
) -> tuple[Tensor | None, list[Tensor]]:
    """The penalty value and its gradient with respect to ``params``.

    Args:
        params: Current values ``w`` (parameters or tensors; never modified).
        anchors: Starting point ``w0`` (same shapes), or ``None`` for plain decay toward zero.
        alpha: Strength ``α >= 0``.
        norm: ``"l2"``, ``"l1"`` or ``"group_lasso"``.
        fisher: Optional diagonal Fisher weights ``F`` (same shapes, non-negative).
        compute_value: Also return the penalty value (a float32 scalar); ``None`` otherwise.

    Returns:
        ``(value, grads)``: ``grads[i]`` has the shape and dtype of ``params[i]``.

    Example::

        >>> w, w0 = [torch.ones(3)], [torch.zeros(3)]
        >>> value, (g,) = sp_penalty_and_grad(w, w0, alpha=0.1)
        >>> float(value), g.tolist()
        (0.15000000596046448, [0.10000000149011612, 0.10000000149011612, 0.10000000149011612])
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}.")
    params = list(params)
    if not params:
        return (torch.zeros(()) if compute_value else None), []
    grads: list[Tensor] = [params[0]] * len(params)
    value = None
    for idx in group_by_device_dtype(params).values():
        part_value, part = _sp_group(
            [params[i] for i in idx],
            [anchors[i] for i in idx] if anchors is not None else None,
            alpha,
            norm,
            [fisher[i] for i in idx] if fisher is not None else None,
            compute_value,
        )
        for i, g in zip(idx, part):
            grads[i] = g
        if compute_value:
            part_value = part_value.to(params[0].device)
            value = part_value if value is None else value + part_value
    return value, grads


def _sp_group(params, anchors, alpha, norm, fisher, compute_value):
    """:func:`sp_penalty_and_grad` on tensors of one device and dtype (one fused kernel per op)."""
    d = _deltas(params, anchors)
    value = torch.zeros((), dtype=torch.float32, device=params[0].device) if compute_value else None

    if norm == "l2":
        if compute_value:
            if fisher is None:
                norms = torch._foreach_norm(d, 2)
                value = value + 0.5 * alpha * torch.stack(norms).float().square().sum()
            else:
                value = value + 0.5 * alpha * sum((f * x.float().square()).sum() for f, x in zip(fisher, d))
        if fisher is not None:
            torch._foreach_mul_(d, [f.to(x.dtype) for f, x in zip(fisher, d)])
        torch._foreach_mul_(d, alpha)
        return value, d

    if norm == "l1":
        if compute_value:
            if fisher is None:
                value = value + alpha * torch.stack(torch._foreach_norm(d, 1)).float().sum()
            else:
                value = value + alpha * sum((f * x.float().abs()).sum() for f, x in zip(fisher, d))
        grads = torch._foreach_sign(d)
        if fisher is not None:
            torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(fisher, grads)])
        torch._foreach_mul_(grads, alpha)
        return value, list(grads)

    # group lasso: one group per row along dim 0
    grads = []
    for i, x in enumerate(d):
        f = fisher[i] if fisher is not None else None
        group_size = x[0].numel() if x.ndim > 1 else 1
        norms = _group_norms(x, f)
        scale = alpha * group_size**0.5
        if compute_value:
            value = value + scale * norms.sum()
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        g = x.float() * (scale / safe) * (norms > 0)
        if f is not None:
            g = g * f
        grads.append(g.to(x.dtype))
    return value, grads


@torch.no_grad()
def add_l2sp_grad_(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    anchors: Sequence[Tensor] | None,
    alpha: float,
    compute_value: bool = True,
    workspace: dict | None = None,
    compiled: bool = False,
    grad_scale: Tensor | None = None,
) -> Tensor | None:
    """In place ``g += S·α·(w − w0)`` (plain L2-SP), returning ``α/2·‖w − w0‖²`` when ``compute_value``.

    The fast path of :func:`sp_penalty_and_grad` for the default norm, exact (``w − w0`` is formed
    first, so ``w = w0`` gives exactly 0). On GPU: fused ``_foreach`` kernels. On CPU, where ``_foreach``
    runs tensor by tensor anyway and fresh full-size temporaries cost page faults every step: one tensor
    at a time through a reusable scratch buffer the size of the largest tensor, kept in ``workspace``
    (pass the same dict every call).

    ``compiled=True`` runs one ``torch.compile``-d kernel per tensor group that reads ``w``, ``w0`` and
    ``g`` once and writes ``g`` once (the memory-traffic floor); the first call compiles (tens of
    seconds on CPU). If compilation fails, it warns once and uses the eager path.

    ``grad_scale``: a 0-d tensor ``S`` that ``g`` still carries (a fused optimizer under a 16-bit
    GradScaler, which divides ``g`` by ``S`` in its step), multiplied in without a host synchronization;
    ``None`` for ``S = 1``. The returned value is never scaled.
    """
    if compiled and anchors is not None and len({(p.device, p.dtype) for p in params}) == 1:
        result = _run_compiled(list(grads), [p.detach() for p in params], list(anchors), alpha, compute_value,
                               grad_scale)
        if result is not _FAILED:
            return result
    value = None
    for (device, dtype), idx in group_by_device_dtype(list(params)).items():
        g = [grads[i] for i in idx]
        w = [params[i].detach() for i in idx]
        w0 = [anchors[i] for i in idx] if anchors is not None else None
        # on GPU all tensors, on CPU the small ones (cheap temporaries, one call for all of them)
        small = list(range(len(w))) if device.type != "cpu" else [j for j, t in enumerate(w) if t.numel() < _SMALL]
        if small:
            d = _deltas([w[j] for j in small], [w0[j] for j in small] if w0 is not None else None)
            if compute_value:
                part = 0.5 * alpha * torch.stack(torch._foreach_norm(d, 2)).float().square().sum()
                value = part if value is None else value + part.to(value.device)
            if grad_scale is not None:  # d is a fresh temporary (its value is taken above)
                torch._foreach_mul_(d, grad_scale)
            torch._foreach_add_([g[j] for j in small], d, alpha=alpha)
            if len(small) == len(w):
                continue
            big = sorted(set(range(len(w))) - set(small))
            g, w, w0 = [g[j] for j in big], [w[j] for j in big], [w0[j] for j in big] if w0 is not None else None
        scratch = scratch_buffer(workspace, (device, dtype), max(t.numel() for t in w))
        squares = []
        for j, (gi, wi) in enumerate(zip(g, w)):
            if w0 is None:
                d = wi
            else:
                d = scratch[: wi.numel()].view_as(wi)
                torch.sub(wi, w0[j].to(dtype) if w0[j].dtype != dtype else w0[j], out=d)
            if compute_value:
                squares.append(torch.dot(d.reshape(-1), d.reshape(-1)).float())
            if grad_scale is None:
                gi.add_(d, alpha=alpha)
            else:
                gi.addcmul_(d, grad_scale, value=alpha)
        if compute_value:
            part = 0.5 * alpha * torch.stack(squares).sum()
            value = part if value is None else value + part
    return value


_SMALL = 1 << 15  # elements: below this a tensor's temporaries are cheap, and a per-tensor call costs more


def scratch_buffer(workspace: dict | None, key: tuple, size: int) -> Tensor:
    """A 1-d buffer of at least ``size`` elements of ``key = (device, dtype)``, kept in ``workspace`` (reused
    by every later call with the same dict, so no step allocates a full-size temporary)."""
    scratch = workspace.get(key) if workspace is not None else None
    if scratch is None or scratch.numel() < size:
        scratch = torch.empty(size, dtype=key[1], device=key[0])
        if workspace is not None:
            workspace[key] = scratch
    return scratch


_FAILED = object()
_COMPILED: dict[str, object] = {}


def _l2sp_kernel(g: list[Tensor], w: list[Tensor], w0: list[Tensor], alpha: float, with_value: bool,
                 grad_scale: Tensor | None = None):
    total = None
    for gi, wi, ai in zip(g, w, w0):
        d = wi - ai.to(wi.dtype)
        gi.add_(d if grad_scale is None else d * grad_scale, alpha=alpha)
        if with_value:
            sq = d.float().square().sum()
            total = sq if total is None else total + sq
    return 0.5 * alpha * total if with_value else None


def _run_compiled(g, w, w0, alpha, with_value, grad_scale=None):
    if _COMPILED.get("failed"):
        return _FAILED
    try:
        if "kernel" not in _COMPILED:
            _COMPILED["kernel"] = torch.compile(_l2sp_kernel, fullgraph=True, dynamic=False)
        return _COMPILED["kernel"](g, w, w0, alpha, with_value, grad_scale)
    except Exception as err:  # a missing compiler toolchain, an unsupported backend, ...
        import warnings

        warnings.warn(f"L2-SP fused kernel could not be compiled ({type(err).__name__}: {err}); using the eager path.", stacklevel=3)
        _COMPILED["failed"] = True
        return _FAILED
