"""Selective Projection Decay (Tian et al., NeurIPS 2024): the two halves of its rule around an optimizer step.

Pure tensor functions, no Lightning. Per tensor ``i`` with anchor ``w0_i`` (``0`` in PEFT mode), gradient
``g_i``, weights ``w_i`` before and ``w'_i`` after the optimizer's step:

* decay only where ``c_i = −⟨g_i, w_i − w0_i⟩ < 0`` (the gradient points away from the anchor),
* ``r_i = clamp((‖w'_i − w0_i‖ − ‖w_i − w0_i‖) / (‖w'_i − w0_i‖ + ε), 0, 1)``,
* ``w'_i ← w'_i − λ·r_i·(w'_i − w0_i)``.

Sums over a tensor are returned per tensor (a 1-D tensor, no host sync), so a caller under sharded training
adds them over ranks (one all-reduce) before :func:`spd_decay_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["spd_before_step", "spd_decay_"]

EPS = 1e-12


def _diff(params: Sequence[Tensor], anchors: Sequence[Tensor] | None) -> list[Tensor]:
    params = [p.detach() for p in params]
    if anchors is None:
        return params
    return list(torch._foreach_sub(params, [a.to(p.dtype) for a, p in zip(anchors, params)]))


CHUNK = 1 << 17  # elements of w − w0 made at a time on CPU: 512 KiB of float32, kept in cache


def _chunked_sums(params: Sequence[Tensor], anchors: Sequence[Tensor], grads: Sequence[Tensor] | None
                  ) -> tuple[Tensor | None, Tensor]:
    """CPU path: ``⟨g_i, w_i − w0_i⟩`` (when ``grads`` is given) and ``‖w_i − w0_i‖²`` per tensor, the difference
    made a cache-sized chunk at a time in one scratch buffer. A whole-model ``w − w0`` would be a fresh
    allocation on every step, which the CPU allocator returns to the system and page-faults back in (about 9
    passes' worth of time on ResNet-18); in chunks the traffic is reading ``w``, ``w0`` (and ``g``) once."""
    scratch = torch.empty(min(CHUNK, max(p.numel() for p in params)), dtype=torch.float32)
    dots, squares = [], []
    for i, (p, a) in enumerate(zip(params, anchors)):
        w, w0 = p.detach().reshape(-1), a.reshape(-1)
        g = None if grads is None else grads[i].reshape(-1)
        dot, square = [], []
        for start in range(0, w.numel(), CHUNK):
            end = min(start + CHUNK, w.numel())
            d = scratch[: end - start]
            torch.sub(w[start:end].float(), w0[start:end].float(), out=d)
            square.append(torch.dot(d, d))
            if g is not None:
                dot.append(torch.dot(g[start:end].float(), d))
        squares.append(sum(square) if len(square) > 1 else square[0])
        if g is not None:
            dots.append(sum(dot) if len(dot) > 1 else dot[0])
    return (torch.stack(dots) if grads is not None else None), torch.stack(squares)


def _on_cpu(params: Sequence[Tensor], anchors: Sequence[Tensor] | None) -> bool:
    return anchors is not None and all(p.device.type == "cpu" and p.numel() > 0 for p in params)


@torch.no_grad()
def spd_before_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], anchors: Sequence[Tensor] | None
) -> tuple[Tensor, Tensor]:
    """``(⟨g_i, w_i − w0_i⟩, ‖w_i − w0_i‖²)`` per tensor, as two float32 1-D tensors (local partial sums)."""
    if not params:
        return torch.zeros(0), torch.zeros(0)
    if _on_cpu(params, anchors):
        return _chunked_sums(params, anchors, grads)
    d = _diff(params, anchors)
    dots = torch.stack([torch.vdot(g.reshape(-1).float(), x.reshape(-1).float()) for g, x in zip(grads, d)])
    squares = torch.stack(torch._foreach_norm(d)).float().square()
    return dots, squares


@torch.no_grad()
def spd_after_norms(params: Sequence[Tensor], anchors: Sequence[Tensor] | None) -> Tensor:
    """``‖w'_i − w0_i‖²`` per tensor (float32 1-D, local partial sums) of the weights after the step."""
    if not params:
        return torch.zeros(0)
    if _on_cpu(params, anchors):
        return _chunked_sums(params, anchors, None)[1]
    return torch.stack(torch._foreach_norm(_diff(params, anchors))).float().square()


@torch.no_grad()
def spd_factors(dots: Tensor, before: Tensor, after: Tensor, lam: float) -> Tensor:
    """``λ·r_i`` where the condition holds, else ``0`` (``before``/``after``: squared norms summed over shards).

    ``ε`` in the denominator keeps ``w' = w0`` finite (the public code divides by zero there).
    """
    new, old = after.sqrt(), before.sqrt()
    ratio = ((new - old) / (new + EPS)).clamp(0.0, 1.0)
    return torch.where(dots > 0, lam * ratio, torch.zeros_like(ratio))


@torch.no_grad()
def spd_decay_(params: Sequence[Tensor], anchors: Sequence[Tensor] | None, factors: Tensor) -> None:
    """``w_i ← w_i − f_i·(w_i − w0_i)`` in place: one ``_foreach_lerp_`` toward ``w0`` with per-tensor weights
    (``_foreach_mul_`` by ``1 − f_i`` without anchors). ``factors`` stays on the device (no host sync)."""
    params = [p.detach() for p in params]
    if not params:
        return
    weights = [f.to(p.dtype) for f, p in zip(factors.to(params[0].device).unbind(), params)]
    if anchors is None:
        torch._foreach_mul_(params, [1 - w for w in weights])
        return
    same = [i for i, (p, a) in enumerate(zip(params, anchors)) if p.dtype == a.dtype and p.device == a.device]
    if same:
        torch._foreach_lerp_([params[i] for i in same], [anchors[i] for i in same], [weights[i] for i in same])
    for i in sorted(set(range(len(params))) - set(same)):  # e.g. bfloat16 anchors of fp32 weights
        params[i].lerp_(anchors[i].to(params[i]), weights[i])


def spd_step_(
    params: Sequence[Tensor], anchors: Sequence[Tensor] | None, dots: Tensor, before: Tensor, lam: float
) -> Tensor:
    """Single-process convenience: the after-step half in one call; returns the factors ``λ·r_i·[c_i < 0]``."""
    factors = spd_factors(dots, before, spd_after_norms(params, anchors), lam)
    spd_decay_(params, anchors, factors)
    return factors


__all__ += ["spd_after_norms", "spd_factors", "spd_step_"]
