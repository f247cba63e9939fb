"""LiNeS: the depth-scaling rule written out per parameter; the callback against an independent evaluation."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_transfer import L2SP, FreezeSchedule, LiNeS, WiSEFT
from lightning_transfer.functional.interpolation import interpolate, lines, lines_scales, scale_updates
from tests.helpers import TinyClassifier, make_data, params_of, quiet_trainer

ALPHAS = [0.0, 0.25, 0.5, 1.0]
# TinyClassifier's blocks, written out by hand (not asked of the anatomy): backbone.0, backbone.1, then the head
DEPTH = {"backbone.0": 0, "backbone.1": 1}


# ---------------------------------------------------------------- pure functions

def test_lines_matches_the_rule_written_out_per_parameter():
    g = torch.Generator().manual_seed(0)
    names = ["stem.w", "stem.b", "b1.w", "b2.w", "b3.w"]
    depth = {"stem.w": 0, "stem.b": 0, "b1.w": 1, "b2.w": 2, "b3.w": 3}
    w0 = {n: torch.randn(3, 2, generator=g) for n in names}
    ft = {n: torch.randn(3, 2, generator=g) for n in names} | {"head.w": torch.randn(2, generator=g),
                                                               "n": torch.tensor(3)}
    for a, b in ((0.3, 0.5), (0.0, 2.0), (0.4, None)):
        out = lines(w0, ft, depth, 4, a, b)
        slope = 1 - a if b is None else b
        for n in names:
            expected = w0[n] + (a + slope * depth[n] / 3) * (ft[n] - w0[n])
            torch.testing.assert_close(out[n], expected, rtol=1e-6, atol=1e-6, msg=n)
        assert torch.equal(out["head.w"], ft["head.w"]) and out["n"].item() == 3  # no w0 / integer: fine-tuned
    last = lines(w0, ft, depth, 4, 0.4)  # beta=None: the last block keeps its whole update
    torch.testing.assert_close(last["b3.w"], ft["b3.w"])
    one = lines(w0, ft, dict.fromkeys(depth, 0), 1, 0.25, 0.7)  # one block: WiSE-FT with a
    for n in names:
        torch.testing.assert_close(one[n], interpolate(w0, ft, 0.25)[n])


def test_scale_updates_and_lines_refuse_bad_input():
    w0, ft = {"a": torch.zeros(2)}, {"a": torch.ones(2)}
    with pytest.raises(ValueError, match="coefficients must be finite numbers >= 0"):
        scale_updates(w0, ft, {"a": -0.5})
    with pytest.raises(KeyError, match="no coefficient for \\['a'\\]"):
        scale_updates(w0, ft, {})
    with pytest.raises(KeyError, match="no block index for \\['a'\\]"):
        lines(w0, ft, {}, 2, 0.5)
    with pytest.raises(ValueError, match="depths must be block indices in \\[0, 1\\]"):
        lines_scales({"a": 2}, 2, 0.5)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        lines_scales({"a": 0}, 2, 0.5, float("nan"))
    with pytest.raises(ValueError, match="shape"):
        lines({"a": torch.zeros(3)}, ft, {"a": 0}, 1, 0.5)


# ---------------------------------------------------------------- the callback

class Capture(Callback):
    """The fine-tuned state at train end, before LiNeS (listed after it) changes anything."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def reference_curve(w0: dict, ft: dict, alphas, beta):
    """Accuracy of each candidate on TinyClassifier's validation data; BatchNorm statistics computed directly."""
    x_train = make_data(64, 16, 4).tensors[0]
    x_val, y_val = make_data(32, 16, 4, seed=1).tensors
    curve, states = {}, {}
    for a in alphas:
        state = dict(ft)
        for n in w0:
            block = next((b for b in DEPTH if n.startswith(b + ".")), None)
            if block is not None:  # the head keeps its update
                scale = a + ((1 - a) if beta is None else beta) * DEPTH[block] / (len(DEPTH) - 1)
                state[n] = w0[n] + scale * (ft[n] - w0[n])
        h = x_train @ state["backbone.0.0.weight"].T
        state["backbone.0.1.running_mean"], state["backbone.0.1.running_var"] = h.mean(0), h.var(0)
        model = TinyClassifier()
        model.load_state_dict(state)
        with torch.no_grad():
            curve[a] = float((model.eval()(x_val).argmax(1) == y_val).float().mean())
        states[a] = state
    return curve, states


@pytest.mark.parametrize("beta", [None, 0.5])
def test_curve_and_final_weights_equal_independent_evaluation(beta):
    model = TinyClassifier(lr=0.3)
    w0 = params_of(model)
    capture, cb = Capture(), LiNeS(alphas=ALPHAS, beta=beta)
    trainer = quiet_trainer(max_epochs=3, callbacks=[capture, cb])
    trainer.fit(model)
    assert cb.depths == {n: DEPTH[n.rsplit(".", 2)[0]] for n in w0 if not n.startswith("head.")}
    curve, states = reference_curve(w0, capture.state, ALPHAS, beta)
    assert cb.curve == pytest.approx(curve, abs=1e-6)
    assert cb.best_alpha == max(curve, key=lambda a: (curve[a], a))
    assert len(set(curve.values())) > 1  # not flat: the check tells candidates apart
    for a, acc in curve.items():
        assert float(trainer.callback_metrics[f"lines/val_acc_a{a:.2f}"]) == pytest.approx(acc)
    expected = states[cb.best_alpha]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_shares_l2sp_anchors_and_resumes_toward_w0(tmp_path):
    def callbacks(ckpt=False):
        saver = [ModelCheckpoint(dirpath=tmp_path, save_last=True)] if ckpt else []
        return [L2SP(alpha=0.1, include_norm_and_bias=False), LiNeS(alphas=ALPHAS), *saver]

    full_cb = callbacks()
    full = TinyClassifier(lr=0.3)
    quiet_trainer(max_epochs=4, callbacks=full_cb).fit(full)
    lines_cb, l2sp = full_cb[1], full_cb[0]
    assert set(lines_cb._own) == {"backbone.0.1.weight", "backbone.0.1.bias", "backbone.1.0.bias"}
    assert all(lines_cb.pretrained()[n] is l2sp.anchors[n] for n in l2sp.anchors)  # one copy of w0
    assert set(lines_cb.state_dict()) == set(WiSEFT().state_dict()) == {"w0", "shared_with_l2sp"}  # one layout
    quiet_trainer(max_epochs=2, callbacks=callbacks(ckpt=True), enable_checkpointing=True).fit(TinyClassifier(lr=0.3))
    resumed_cb, resumed = callbacks(), TinyClassifier(lr=0.3, seed=5)
    quiet_trainer(max_epochs=4, callbacks=resumed_cb).fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    w0 = params_of(TinyClassifier(lr=0.3))
    assert all(torch.equal(t, w0[n]) for n, t in resumed_cb[1].pretrained().items())
    assert resumed_cb[1].curve == lines_cb.curve
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in full.state_dict().items())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"beta": -1.0}, ValueError, "beta"),
    ({"alphas": [0.5, 2.0]}, ValueError, "alphas"),
    ({"blocks": "backbone.0"}, TypeError, "blocks"),
])
def test_bad_arguments_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        LiNeS(**kwargs)


def test_unknown_blocks_fail_before_training():
    model = TinyClassifier()
    before = params_of(model)
    with pytest.raises(Exception, match="match no parameter"):
        quiet_trainer(max_epochs=1, callbacks=[LiNeS(blocks=["backbone.7"])]).fit(model)
    assert all(torch.equal(before[k], v) for k, v in params_of(model).items())


def test_explicit_blocks_set_the_depths():
    cb = LiNeS(alphas=[0.5], blocks=["backbone.0.0", "backbone.0.1|backbone.1"])
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(TinyClassifier())
    assert cb.num_blocks == 2 and cb.depths["backbone.0.0.weight"] == 0 and cb.depths["backbone.1.0.weight"] == 1
    assert cb.depths["backbone.0.1.weight"] == 1 and "head.weight" not in cb.depths


def test_a_transferred_parameter_outside_the_listed_blocks_fails_at_fit_start():
    """FreezeSchedule freezes backbone.0 at setup, so the anatomy accepts blocks that leave it out; it thaws
    later, so LiNeS keeps its w0 and needs its depth: refused before the first step, not when training ends."""
    model = TinyClassifier()
    before = params_of(model)
    callbacks = [FreezeSchedule(milestones={0: 1, 1: 0}, blocks=["backbone.0", "backbone.1"]),
                 LiNeS(blocks=["backbone.1"])]
    with pytest.raises(ValueError, match="belong to no block"):
        quiet_trainer(max_epochs=2, callbacks=callbacks).fit(model)
    assert all(torch.equal(before[k], v) for k, v in params_of(model).items())
