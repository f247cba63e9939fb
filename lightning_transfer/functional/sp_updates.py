"""Plain L2-SP updates that allocate nothing per step: ``r`` into kept buffers, and the decoupled pull.

Pure tensor functions, no Lightning; the general penalties and gradients are in
:mod:`lightning_transfer.functional.penalties`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_transfer.functional.penalties import (
    _SMALL,
    group_by_device_dtype,
    scratch_buffer,
    sp_penalty_and_grad,
)

__all__ = ["l2sp_grad_into_", "l2sp_pull_"]


@torch.no_grad()
def l2sp_grad_into_(
    out: Sequence[Tensor], params: Sequence[Tensor], anchors: Sequence[Tensor] | None, alpha: float,
    compute_value: bool = True,
) -> Tensor | None:
    """``out[i] ← α·(w_i − w0_i)`` (``α·w_i`` without anchors) in preallocated tensors; returns ``α/2·‖w − w0‖²``
    from the same difference when ``compute_value``.

    The plain L2-SP ``r`` as tensors of its own (what :class:`~lightning_transfer.DTNH` projects), with no
    allocation: a caller that keeps ``out`` between steps pays no page faults for fresh full-size tensors.
    ``out[i]`` has the shape of ``params[i]``; its dtype may differ (the difference is rounded once into it).
    """
    value = None
    for (device, _), idx in group_by_device_dtype(list(out)).items():
        squares = []
        # fused multi-tensor kernels (copy, subtract, norms, scale) on GPU, and for the small tensors on CPU
        small = idx if device.type != "cpu" else [i for i in idx if out[i].numel() < _SMALL]
        if small:
            o = [out[i] for i in small]
            torch._foreach_copy_(o, [params[i].detach() for i in small])
            if anchors is not None:
                torch._foreach_sub_(o, [anchors[i].to(out[i].dtype) for i in small])
            if compute_value:
                squares.append(torch.stack(torch._foreach_norm(o)).float().square().sum())
            torch._foreach_mul_(o, alpha)
        chosen = set(small)
        for i in (i for i in idx if i not in chosen):  # large CPU tensors one by one: the difference is
            if anchors is None:  # still in cache for its square and scaling
                out[i].copy_(params[i].detach())
            else:
                torch.sub(params[i].detach(), anchors[i], out=out[i])
            if compute_value:
                squares.append(torch.linalg.vector_norm(out[i]).float().square())
            out[i].mul_(alpha)
        if compute_value:
            part = 0.5 * alpha * torch.stack(squares).sum()
            value = part if value is None else value + part.to(value.device)
    return value


@torch.no_grad()
def l2sp_pull_(
    params: Sequence[Tensor], anchors: Sequence[Tensor] | None, weight: float, compute_value: bool = False,
    workspace: dict | None = None,
) -> Tensor | None:
    """Decoupled L2-SP: ``w ← w − t·(w − w0)`` in place (``w ← (1 − t)·w`` without anchors), ``t = weight``.

    Returns ``½‖w − w0‖²`` of the weights before the pull when ``compute_value`` (multiply by the strength
    yourself). Without the value: one ``_foreach_lerp_`` toward ``w0`` per device/dtype group (reads ``w`` and
    ``w0``, writes ``w``: 12 bytes per fp32 parameter). With it (logging steps): on CPU the difference goes
    through the reusable scratch buffer in ``workspace`` (in cache for its square and the update); on GPU the
    value takes one more fused pass.
    """
    params = [p.detach() for p in params]
    if not params:
        return torch.zeros(()) if compute_value else None
    value = None
    if compute_value and (anchors is None or params[0].device.type != "cpu"):
        value = sp_penalty_and_grad(params, anchors, 1.0, "l2", compute_value=True)[0]
        compute_value = False
    if anchors is None:
        torch._foreach_mul_(params, 1.0 - weight)
        return value
    if not compute_value:
        same = [i for i, (p, a) in enumerate(zip(params, anchors)) if p.dtype == a.dtype]
        if same:
            torch._foreach_lerp_([params[i] for i in same], [anchors[i] for i in same], weight)
        for i in sorted(set(range(len(params))) - set(same)):  # e.g. bfloat16 anchors of fp32 weights
            params[i].lerp_(anchors[i].to(params[i].dtype), weight)
        return value
    squares = []
    for key, idx in group_by_device_dtype(params).items():
        scratch = scratch_buffer(workspace, key, max(params[i].numel() for i in idx))
        for i in idx:
            d = scratch[: params[i].numel()].view_as(params[i])
            torch.sub(params[i], anchors[i], out=d)
            squares.append(torch.linalg.vector_norm(d).float().square())
            params[i].sub_(d, alpha=weight)
    return 0.5 * torch.stack(squares).sum()

