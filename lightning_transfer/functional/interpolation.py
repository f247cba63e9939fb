"""Weight-space ensembling: linear interpolation between two models (WiSE-FT), updates scaled per entry (LiNeS:
by depth) and uniform averages (soups).

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

__all__ = ["check_low_rank_start", "interpolate", "lines", "lines_scales", "scale_updates", "uniform_soup"]

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
    return _scaled(w0, w_ft, {n: float(alpha) for n in w0}, missing, low_rank, "interpolate")


def scale_updates(
    w0: Mapping[str, Tensor],
    w_ft: Mapping[str, Tensor],
    scales: Mapping[str, float],
    missing: Literal["finetuned", "error"] = "finetuned",
    low_rank: LowRank = (),
) -> dict[str, Tensor]:
    """``w0 + s·(w_ft − w0)`` with a coefficient ``s = scales[name]`` per entry (``s >= 0``; above 1 extrapolates).

    :func:`interpolate` is the case of one ``s`` for every entry; LiNeS (:func:`lines`) sets ``s`` by depth.
    Every entry of ``w0`` needs a coefficient; entries of ``w_ft`` without a pre-trained value, integer entries
    and ``low_rank`` factors are treated as in :func:`interpolate` (``B ← s·B_ft`` with ``s`` of ``B``'s name).

    Example::

        >>> out = scale_updates({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.ones(1), "b": torch.ones(1)},
        ...                     {"a": 0.25, "b": 1.0})
        >>> out["a"].tolist(), out["b"].tolist()
        ([0.25], [1.0])
    """
    bad = {n: s for n, s in scales.items()
           if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(s) or s < 0}
    if bad:
        raise ValueError(f"scale_updates: coefficients must be finite numbers >= 0, got {dict(list(bad.items())[:3])}.")
    lacking = [n for n in w0 if n not in scales]
    if lacking:
        raise KeyError(f"scale_updates: no coefficient for {lacking[:5]}; give one for every entry of w0.")
    return _scaled(w0, w_ft, scales, missing, low_rank, "scale_updates")


def lines_scales(depths: Mapping[str, int], num_blocks: int, alpha: float, beta: float | None = None) -> dict[str, float]:
    """LiNeS coefficients (Wang et al., ICLR 2025): ``α + β·l/(L − 1)`` for an entry in block ``l`` of ``L``.

    Blocks count from 0 (the first block gets ``α``, the last ``α + β``). ``beta=None`` means ``β = 1 − α``:
    the last block keeps its whole update (the paper's single-task setting). One block (``L = 1``) gets ``α``.

    Example::

        >>> lines_scales({"stem": 0, "mid": 1, "top": 2}, 3, 0.5)
        {'stem': 0.5, 'mid': 0.75, 'top': 1.0}
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is None and name == "beta":
            continue
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"lines_scales: {name} must be a finite number >= 0, got {value!r}.")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"lines_scales: num_blocks must be an int >= 1, got {num_blocks!r}.")
    outside = {n: d for n, d in depths.items() if not isinstance(d, int) or not 0 <= d < num_blocks}
    if outside:
        raise ValueError(f"lines_scales: depths must be block indices in [0, {num_blocks - 1}], got "
                         f"{dict(list(outside.items())[:3])}.")
    b = 1.0 - float(alpha) if beta is None else float(beta)
    return {n: float(alpha) + (b * d / (num_blocks - 1) if num_blocks > 1 else 0.0) for n, d in depths.items()}


def lines(
    w0: Mapping[str, Tensor],
    w_ft: Mapping[str, Tensor],
    depths: Mapping[str, int],
    num_blocks: int,
    alpha: float,
    beta: float | None = None,
    low_rank: LowRank = (),
) -> dict[str, Tensor]:
    """LiNeS: ``w0 + (α + β·l/(L − 1))·(w_ft − w0)`` for every entry of ``w0`` in block ``l`` of ``L``.

    ``depths``: the block index of every entry of ``w0``; entries of ``w_ft`` without a pre-trained value (a new
    head) keep their fine-tuned values. See :func:`lines_scales` (``beta=None``: ``β = 1 − α``) and
    :func:`scale_updates`.

    Example::

        >>> w = lines({"s": torch.zeros(1), "t": torch.zeros(1)}, {"s": torch.ones(1), "t": torch.ones(1),
        ...           "head": torch.ones(1)}, {"s": 0, "t": 1}, 2, 0.5)
        >>> w["s"].tolist(), w["t"].tolist(), w["head"].tolist()
        ([0.5], [1.0], [1.0])
    """
    lacking = [n for n in w0 if n not in depths]
    if lacking:
        raise KeyError(f"lines: no block index for {lacking[:5]}; give the depth of every entry of w0.")
    return scale_updates(w0, w_ft, lines_scales({n: depths[n] for n in w0}, num_blocks, alpha, beta),
                         low_rank=low_rank)


def _scaled(w0: Mapping[str, Tensor], w_ft: Mapping[str, Tensor], scales: Mapping[str, float], missing: str,
            low_rank: LowRank, what: str) -> dict[str, Tensor]:
    if missing not in ("finetuned", "error"):
        raise ValueError(f"{what}: missing must be 'finetuned' or 'error', got {missing!r}.")
    extra = [n for n in w0 if n not in w_ft]
    if extra:
        raise KeyError(f"{what}: w0 has entries the fine-tuned state lacks: {extra[:5]}; pass states of one model.")
    absent = [n for n in w_ft if n not in w0]
    if absent and missing == "error":
        raise KeyError(f"{what}: no pre-trained value for {absent[:5]} (a new head?); pass missing='finetuned' "
                       "to keep their fine-tuned values.")
    check_low_rank_start(w0, low_rank)
    factors = {n: (kind, b_name) for a_name, b_name in low_rank if all(n in w0 and n in w_ft for n in (a_name, b_name))
               for n, kind in zip((a_name, b_name), "AB")}
    out = {}
    for name, ft in w_ft.items():
        if name in factors:  # LoRA: A_ft and s·B_ft, the scaled update s·B@A from B0@A0 = 0
            kind, b_name = factors[name]
            out[name] = ft.clone() if kind == "A" else ft * float(scales[b_name])
            continue
        if name not in w0 or not ft.is_floating_point():
            out[name] = ft.clone()
            continue
        _check_pair(name, w0[name], ft, what)
        out[name] = torch.lerp(w0[name].to(device=ft.device, dtype=ft.dtype), ft, float(scales[name]))
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
