"""MaxEntropyHeadInit and RIFLE: exact head behaviour in real Trainer runs."""

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn

from lightning_transfer import AnatomyError
from lightning_transfer.callbacks import RIFLE, MaxEntropyHeadInit
from lightning_transfer.callbacks.rifle import reinit_points
from tests.helpers import TinyClassifier, params_of, quiet_trainer


class CaptureFirstLogits(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "logits"):
            with torch.no_grad():
                self.logits = pl_module(batch[0])


def test_mei_uniform_then_backbone_frozen_for_one_step():
    model = TinyClassifier(lr=0.1)  # SGD, weight_decay 0
    spy = CaptureFirstLogits()
    quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit(), spy]).fit(model)
    probs = torch.softmax(spy.logits, -1)
    torch.testing.assert_close(probs, torch.full_like(probs, 0.25))
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(entropy, torch.full_like(entropy, math.log(4)))
    end = params_of(model)
    assert not torch.equal(end["head.weight"], torch.zeros_like(end["head.weight"])), "the head did not move"


def test_mei_backbone_bit_identical_all_tensors_after_step1():
    model = TinyClassifier(lr=0.1)
    start = params_of(model)
    quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit()]).fit(model)
    end = params_of(model)
    for k in start:
        if k.startswith("backbone"):
            assert torch.equal(start[k], end[k]), k


def test_mei_mlp_head_zeroes_only_last_layer():
    class MLPHead(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    model = MLPHead()
    hidden = model.head[0].weight.detach().clone()
    cb = MaxEntropyHeadInit(head="head")
    quiet_trainer(max_steps=1, callbacks=[cb], limit_train_batches=1).fit(model)
    assert torch.count_nonzero(model.head[0].weight) > 0
    assert not torch.equal(model.head[0].weight, torch.zeros_like(hidden))


def test_mei_multilabel_sigmoid_is_one_half():
    class MultiLabel(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.binary_cross_entropy_with_logits(self(x), F.one_hot(y, 4).float())

    model = MultiLabel()
    spy = CaptureFirstLogits()
    quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit(), spy]).fit(model)
    torch.testing.assert_close(torch.sigmoid(spy.logits), torch.full_like(spy.logits, 0.5))


def test_mei_log_prior_bias():
    model = TinyClassifier()
    cb = MaxEntropyHeadInit(bias="log_prior")
    spy = CaptureFirstLogits()
    trainer = quiet_trainer(max_steps=1, callbacks=[cb, spy])
    trainer.fit(model)
    y = torch.cat([b[1] for b in model.train_dataloader()])
    prior = torch.bincount(y, minlength=4).float() / len(y)
    torch.testing.assert_close(torch.softmax(spy.logits[0], -1), prior)
    assert "mei/initial_entropy" in trainer.callback_metrics


def test_mei_not_reapplied_on_resume(tmp_path):
    model = TinyClassifier()
    trainer = quiet_trainer(max_epochs=1, callbacks=[MaxEntropyHeadInit()], enable_checkpointing=True,
                            default_root_dir=tmp_path)
    trainer.fit(model)
    ckpt = trainer.checkpoint_callback.best_model_path
    trained_head = model.head.weight.detach().clone()
    assert torch.count_nonzero(trained_head) > 0
    seen = {}

    class Peek(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["head"] = pl_module.head.weight.detach().clone()

    resumed = TinyClassifier()
    quiet_trainer(max_epochs=2, callbacks=[MaxEntropyHeadInit(), Peek()]).fit(resumed, ckpt_path=ckpt)
    torch.testing.assert_close(seen["head"], trained_head)


def test_mei_bad_input():
    with pytest.raises(ValueError, match="bias must be"):
        MaxEntropyHeadInit(bias="ones")
    with pytest.raises(ValueError, match="class_counts"):
        MaxEntropyHeadInit(class_counts=[3, 0])
    model = TinyClassifier()
    with pytest.raises(AnatomyError, match="Unknown head"):
        quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit(head="fc")]).fit(model)
    with pytest.raises(ValueError, match="class_counts has 3 entries"):
        quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit(bias="log_prior", class_counts=[1, 2, 3])]).fit(model)
    assert model.global_step == 0


@pytest.mark.parametrize(
    "epochs,n,after,expected",
    [(40, 3, 5, [10, 20, 30]), (40, 1, 5, [20]), (20, 2, 5, [7, 13]), (10, 2, 5, [3, 5]), (12, 2, 2, [4, 8])],
)
def test_reinit_points(epochs, n, after, expected):
    points = reinit_points(epochs, n, after)
    assert points == expected
    assert max(points) <= epochs - after and len(set(points)) == n


@pytest.mark.parametrize("epochs,n", [(5, 1), (8, 4), (3, 5)])
def test_reinit_schedule_that_cannot_fit(epochs, n):
    with pytest.raises(ValueError, match="cannot place|collide"):
        reinit_points(epochs, n, max(5, math.ceil(epochs / 8)))


class HeadTrace(Callback):
    """Records the head weight at every epoch start (after RIFLE) and end, and backbone at each start."""

    def __init__(self):
        self.start, self.end, self.backbone_end = {}, {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.start[trainer.current_epoch] = pl_module.head.weight.detach().clone()

    def on_train_epoch_end(self, trainer, pl_module):
        self.end[trainer.current_epoch] = pl_module.head.weight.detach().clone()
        self.backbone_end[trainer.current_epoch] = params_of(pl_module.backbone)


def test_rifle_reinits_exactly_at_schedule():
    rifle = RIFLE(num_reinits=2, min_epochs_after=2)  # 8 epochs: spacing min(8/3, 6/2) -> 3, 5
    trace = HeadTrace()
    quiet_trainer(max_epochs=8, callbacks=[rifle, trace]).fit(TinyClassifier())
    assert rifle.schedule == [3, 5] and rifle.done == [3, 5]
    for epoch in range(1, 8):
        changed = not torch.equal(trace.start[epoch], trace.end[epoch - 1])
        assert changed == (epoch in (3, 5)), epoch


def test_rifle_leaves_backbone_alone_and_clears_head_state():
    seen = {}

    class Check(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                opt = trainer.optimizers[0]
                seen["head_state"] = [p in opt.state for p in pl_module.head.parameters()]
                seen["backbone_state"] = all(p in opt.state for p in pl_module.backbone.parameters())
                seen["backbone"] = params_of(pl_module.backbone)

    trace = HeadTrace()
    quiet_trainer(max_epochs=8, callbacks=[RIFLE(points=[3], min_epochs_after=2), Check(), trace]).fit(TinyClassifier())
    assert seen["head_state"] == [False, False] and seen["backbone_state"]
    for k, v in seen["backbone"].items():
        assert torch.equal(v, trace.backbone_end[2][k]), "re-init touched the backbone"


def test_rifle_keeps_state_when_asked():
    seen = {}

    class Check(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                seen["head_state"] = [p in trainer.optimizers[0].state for p in pl_module.head.parameters()]

    rifle = RIFLE(points=[3], min_epochs_after=2, reset_optimizer_state=False)
    quiet_trainer(max_epochs=8, callbacks=[rifle, Check()]).fit(TinyClassifier())
    assert seen["head_state"] == [True, True]


def test_rifle_step_interval_and_zero_init():
    trace = {}

    class Peek(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            trace[trainer.global_step] = pl_module.head.weight.detach().clone()

    rifle = RIFLE(num_reinits=1, interval="step", init="zero")
    quiet_trainer(max_steps=16, callbacks=[rifle, Peek()]).fit(TinyClassifier())
    assert rifle.schedule == [8]  # last eighth kept free: spacing min(16/2, (16-2)/1) = 8
    assert torch.count_nonzero(trace[rifle.schedule[0]]) == 0


@pytest.mark.parametrize(("make", "trainer_args", "after"), [
    (lambda: RIFLE(points=[3], min_epochs_after=1, min_steps_after_last=9), {"max_epochs": 6}, 12),  # 4 steps/epoch
    (lambda: RIFLE(points=[3], min_epochs_after=1, min_steps_after_last=6), {"max_epochs": 6, "accumulate_grad_batches": 2}, 6),
    (lambda: RIFLE(points=[5], interval="step", min_steps_after_last=12), {"max_steps": 16}, 11),
])
def test_rifle_out_of_regime_warns_with_the_steps_after_the_last_reinit(make, trainer_args, after, recwarn):
    """Counted independently: optimizer steps from the last re-init to the end, per the trainer's own step count."""
    rifle, seen = make(), {}

    class CountSteps(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if rifle.done and "first" not in seen:
                seen["first"] = trainer.global_step

        def on_train_end(self, trainer, pl_module):
            seen["last"] = trainer.global_step

    trainer = quiet_trainer(callbacks=[rifle, CountSteps()], log_every_n_steps=1, **trainer_args)
    trainer.fit(TinyClassifier())
    assert rifle.steps_after_last == seen["last"] - seen["first"] == after
    assert float(trainer.callback_metrics["rifle/steps_after_last_reinit"]) == after
    regime = [w for w in recwarn if "out of its regime" in str(w.message)]
    assert len(regime) == (after < rifle.min_steps_after_last)
    if regime:
        assert f"only {after} optimizer steps follow the last re-init" in str(regime[0].message)


def test_rifle_bad_input():
    with pytest.raises(ValueError, match="interval"):
        RIFLE(interval="batch")
    with pytest.raises(ValueError, match="cannot place"):
        quiet_trainer(max_epochs=4, callbacks=[RIFLE()]).fit(TinyClassifier())
    with pytest.raises(ValueError, match="fall in the last"):
        quiet_trainer(max_epochs=10, callbacks=[RIFLE(points=[9])]).fit(TinyClassifier())


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"head": 3}, TypeError, "head must be a string or None"),
        ({"head": ""}, ValueError, "head must not be empty"),
        ({"bias": None}, ValueError, "bias must be one of"),
        ({"bias": "prior"}, ValueError, "bias must be one of"),
        ({"class_counts": 5}, TypeError, "class_counts must be a list"),
        ({"class_counts": "12"}, TypeError, "class_counts must be a list"),
        ({"class_counts": []}, ValueError, "class_counts must not be empty"),
        ({"class_counts": [3, -1]}, ValueError, "class_counts entries must be an integer >= 1"),
        ({"class_counts": [3, NAN]}, TypeError, "class_counts entries must be an integer"),
        ({"class_counts": [3, INF]}, TypeError, "class_counts entries must be an integer"),
        ({"class_counts": [3, 2.5]}, TypeError, "class_counts entries must be an integer"),
        ({"class_counts": [3, True]}, TypeError, "class_counts entries must be an integer"),
    ],
)
def test_mei_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=f"MaxEntropyHeadInit: {match}"):
        MaxEntropyHeadInit(**kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_reinits": 0}, ValueError, "num_reinits must be an integer >= 1"),
        ({"num_reinits": -2}, ValueError, "num_reinits must be an integer >= 1"),
        ({"num_reinits": 2.0}, TypeError, "num_reinits must be an integer"),
        ({"num_reinits": NAN}, TypeError, "num_reinits must be an integer"),
        ({"num_reinits": INF}, TypeError, "num_reinits must be an integer"),
        ({"num_reinits": True}, TypeError, "num_reinits must be an integer"),
        ({"points": 3}, TypeError, "points must be a list"),
        ({"points": "3"}, TypeError, "points must be a list"),
        ({"points": []}, ValueError, "points must not be empty"),
        ({"points": [0, 3]}, ValueError, "points entries must be an integer >= 1"),
        ({"points": [-1]}, ValueError, "points entries must be an integer >= 1"),
        ({"points": [2.5]}, TypeError, "points entries must be an integer"),
        ({"min_steps_after_last": -1}, ValueError, "min_steps_after_last must be an integer >= 0"),
        ({"min_steps_after_last": 10.5}, TypeError, "min_steps_after_last must be an integer"),
        ({"points": [NAN]}, TypeError, "points entries must be an integer"),
        ({"points": [True]}, TypeError, "points entries must be an integer"),
        ({"points": [3, 3]}, ValueError, "points must be distinct"),
        ({"interval": "batch"}, ValueError, "interval must be one of"),
        ({"min_epochs_after": -1}, ValueError, "min_epochs_after must be an integer >= 0"),
        ({"min_epochs_after": 1.5}, TypeError, "min_epochs_after must be an integer"),
        ({"min_epochs_after": INF}, TypeError, "min_epochs_after must be an integer"),
        ({"min_epochs_after": False}, TypeError, "min_epochs_after must be an integer"),
        ({"reset_optimizer_state": 1}, TypeError, "reset_optimizer_state must be True or False"),
        ({"reset_optimizer_state": "no"}, TypeError, "reset_optimizer_state must be True or False"),
        ({"init": "xavier"}, ValueError, "init must be one of"),
        ({"head": ["fc"]}, TypeError, "head must be a string or None"),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0"),
        ({"seed": 1.0}, TypeError, "seed must be an integer"),
        ({"seed": NAN}, TypeError, "seed must be an integer"),
        ({"seed": True}, TypeError, "seed must be an integer"),
    ],
)
def test_rifle_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=f"RIFLE: {match}"):
        RIFLE(**kwargs)
