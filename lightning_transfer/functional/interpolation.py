"""Weight-space ensembling: linear interpolation between two models and uniform averages (soups).

Pure functions over state dicts (``name -> tensor``). Floating-point tensors are combined; integer
tensors (BatchNorm's ``num_batches_tracked``) are not averages of anything and are taken from the
fine-tuned model (``interpolate``) or the first model (``uniform_soup``).

Low-rank adapters (LoRA: a layer's weight is ``W0 + s·B@A``) are named as ``(A, B)`` pairs: combining ``A`` and
``B`` entry-wise would not combine the updates ``s·B@A`` (``mean(B)@mean(A) != mean(B@A)``). ``interpolate``
keeps ``A`` fine-tuned and sets ``B ← α·B_ft``, which is exactly ``W0 + α·(s·B_ft@A_ft − s·B0@A0)`` when the
adapter starts with no update (``B0@A0 = 0``, peft's default ``init_lora_weights=True``), and refuses any other
start; ``uniform_soup`` averages ``B`` where every state shares one ``A`` (exact) and refuses otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Literal

import torch
from torch import Tensor

__all__ = ["check_low_rank_start", "interpolate", "uniform_soup"]

LowRank = Sequence[tuple[str, str]]


def _check_pair(name: str, a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: {name!r} has shape {tuple(a.shape)} in one state and {tuple(b.shape)} in the "
                         "other; the states must come from the same architecture.")


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``B@A`` of LoRA factors of any layer kind (conv factors flattened to matrices), in float32."""
    return b.detach().float().flatten(1) @ a.detach().float().to(b.device).flatten(1)


def check_low_rank_start(w0: Mapping[str, Tensor], low_rank: LowRank, owner: str = "interpolate") -> None:
    """Refuse LoRA factors ``(A, B)`` of ``w0`` whose pre-trained update ``B0@A0`` is not zero.

    Pairs with a factor absent from ``w0`` (kept frozen, e.g. LoRA-FA's ``A``) are ordinary entries: the update
    is linear in the other factor. Raises ``ValueError`` naming the first layer and the ways out.
    """
    for a_name, b_name in low_rank:
        if a_name not in w0 or b_name not in w0 or not w0[b_name].any() or not w0[a_name].any():
            continue  # B0 = 0 (peft's default) needs no product
        size = float(_product(w0[a_name], w0[b_name]).abs().max())
        if size != 0:
            raise ValueError(
                f"{owner}: the LoRA adapter {b_name!r}, {a_name!r} starts with a non-zero update B0@A0 (max |B0@A0| "
                f"= {size:.3g}), so no interpolation of its factors gives W0 + a·(s·B_ft@A_ft − s·B0@A0). Create the "
                "adapter with peft's init_lora_weights=True (B0 = 0), or merge it (merge_and_unload()) in the "
                "pre-trained and in the fine-tuned model and interpolate the merged weights."
            )


def interpolate(
    w0: Mapping[str, Tensor],
    w_ft: Mapping[str, Tensor],
    alpha: float,
    missing: Literal["finetuned", "error"] = "finetuned",
    low_rank: LowRank = (),
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
        low_rank: ``(A, B)`` names of LoRA factors (see the module docstring, and
            :func:`~lightning_transfer.anatomy.lora_factors` to list a peft model's): ``A`` keeps its fine-tuned
            value and ``B ← α·B_ft``, the interpolation of the update ``s·B@A``. A pair whose ``B0@A0`` is not
            zero is refused (``ValueError``); one with a factor absent from ``w0`` is interpolated entry-wise.

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
    check_low_rank_start(w0, low_rank)
    factors = {n: kind for pair in low_rank if all(n in w0 and n in w_ft for n in pair)
               for n, kind in zip(pair, "AB")}
    out = {}
    for name, ft in w_ft.items():
        if name in factors:  # LoRA: A_ft and α·B_ft, the interpolation of s·B@A from B0@A0 = 0
            out[name] = ft.clone() if factors[name] == "A" else ft * float(alpha)
            continue
        if name not in w0 or not ft.is_floating_point():
            out[name] = ft.clone()
            continue
        _check_pair(name, w0[name], ft, "interpolate")
        out[name] = torch.lerp(w0[name].to(device=ft.device, dtype=ft.dtype), ft, float(alpha))
    return out


def uniform_soup(states: Sequence[Mapping[str, Tensor]], low_rank: LowRank = ()) -> dict[str, Tensor]:
    r"""The entry-wise mean of several states of one architecture (a uniform model soup).

    Floating-point entries are averaged in float64 and cast back; other entries come from ``states[0]``.
    ``low_rank``: ``(A, B)`` names of LoRA factors; the mean of the ``B``\ s is the mean of the updates only
    where every state holds the same ``A`` (a frozen ``A``), so different ``A``\ s are refused (``ValueError``).

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
    for a_name, b_name in low_rank:
        if a_name in names and not all(torch.equal(s[a_name], states[0][a_name]) for s in states[1:]):
            raise ValueError(
                f"uniform_soup: the LoRA factor {a_name!r} differs between states, so averaging A and B apart does "
                f"not average the updates B@A (of {b_name!r}). Merge each state's adapter (peft's "
                "merge_and_unload()) and soup the merged models, or train with A frozen (shared by every state)."
            )
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
