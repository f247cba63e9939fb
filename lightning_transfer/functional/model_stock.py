"""Model Stock (Jang, Yun & Han, ECCV 2024): merge fine-tuning runs from one start, per layer, toward it.

Pure functions over state dicts (``name -> tensor``); :func:`lightning_transfer.model_stock` loads the
files and calls :func:`model_stock_merge`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["model_stock_merge", "model_stock_ratio"]


def model_stock_ratio(cos: float, k: int) -> float:
    """``t = k·cos / (1 + (k − 1)·cos)`` clamped to ``[0, 1]``; ``cos <= 0`` (or not finite) gives 0.

    Example::

        >>> model_stock_ratio(0.5, 2), model_stock_ratio(1.0, 3), model_stock_ratio(-0.2, 2)
        (0.6666666666666666, 1.0, 0.0)
    """
    if not math.isfinite(cos) or cos <= 0:
        return 0.0
    return min(1.0, max(0.0, k * cos / (1 + (k - 1) * cos)))


def _mean_pairwise_cosine(updates: Sequence[Tensor]) -> float:
    """Mean over pairs ``i < j`` of ``cos(d_i, d_j)``; a pair with a zero update counts 0."""
    flat = [d.flatten() for d in updates]
    norms = [float(f.norm()) for f in flat]
    total, pairs = 0.0, 0
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            pairs += 1
            if norms[i] > 0 and norms[j] > 0:
                total += float(flat[i] @ flat[j]) / (norms[i] * norms[j])
    return total / pairs


def model_stock_merge(
    states: Sequence[Mapping[str, Tensor]], w0: Mapping[str, Tensor], max_relative_update: float = 1.0
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, float]]:
    """``t·mean(w_i) + (1 − t)·w0`` per floating-point entry, ``t`` from the mean pairwise cosine of the updates
    ``w_i − w0`` (see :func:`lightning_transfer.model_stock`); integer entries from ``w0``.

    Computed in float64, returned in ``w0``'s dtypes. Returns ``(merged, t by name, cosine by name)``.
    Raises ``KeyError``/``ValueError`` for states of another architecture, fewer than two states, or runs that
    did not start from ``w0`` (the checks of :func:`lightning_transfer.model_stock`).

    Example::

        >>> merged, t, cos = model_stock_merge([{"w": torch.tensor([2.0])}, {"w": torch.tensor([4.0])}],
        ...                                    {"w": torch.tensor([1.0])}, max_relative_update=10)
        >>> cos["w"], t["w"], merged["w"].tolist()  # parallel updates: t = 1, the plain mean
        (1.0, 1.0, [3.0])
    """
    states = list(states)
    k = len(states)
    if k < 2:
        raise ValueError(f"model_stock: needs at least two fine-tuned states, got {k}.")
    for i, s in enumerate(states):
        if set(s) != set(w0):
            diff = sorted(set(s) ^ set(w0))
            raise KeyError(f"model_stock: run {i} has other entries than the pre-trained state (e.g. {diff[:5]}); "
                           "pass states of one architecture.")
        for name, t in w0.items():
            if s[name].shape != t.shape:
                raise ValueError(f"model_stock: {name!r} has shape {tuple(s[name].shape)} in run {i} and "
                                 f"{tuple(t.shape)} in the pre-trained state; pass states of one architecture.")
    # one entry at a time in float64 (never a float64 copy of every run: the peak is one layer's k + 1 copies)
    merged, ratio, cosine = {}, {}, {}
    size, moved, identical, agreed = 0.0, [0.0] * k, True, []  # what the start checks need
    for name, t in w0.items():
        if not t.is_floating_point():
            merged[name] = t.clone()
            continue
        base = t.detach().to(torch.float64)
        runs = [s[name].detach().to(device=base.device, dtype=torch.float64) for s in states]
        same = all(torch.equal(r, runs[0]) for r in runs[1:])
        identical = identical and same
        if same and not torch.equal(runs[0], base):
            agreed.append(name)
        updates = [r - base for r in runs]
        size += float(base.square().sum())
        moved = [m + float(d.square().sum()) for m, d in zip(moved, updates)]
        cos = _mean_pairwise_cosine(updates)
        ratio[name], cosine[name] = model_stock_ratio(cos, k), cos
        mean = sum(runs) / k
        merged[name] = (ratio[name] * mean + (1 - ratio[name]) * base).to(t.dtype)
    _check_common_start(identical, [math.sqrt(m) for m in moved], math.sqrt(size), agreed, max_relative_update)
    return merged, ratio, cosine


def _check_common_start(identical: bool, moved: Sequence[float], size: float, agreed: Sequence[str],
                        limit: float) -> None:
    """Refuse identical runs, a run farther than ``limit·‖w0‖`` from ``w0``, and an entry every run agrees on
    that differs from ``w0`` (``agreed``)."""
    if identical:
        raise ValueError("model_stock: the runs are identical; pass distinct fine-tuning runs (other seeds or data "
                         "orders) from the same pre-trained weights.")
    for i, distance in enumerate(moved):
        if distance > limit * size:
            raise ValueError(
                f"model_stock: run {i} is {distance / max(size, 1e-30):.3g}·‖w0‖ away from the pre-trained "
                f"weights (more than max_relative_update = {limit:g}): it did not start from them, and merging "
                "runs from other starts collapses the model. Pass runs fine-tuned from this w0 (the same pre-trained "
                "weights and the same head initialization), or raise max_relative_update if the runs did move "
                "that far."
            )
    if agreed:
        raise ValueError(
            f"model_stock: every run holds the same {agreed[0]!r} and the pre-trained state another value: an entry "
            "that did not train (a frozen layer, a buffer) shows the runs started elsewhere. Pass the "
            "pre-trained state these runs were fine-tuned from."
        )
