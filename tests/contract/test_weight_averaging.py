"""The weight-averaging column: every entry of the registry with Lightning's ``EMAWeightAveraging`` listed
before and after its callbacks.

Weight averaging swaps the average into the model for validation and copies it in at train end, so a
callback that reads or sets weights in those hooks could depend on the order of ``callbacks=[...]``.
Each entry runs three times: without averaging, with it first, with it last. Both orders must leave the
same parameters, bit for bit; the training trajectory must be the one without averaging (the swaps
leave nothing behind, the callbacks act as they would alone); and the final weights must be the EMA of
that trajectory, computed here, or for WiSEFT the interpolation of ``w0`` and that EMA at the chosen ``a``.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_transfer import LiNeS, WiSEFT
from tests.contract.registry import REGISTRY, Model
from tests.helpers import TinyClassifier, assert_params_close, params_of, quiet_trainer

DECAY = 0.5  # a short memory: after a few steps the average is far from both the start and the last step


class Trajectory(Callback):
    """The parameters after every optimizer step (``on_train_batch_end``, where the averaging updates)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(params_of(pl_module))


def hand_ema(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """EMAWeightAveraging's average: the first update copies the weights, then ``d·avg + (1 − d)·p``."""
    average = dict(steps[0])
    for p in steps[1:]:
        average = {k: decay * average[k] + (1 - decay) * p[k] for k in average}
    return average


def _run(name: str, averaging: str | None) -> tuple[dict, list[dict], list[Callback]]:
    """Two batches per epoch and one validation batch (the averaging swaps weights around each validation)."""
    entry = REGISTRY[name]
    model = TinyClassifier(**entry.module)
    callbacks, trajectory = entry.make(Model()), Trajectory()
    if averaging == "first":
        callbacks = [EMAWeightAveraging(decay=DECAY), *callbacks]
    elif averaging == "last":
        callbacks = [*callbacks, EMAWeightAveraging(decay=DECAY)]
    quiet_trainer(max_epochs=entry.max_epochs, limit_train_batches=2, callbacks=[*callbacks, trajectory],
                  **{"limit_val_batches": 1, **entry.trainer}).fit(model)
    return params_of(model), trajectory.steps, callbacks


@pytest.mark.parametrize("name", list(REGISTRY))
def test_weight_averaging_first_or_last_gives_the_same_model(name):
    start = params_of(TinyClassifier(**REGISTRY[name].module))
    _, plain_steps, _ = _run(name, None)
    first, first_steps, first_callbacks = _run(name, "first")
    last, last_steps, _ = _run(name, "last")

    assert all(torch.isfinite(v).all() for v in first.values())
    assert_params_close(first, last, rtol=0, atol=0)
    for steps in (first_steps, last_steps):  # the callbacks trained as they do without averaging
        assert len(steps) == len(plain_steps)
        for mine, plain in zip(steps, plain_steps):
            assert_params_close(mine, plain, rtol=0, atol=0)

    average = hand_ema(first_steps, DECAY)
    assert any(not torch.allclose(average[k], first_steps[-1][k]) for k in average)  # the average is not w_ft
    wise = next((cb for cb in first_callbacks if isinstance(cb, (WiSEFT, LiNeS))), None)
    if wise is None:
        expected = average
    else:  # interpolation (LiNeS: depth-scaled) toward the average; the head keeps its (averaged) fine-tuned value
        a = wise.best_alpha
        if isinstance(wise, LiNeS):  # TinyClassifier's blocks backbone.0, backbone.1: a + b·l/(2 − 1)
            slope = 1 - a if wise.beta is None else wise.beta
            scale = {k: a + slope * int(k.split(".")[1]) for k in average if k.startswith("backbone.")}
        else:
            scale = {k: a for k in average if not k.startswith("head.")}
        expected = {k: start[k] + scale[k] * (v - start[k]) if k in scale else v for k, v in average.items()}
    assert_params_close(first, expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(start[k], first[k]) for k in start)
