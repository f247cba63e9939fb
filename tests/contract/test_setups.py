"""The set-up column of the contract: every callback, in the set-ups users bring (see setups.SETUPS).

A set-up that only changes how data arrives or how the model is written (loaders passed to ``fit``, a
DataModule, dict batches, a ModelOutput, a frozen teacher beside the student, two optimizers, activation checkpointing of a block) must give
exactly the parameters of the plain set-up. A user's own frozen parameters must stay untouched and
frozen. An accumulation window that does not divide the epoch must survive a resume.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.contract.registry import REGISTRY, SINGLE, Model
from tests.contract.setups import SETUPS, USER_FROZEN, build, student_params
from tests.helpers import assert_params_close, quiet_trainer

LAYERS = Model(layers=("net.backbone.0", "net.backbone.1"))
# (callback entry, set-up) pairs that cannot be supported, with the clear error each gets at setup.
UNSUPPORTED: dict[tuple[str, str], str] = {}


def _fit(name: str, setup: str, seed: int = 0, **trainer_kwargs):
    entry = REGISTRY[name]
    module, fit_kwargs = build(setup, seed)
    kwargs = {"limit_val_batches": 2, **entry.trainer, **trainer_kwargs}
    trainer = quiet_trainer(max_epochs=entry.max_epochs, callbacks=entry.make(LAYERS), **kwargs)
    trainer.fit(module, **fit_kwargs)
    return module, trainer


_PLAIN: dict[str, dict[str, torch.Tensor]] = {}


def _plain(name: str) -> dict[str, torch.Tensor]:
    if name not in _PLAIN:
        _PLAIN[name] = student_params(_fit(name, "hooks")[0])
    return _PLAIN[name]


@pytest.mark.parametrize("setup", [s for s in SETUPS if s not in ("user_frozen", "odd_accumulation")])
@pytest.mark.parametrize("name", SINGLE)
def test_setup_trains_like_the_plain_setup(name, setup):
    if (name, setup) in UNSUPPORTED:
        module, fit_kwargs = build(setup)
        with pytest.raises(ValueError, match=UNSUPPORTED[(name, setup)]):
            quiet_trainer(max_epochs=1, callbacks=REGISTRY[name].make(LAYERS)).fit(module, **fit_kwargs)
        assert module.global_step == 0
        return
    module, _ = _fit(name, setup)
    assert_params_close(student_params(module), _plain(name), rtol=1e-5, atol=1e-6)
    if setup == "teacher":  # the frozen copy is never touched: not its head, not its blocks
        assert all(not p.requires_grad for p in module.teacher.parameters())
        start = build("hooks")[0]
        for (n, p), q in zip(module.teacher.named_parameters(), start.net.parameters()):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("name", SINGLE)
def test_users_frozen_parameters_stay_frozen_and_untouched(name):
    module, _ = _fit(name, "user_frozen")
    start = build("user_frozen")[0]
    frozen = module.get_submodule(USER_FROZEN)
    assert all(not p.requires_grad for p in frozen.parameters())
    for p, q in zip(frozen.parameters(), start.get_submodule(USER_FROZEN).parameters()):
        assert torch.equal(p, q)
    trained = student_params(module)
    assert any(not torch.equal(trained[k], v) for k, v in student_params(start).items())


@pytest.mark.parametrize("name", SINGLE)
def test_odd_accumulation_window_survives_a_resume(name, tmp_path):
    """3 batches per epoch, accumulate 2: each epoch ends on a partial window; resume at half-time."""
    entry = REGISTRY[name]
    half = entry.max_epochs // 2
    module, _ = build("hooks")
    every = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    kwargs = {"limit_val_batches": 2, **entry.trainer}
    quiet_trainer(max_epochs=entry.max_epochs, callbacks=[*entry.make(LAYERS), every], enable_checkpointing=True,
                  accumulate_grad_batches=2, **kwargs).fit(module)
    resumed, _ = build("hooks", seed=123)
    quiet_trainer(max_epochs=entry.max_epochs, callbacks=entry.make(LAYERS), accumulate_grad_batches=2,
                  **kwargs).fit(resumed, ckpt_path=tmp_path / f"epoch={half - 1}.ckpt")
    assert_params_close(student_params(resumed), student_params(module), rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(v).all() for v in student_params(module).values())
