"""Argument and set-up checks shared by every callback: clear errors before the first step.

Each check names the callback, the argument, the value it got and what it accepts, so a typo in a
YAML file or a sweep never trains silently wrong (``alpha=nan`` would otherwise train to NaN weights).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

from lightning.pytorch import Trainer

__all__ = ["check_choice", "check_int", "check_int_list", "check_number", "check_optional_str", "check_strategy", "check_strings"]


def _kind_error(owner: str, name: str, value: Any, expected: str) -> TypeError:
    return TypeError(f"{owner}: {name} must be {expected}, got {value!r} ({type(value).__name__}).")


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """A finite real number within bounds (bools are refused: ``alpha=True`` is a typo, not 1.0).

    Example::

        >>> check_number("L2SP", "alpha", 0.01, minimum=0)
        0.01
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _kind_error(owner, name, value, "a real number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value}. Pass a finite value.")
    low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    high = maximum is not None and (value >= maximum if exclusive_maximum else value > maximum)
    if low or high:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if exclusive_minimum else '>='} {minimum:g}")
        if maximum is not None:
            bounds.append(f"{'<' if exclusive_maximum else '<='} {maximum:g}")
        raise ValueError(f"{owner}: {name} must be {' and '.join(bounds)}, got {value:g}.")
    return value


def check_int(owner: str, name: str, value: Any, *, minimum: int | None = None) -> int:
    """An integer (not a bool, not a float) ``>= minimum``.

    Example::

        >>> check_int("RIFLE", "num_reinits", 2, minimum=1)
        2
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _kind_error(owner, name, value, "an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value}.")
    return int(value)


def check_int_list(owner: str, name: str, value: Any, *, minimum: int | None = None, distinct: bool = False,
                   empty_hint: str = "") -> list[int]:
    """A non-empty list of integers ``>= minimum`` (optionally distinct).

    Example::

        >>> check_int_list("RIFLE", "points", [10, 20], minimum=1, distinct=True)
        [10, 20]
    """
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
        raise _kind_error(owner, name, value, "a list of integers")
    if not value:
        raise ValueError(f"{owner}: {name} must not be empty{'; ' + empty_hint if empty_hint else ''}.")
    ints = [check_int(owner, f"{name} entries", v, minimum=minimum) for v in value]
    if distinct and len(set(ints)) != len(ints):
        raise ValueError(f"{owner}: {name} must be distinct, got {ints}.")
    return ints


def check_choice(owner: str, name: str, value: Any, choices: Collection[Any]) -> Any:
    """One of ``choices``.

    Example::

        >>> check_choice("DTNH", "granularity", "tensor", ("tensor", "global"))
        'tensor'
    """
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.")
    return value


def check_strings(owner: str, name: str, value: Any, *, allow_empty: bool = True) -> list[str]:
    """A list of strings (a bare string is refused: ``layers="backbone.layer4"`` would iterate characters)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise _kind_error(owner, name, value, "a list of strings")
    if not allow_empty and not value:
        raise ValueError(f"{owner}: {name} must not be empty.")
    return list(value)


def check_optional_str(owner: str, name: str, value: Any) -> str | None:
    """``None`` or a non-empty string (a dotted module name, a path)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{owner}: {name} must be a string or None, got {value!r} ({type(value).__name__}).")
    if not value:
        raise ValueError(f"{owner}: {name} must not be empty; pass None for the default.")
    return value


# Strategies whose parameters are the model's own tensors, replicated on every rank.
_REPLICATED = ("SingleDeviceStrategy", "DDPStrategy", "SingleDeviceXLAStrategy", "XLAStrategy")
_FSDP2 = "ModelParallelStrategy"  # FSDP2 (fully_shard): DTensor parameters sharded on dim 0
_UNSUPPORTED = {
    "FSDPStrategy": "FSDP1 (FSDPStrategy) needs a GPU and has not been verified with this library; use "
                    "ModelParallelStrategy with fully_shard in configure_model (FSDP2), or DDP",
    "DeepSpeedStrategy": "DeepSpeed keeps parameters and gradients in its own flat partitioned buffers, which "
                         "the library's anchors, projections and re-initializations cannot address; use "
                         "ModelParallelStrategy with fully_shard in configure_model (FSDP2), or DDP",
}


def check_strategy(trainer: Trainer, owner: str, sharded: bool = False, reason: str | None = None) -> None:
    """Reject the strategies a callback is not proven correct under, at setup, with the way out.

    Single-device and DDP strategies are supported by every callback (the contract suite runs them).
    ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) is accepted when the callback passes
    ``sharded=True`` (it works on local shards, tested against single-process runs); otherwise the
    error names ``reason`` (what the callback would need under sharding). FSDP1 and DeepSpeed are
    rejected for every callback, with the same error.

    Args:
        trainer: The Trainer being set up (only ``trainer.strategy`` is read).
        owner: The callback's name, for the message.
        sharded: Whether ``owner`` supports FSDP2 through ``ModelParallelStrategy``.
        reason: Why ``owner`` does not (when ``sharded=False``).
    """
    names = [cls.__name__ for cls in type(trainer.strategy).__mro__]
    for kind, why in _UNSUPPORTED.items():  # first: DeepSpeedStrategy subclasses DDPStrategy
        if kind in names:
            raise ValueError(f"{owner} does not support {kind}: {why}.")
    if any(n in _REPLICATED for n in names):
        return
    if _FSDP2 in names:
        if sharded:
            return
        raise ValueError(
            f"{owner} does not support sharded training (ModelParallelStrategy / FSDP2): "
            f"{reason or 'its state is not sharded'}. Use a single device or DDP (Trainer(strategy='ddp')) "
            f"with {owner}."
        )
    raise ValueError(
        f"{owner} does not support {type(trainer.strategy).__name__}: only single-device, DDP and "
        "ModelParallelStrategy (FSDP2) strategies are tested. Use one of those."
    )
