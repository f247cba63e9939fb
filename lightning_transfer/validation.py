"""Argument and set-up checks shared by every callback: clear errors before the first step.

Each check names the callback, the argument, the value it got and what it accepts, so a typo in a
YAML file or a sweep never trains silently wrong (``alpha=nan`` would otherwise train to NaN weights).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from numbers import Integral, Real
from typing import Any

from lightning.pytorch import Trainer

__all__ = ["check_choice", "check_int", "check_number", "check_optional_str", "check_strategy", "check_strings"]


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
_SHARDED = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def check_strategy(trainer: Trainer, owner: str) -> None:
    """Reject the strategies a callback is not proven correct under, at setup, with the way out.

    Single-device and DDP strategies are supported by every callback (the contract suite runs them).
    Sharded strategies (FSDP, FSDP2 through ``ModelParallelStrategy``, DeepSpeed) split parameters and
    gradients across ranks: anchors, reference copies, norms and random re-initializations then need
    sharded counterparts that are not built yet, so the callback refuses instead of training wrong.
    """
    names = [cls.__name__ for cls in type(trainer.strategy).__mro__]
    if any(n in _REPLICATED for n in names):
        return
    kind = next((n for n in names if n in _SHARDED), type(trainer.strategy).__name__)
    raise ValueError(
        f"{owner} does not support {kind} yet: under sharded training each rank holds a shard of every "
        f"parameter and gradient, and {owner}'s state (anchors, reference copies, norms, re-initialized "
        "heads) is not sharded, so it would crash or train silently wrong. Use a single device or "
        "DDP (Trainer(strategy='ddp')) with this callback."
    )
