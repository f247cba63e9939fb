"""Weight-space ensembling: linear interpolation between two models and uniform averages (soups).

Pure functions over state dicts (``name -> tensor``). Floating-point tensors are combined; integer
tensors (BatchNorm's ``num_batches_tracked``) are not averages of anything and are taken from the
fine-tuned model (``interpolate``) or the first model (``uniform_soup``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Literal

import torch
from torch import Tensor

__all__ = ["interpolate", "uniform_soup"]


def _check_pair(name: str, a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: {name!r} has shape {tuple(a.shape)} in one state and {tuple(b.shape)} in the "
                         "other; the states must come from the same architecture.")


def interpolate(
    w0: Mapping[str, Tensor],
    w_ft: Mapping[str, Tensor],
    alpha: float,
    missing: Literal["finetuned", "error"] = "finetuned",
) -> dict[str, Tensor]:
    """``(1 − α)·w0 + α·w_ft`` for every entry of ``w_ft`` (WiSE-FT, Wortsman et al., CVPR 2022).

    ``α = 0`` returns ``w0``, ``α = 1`` returns ``w_ft`` exactly (computed with :func:`torch.lerp`, in the
    dtype of ``w_ft``). Entries of ``w_ft`` without a pre-trained value in ``w0`` (a new head) are kept
    at their fine-tuned value with ``missing="finetuned"``, or refused with ``missing="error"``.

    Args:
        w0: Pre-trained values by name (a subset of ``w_ft``'s names).
        w_ft: Fine-tuned values by name.
        alpha: Mixing coefficient in ``[0, 1]``.
        missing: What to do with names of ``w_ft`` absent from ``w0``.

    Example::

        >>> w = interpolate({"w": torch.zeros(2)}, {"w": torch.ones(2), "head": torch.ones(1)}, 0.25)
        >>> w["w"].tolist(), w["head"].tolist()
        ([0.25, 0.25], [1.0])
    """
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"interpolate: alpha must be a number in [0, 1], got {alpha!r}.")
    if missing not in ("finetuned", "error"):
        raise ValueError(f"interpolate: missing must be 'finetuned' or 'error', got {missing!r}.")
    extra = [n for n in w0 if n not in w_ft]
    if extra:
        raise KeyError(f"interpolate: w0 has entries the fine-tuned state lacks: {extra[:5]}; pass states of one model.")
    absent = [n for n in w_ft if n not in w0]
    if absent and missing == "error":
        raise KeyError(f"interpolate: no pre-trained value for {absent[:5]} (a new head?); pass missing='finetuned' "
                       "to keep their fine-tuned values.")
    out = {}
    for name, ft in w_ft.items():
        if name not in w0 or not ft.is_floating_point():
            out[name] = ft.clone()
            continue
        _check_pair(name, w0[name], ft, "interpolate")
        out[name] = torch.lerp(w0[name].to(device=ft.device, dtype=ft.dtype), ft, float(alpha))
    return out


def uniform_soup(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The entry-wise mean of several states of one architecture (a uniform model soup).

    Floating-point entries are averaged in float64 and cast back; other entries come from ``states[0]``.

    Example::

        >>> uniform_soup([{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}])["w"].tolist()
        [1.0]
    """
    states = list(states)
    if not states:
        raise ValueError("uniform_soup: got no states; pass at least one.")
    names = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(names):
            diff = sorted(set(s) ^ set(names))
            raise KeyError(f"uniform_soup: state {i} has other entries than state 0 (e.g. {diff[:5]}); "
                           "pass states of one architecture.")
    out = {}
    for name in names:
        first = states[0][name]
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        total = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for s in states:
            _check_pair(name, first, s[name], "uniform_soup")
            total += s[name].to(device=first.device, dtype=torch.float64)
        out[name] = (total / len(states)).to(first.dtype)
    return out
