"""The fused-optimizer column of the contract: under a 16-bit GradScaler, an optimizer that unscales inside its
own step (``fused=True`` Adam, AdamW, SGD) trains exactly like the same optimizer unfused.

Lightning unscales ``.grad`` before ``on_before_optimizer_step`` for an ordinary optimizer, and leaves it
multiplied by the loss scale ``S`` for a fused one (whose step divides by ``S``): a regularizer that added its
unscaled gradient there would be divided by ``S``, i.e. silently switched off (``S = 2**13`` here).
"""

from functools import cache

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_transfer import RIFLE, FreezeSchedule
from lightning_transfer.callbacks.base import GradientRegularizer
from lightning_transfer.optim import reset_optimizer_state
from tests.contract.registry import REGISTRY, Model
from tests.helpers import ACCELERATOR, TinyClassifier, params_of, quiet_trainer

DEVICE = "cuda" if ACCELERATOR == "gpu" else "cpu"
OPTIMIZERS = {"sgd": 0.02, "adam": 1e-3, "adamw": 1e-3}  # name -> lr (SGD with momentum 0.9)
RTOL = 1e-4  # fused vs unfused: the same math, rounded differently


def _update(name: str, optimizer: str, fused: bool, with_callbacks: bool = True,
            init_scale: float = 2.0**13) -> tuple[dict[str, torch.Tensor], float, dict[str, float]]:
    """The parameter update of the entry's run (1 batch per epoch, the entry's epochs), the final loss scale
    and the callbacks' last logged metrics (``l2sp/penalty``, ``dtnh/removed_norm``, ...)."""
    entry = REGISTRY[name]
    model = TinyClassifier(**{**entry.module, "batch_size": 16, "lr": OPTIMIZERS[optimizer], "optimizer": optimizer,
                              "fused": fused})
    start = params_of(model)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=init_scale)
    callbacks = entry.make(Model()) if with_callbacks else []
    trainer = quiet_trainer(max_epochs=entry.max_epochs, limit_train_batches=1, callbacks=callbacks,
                            plugins=[MixedPrecision("16-mixed", DEVICE, scaler=scaler)], **entry.trainer)
    trainer.fit(model)
    end = params_of(model)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
    return {k: end[k] - start[k] for k in start}, float(scaler.get_scale()), metrics


@cache
def _plain_update(optimizer: str, max_epochs: int, module: tuple) -> dict[str, torch.Tensor]:
    """The fused run without any callback (shared by the entries of the same length and module)."""
    name = next(n for n, e in REGISTRY.items() if e.max_epochs == max_epochs and tuple(sorted(e.module.items())) == module)
    return _update(name, optimizer, fused=True, with_callbacks=False)[0]


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].norm() ** 2) for k in b) ** 0.5
    return num / max(den, 1e-12)


def _has(name: str, *types: type) -> bool:
    return any(isinstance(cb, types) for cb in REGISTRY[name].make(Model()))


def _regularizes(name: str) -> bool:
    return _has(name, GradientRegularizer)


def _adds_gradient(name: str) -> bool:
    """Whether a callback of the entry adds to ``.grad`` (not a decoupled pull, which acts on the weights)."""
    return any(isinstance(cb, GradientRegularizer) and cb.contributes_gradient for cb in REGISTRY[name].make(Model()))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(REGISTRY))
def test_fused_optimizer_under_gradscaler_keeps_the_math(name, optimizer):
    fused, fused_scale, fused_logged = _update(name, optimizer, fused=True)
    unfused, unfused_scale, unfused_logged = _update(name, optimizer, fused=False)
    assert fused_scale == unfused_scale  # the same steps were skipped (none here)
    error = _relative_error(fused, unfused)
    assert error < RTOL, f"fused {optimizer} differs from unfused by {error:.2e} (relative)"
    # logged values describe the unscaled math too (a penalty, a removed norm are not multiplied by S)
    assert fused_logged.keys() == unfused_logged.keys()
    for key, value in unfused_logged.items():
        assert fused_logged[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
    if _adds_gradient(name):  # the regularizer moves the update far more than the tolerance: its loss would show
        entry = REGISTRY[name]
        plain = _plain_update(optimizer, entry.max_epochs, tuple(sorted(entry.module.items())))
        assert _relative_error(plain, unfused) > 20 * RTOL


@pytest.mark.parametrize("name", [n for n in REGISTRY if _regularizes(n)])
def test_fused_optimizer_skips_the_same_nonfinite_steps(name):
    """A loss scale of 2**20 overflows the fp16 backward: the scaler skips the first steps and halves the scale
    until it fits, then steps. Nothing a callback adds may turn a skipped step into a taken one or the reverse."""
    fused, fused_scale, _ = _update(name, "adam", fused=True, init_scale=2.0**20)
    unfused, unfused_scale, _ = _update(name, "adam", fused=False, init_scale=2.0**20)
    assert fused_scale == unfused_scale < 2.0**20  # steps were skipped, the same number of them
    assert all(torch.isfinite(v).all() for v in fused.values())
    assert sum(float(v.norm()) for v in unfused.values()) > 0  # ... and later ones taken
    assert _relative_error(fused, unfused) < RTOL


class _DampenedFusedSGD(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, dampening=0.5, fused=True)


@pytest.mark.parametrize("make", [lambda: FreezeSchedule(milestones={0: 1, 1: 0}), lambda: RIFLE(points=[1], min_epochs_after=1)])
def test_fresh_state_under_fused_sgd_with_dampening_is_refused_before_a_step(make):
    """Fresh state (a zero momentum buffer) equals torch's first step only without dampening: refused."""
    model = _DampenedFusedSGD()
    with pytest.raises(ValueError, match="dampening=0.5"):
        quiet_trainer(max_epochs=3, callbacks=[make()]).fit(model)
    assert model.global_step == 0


def test_reset_state_in_fused_sgd_equals_a_first_step():
    """A parameter given fresh state in a fused SGD group whose others hold momentum buffers steps exactly as
    the same parameter's first step in unfused SGD (torch's fused step alone fails on the missing buffer)."""
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
        opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9, nesterov=True, fused=fused)
        for step in range(3):
            a.grad, b.grad = torch.full((5,), 1.0 + step), torch.full((5,), 2.0 - step)
            opt.step()
            if step == 0:
                reset_optimizer_state([opt], [b])
        runs.append((a.detach().clone(), b.detach().clone()))
    torch.testing.assert_close(runs[0], runs[1])
