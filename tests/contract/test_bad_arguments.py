"""The bad-input column of the contract: every argument of every callback, tried with invalid values.

The invalid values are derived from each ``__init__`` type hint (so a new argument or a new callback is
covered without writing its test): NaN, ±inf, negative, wrong type, a bool where a number is meant, an
unknown choice, an unknown module name. Each must fail with an error that names the argument (or the
unknown name), when the callback is built or at setup, before the first training step.
"""

from __future__ import annotations

import inspect
import math
import types
import typing

import pytest
from torch import nn

import lightning_transfer.callbacks as callbacks_module
from lightning_transfer import L2SP
from tests.helpers import TinyClassifier, quiet_trainer

CALLBACKS = [getattr(callbacks_module, n) for n in callbacks_module.__all__ if n != "GradientRegularizer"]
REQUIRED = {"FeatureMapRegularization": {"layers": ["backbone.0"]}, "FreezeSchedule": {"depth": 1},
            "CoTuning": {"source_head": nn.Linear(32, 5)}}
COMPANIONS = {"DTNH": lambda: [L2SP()]}  # what a callback needs beside it to reach its own checks
SIGNED = {"channel_dim"}  # arguments for which a negative value is valid (a dimension counted from the end)
NAMES = {"head", "layers", "blocks", "exclude", "root", "fisher"}  # module names / paths: unknown ones fail at setup
EXCLUSIVE: set[tuple[str, str]] = set()  # (callback, argument) pairs the generator cannot try


def _leaves(hint) -> list:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(hint) for leaf in _leaves(arg)]
    return [hint]


def _invalid_values(name: str, hint) -> list:
    leaves = _leaves(hint)
    kinds = {typing.get_origin(leaf) or leaf for leaf in leaves}
    choices = [c for leaf in leaves if typing.get_origin(leaf) is typing.Literal for c in typing.get_args(leaf)]
    values: list = []
    if float in kinds:
        values += [math.nan, math.inf, -math.inf, "0.1", True]
        values += [] if name in SIGNED else [-1.0]
    if int in kinds and float not in kinds:
        values += [1.5, math.nan, "1", True] + ([] if name in SIGNED else [-1])
    if bool in kinds:
        values += ["yes", 1]
    if choices:
        values += ["not-a-choice"]
    if str in kinds:
        values += [3]
    if list in kinds:
        values += ["a bare string", [3]] if name in NAMES or str in {a for leaf in leaves for a in typing.get_args(leaf)} \
            else [["x"], "x"]
    if dict in kinds:
        values += ["x", {"x": 1}]
    if name in NAMES:
        values += [["no.such.module"] if list in kinds else "no.such.module"]
    if any(isinstance(k, type) and issubclass(k, nn.Module) for k in kinds):
        values += ["not-a-module", 3]
    return values


def _cases():
    for cls in CALLBACKS:
        hints = typing.get_type_hints(cls.__init__)
        for name in inspect.signature(cls).parameters:
            if (cls.__name__, name) in EXCLUSIVE:
                continue
            for value in _invalid_values(name, hints[name]):
                yield pytest.param(cls, name, value, id=f"{cls.__name__}-{name}-{value!r}")


def test_every_argument_of_every_callback_has_invalid_values():
    """The generator must reach every argument: a hint it cannot read would leave an argument untried."""
    for cls in CALLBACKS:
        hints = typing.get_type_hints(cls.__init__)
        for name in inspect.signature(cls).parameters:
            if (cls.__name__, name) not in EXCLUSIVE:
                assert _invalid_values(name, hints[name]), f"{cls.__name__}.{name}: no invalid value derived"


def _names_it(err: BaseException, name: str, value) -> bool:
    """The message names the argument, or the unknown name given to it."""
    wanted = {name, str(value)} if isinstance(value, str) else {name}
    if isinstance(value, list) and value and isinstance(value[0], str):
        wanted.add(value[0])
    return any(w in str(err) for w in wanted)


@pytest.mark.parametrize("cls,name,value", list(_cases()))
def test_invalid_argument_fails_before_the_first_step(cls, name, value):
    required = {} if name == "milestones" else REQUIRED.get(cls.__name__, {})  # milestones exclude depth
    kwargs = {**required, name: value}
    try:
        callback = cls(**kwargs)
    except (TypeError, ValueError, FileNotFoundError) as err:
        assert _names_it(err, name, value), f"the error does not name {name!r}: {err}"
        return
    model = TinyClassifier()
    trainer = quiet_trainer(max_epochs=6, callbacks=[callback, *COMPANIONS.get(cls.__name__, list)()],
                            limit_val_batches=1)
    with pytest.raises((TypeError, ValueError, FileNotFoundError)) as info:
        trainer.fit(model)
    assert _names_it(info.value, name, value), f"the error does not name {name!r}: {info.value}"
    assert model.global_step == 0
