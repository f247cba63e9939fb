"""DELTA's gradient through the main backward (gradient hooks on the regularized layers' outputs).

The closed-form ``∂P/∂F`` must equal autograd of the penalty (channel weights, token masks, padding that holds
NaN); in a fit, only the first capture runs a separate autograd pass (it checks that the loss reaches every
regularized output), unless DTNH needs ``r`` apart; an output the loss does not use keeps the separate pass,
and the run still equals the penalty written into the loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_transfer import DTNH, FeatureMapRegularization
from lightning_transfer.functional.feature_maps import (
    feature_map_penalty,
    feature_map_penalty_grad,
    gradient_reaches,
)
from tests.helpers import TinyClassifier, assert_params_close, params_of, quiet_trainer
from tests.test_feature_map import LAYERS


@pytest.mark.parametrize("case", ["plain", "weights", "mask", "half"])
def test_closed_form_gradient_equals_autograd_of_the_penalty(case):
    gen = torch.Generator().manual_seed(0)
    live = [torch.randn(4, 5, 6, generator=gen), torch.randn(4, 3, 2, 2, generator=gen)]
    ref = [torch.randn(4, 5, 6, generator=gen), torch.randn(4, 3, 2, 2, generator=gen)]
    kwargs = {}
    if case == "weights":
        kwargs = {"weights": [torch.rand(6, generator=gen), torch.rand(3, generator=gen)], "channel_dim": [2, 1]}
    if case == "mask":
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
        live[0][mask == 0] = ref[0][mask == 0] = float("nan")  # padding may hold anything
        kwargs = {"mask": mask}
    if case == "half":
        live = [t.to(torch.bfloat16) for t in live]
    live = [t.requires_grad_() for t in live]
    value = feature_map_penalty(live, ref, 0.7, **kwargs)
    expected = torch.autograd.grad(value, live)
    got_value, got = feature_map_penalty_grad(live, ref, 0.7, **kwargs)
    torch.testing.assert_close(got_value, value.detach(), rtol=1e-5, atol=1e-6)
    tol = {"rtol": 1e-2, "atol": 1e-3} if case == "half" else {"rtol": 1e-5, "atol": 1e-6}  # bf16 rounding
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        torch.testing.assert_close(g.to(e.dtype), e, **tol)


def test_gradient_reaches():
    x = torch.randn(3, 4, requires_grad=True)
    used, unused = x.tanh(), x.sin()
    inner = used * 2  # a later version of the graph: its slot, not `used`'s, is reached through `out`
    out = (inner + 1).sum()
    assert gradient_reaches(out, [used, unused, inner]) == [True, False, True]
    assert gradient_reaches(out, [out]) == [True]


def _count_autograd_passes(monkeypatch) -> list[int]:
    calls = [0]
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize("dtnh", [False, True])
def test_one_backward_after_the_first_capture(dtnh, monkeypatch):
    """Alone, DELTA runs its own autograd pass once (the first capture); with DTNH, at every capture."""
    calls = _count_autograd_passes(monkeypatch)
    callbacks = [FeatureMapRegularization(LAYERS, alpha=1.0), *([DTNH()] if dtnh else [])]
    quiet_trainer(max_steps=5, callbacks=callbacks).fit(TinyClassifier(batch_size=8))
    assert calls[0] == (5 if dtnh else 1)


class SideBranch(TinyClassifier):
    """A regularized layer (``side``) whose output the loss never uses; optionally its penalty in the loss."""

    def __init__(self, alpha: float | None = None, **kw):
        super().__init__(**kw)
        torch.manual_seed(3)
        self.side = nn.Linear(32, 8)
        self.alpha, self._frozen = alpha, []

    def forward(self, x):
        self._h = self.backbone(x)
        self._side = self.side(self._h)  # computed, never used by the loss
        return self.head(self._h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.alpha is None:
            return F.cross_entropy(self(x), y)
        if not self._frozen:  # the weights at fit start, in eval mode
            self._frozen.append(copy.deepcopy(nn.ModuleList([self.backbone, self.side])).eval().requires_grad_(False))
        logits = self(x)
        with torch.no_grad():
            ref_h = self._frozen[0][0](x)
            ref_side = self._frozen[0][1](ref_h)
        penalty = (self._side - ref_side).square().sum(1).mean() + (self._h - ref_h).square().sum(1).mean()
        return F.cross_entropy(logits, y) + self.alpha / 2 * penalty


def test_output_the_loss_does_not_use_keeps_the_separate_pass(monkeypatch):
    """The side output gets no gradient from the loss, so a hook on it would see none: every capture runs the
    separate pass, and the run equals the penalty (side and backbone) written into the loss."""
    alpha = 0.5
    ref = SideBranch(alpha=alpha, batch_size=8, norm=False)
    quiet_trainer(max_steps=4).fit(ref)
    calls = _count_autograd_passes(monkeypatch)
    model = SideBranch(batch_size=8, norm=False)
    cb = FeatureMapRegularization(["side", "backbone.1"], alpha=alpha, root="")
    quiet_trainer(max_steps=4, callbacks=[cb]).fit(model)
    assert calls[0] == 4
    assert_params_close(params_of(model), params_of(ref), rtol=1e-4, atol=1e-6)
