"""WiSE-FT: interpolation math against hand computations; the callback against an independent evaluation."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_transfer import L2SP, WiSEFT
from lightning_transfer.functional.interpolation import interpolate, uniform_soup
from tests.helpers import TinyClassifier, launch_env, make_data, params_of, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


# ---------------------------------------------------------------- pure functions

def test_interpolate_matches_hand_computation():
    w0 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, 4.0]])}
    ft = {"a": torch.tensor([3.0, -2.0]), "b": torch.tensor([[2.0, 0.0]]), "head": torch.tensor([5.0]),
          "count": torch.tensor(7)}
    out = interpolate(w0, ft, 0.25)
    assert out["a"].tolist() == [1.5, 1.0]  # 0.75·1 + 0.25·3, 0.75·2 + 0.25·(−2)
    assert out["b"].tolist() == [[0.5, 3.0]]
    assert out["head"].tolist() == [5.0] and out["count"].item() == 7  # no pre-trained value / integer: fine-tuned
    assert all(torch.equal(interpolate(w0, ft, 0.0)[k], w0[k]) for k in w0)
    assert all(torch.equal(interpolate(w0, ft, 1.0)[k], ft[k]) for k in ft)
    assert out["head"] is not ft["head"]  # copies, never aliases of the inputs


def test_interpolate_refuses_bad_input():
    w0, ft = {"a": torch.zeros(2)}, {"a": torch.ones(2), "head": torch.ones(1)}
    with pytest.raises(KeyError, match="no pre-trained value for \\['head'\\]"):
        interpolate(w0, ft, 0.5, missing="error")
    with pytest.raises(KeyError, match="lacks"):
        interpolate({"zzz": torch.zeros(1)}, ft, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate({"a": torch.zeros(3)}, ft, 0.5)
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\]"):
            interpolate(w0, ft, bad)


def test_uniform_soup_matches_hand_computation():
    states = [{"w": torch.tensor([0.0, 3.0]), "n": torch.tensor(1)}, {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(5)},
              {"w": torch.tensor([6.0, 6.0]), "n": torch.tensor(9)}]
    soup = uniform_soup(states)
    assert soup["w"].tolist() == [3.0, 3.0] and soup["n"].item() == 1
    with pytest.raises(ValueError, match="no states"):
        uniform_soup([])
    with pytest.raises(KeyError, match="other entries"):
        uniform_soup([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}])


# ---------------------------------------------------------------- an independent evaluation

class Capture(Callback):
    """The fine-tuned state at train end, before WiSEFT (listed first) changes anything."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def independent_curve(w0: dict, ft_state: dict, alphas, norm: bool = True):
    """Accuracy of ``(1−a)·w0 + a·w_ft`` (head kept fine-tuned) on TinyClassifier's validation data, with
    the BatchNorm statistics computed directly: mean and unbiased variance of ``x @ W.T`` over the training set."""
    x_train = make_data(64, 16, 4).tensors[0]
    x_val, y_val = make_data(32, 16, 4, seed=1).tensors
    curve, states = {}, {}
    for a in alphas:
        model = TinyClassifier(norm=norm)
        state = dict(ft_state)
        for n, p in w0.items():
            if not n.startswith("head."):
                state[n] = (1 - a) * p + a * ft_state[n]
        if norm:
            h = x_train @ state["backbone.0.0.weight"].T
            state["backbone.0.1.running_mean"], state["backbone.0.1.running_var"] = h.mean(0), h.var(0)
        model.load_state_dict(state)
        with torch.no_grad():
            curve[a] = float((model.eval()(x_val).argmax(1) == y_val).float().mean())
        states[a] = state
    return curve, states


def fit(callbacks, epochs=3, model=None, **kwargs):
    model = model or TinyClassifier()
    w0 = params_of(model)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **kwargs)
    trainer.fit(model)
    return model, w0, trainer


@pytest.mark.parametrize("norm", [True, False])
def test_curve_and_final_weights_equal_independent_evaluation(norm):
    capture, wise = Capture(), WiSEFT(alphas=ALPHAS)
    model, w0, trainer = fit([capture, wise], model=TinyClassifier(norm=norm, lr=0.3))
    curve, states = independent_curve(w0, capture.state, ALPHAS, norm)
    assert wise.curve == pytest.approx(curve, abs=1e-6)
    assert wise.best_alpha == max(curve, key=lambda a: (curve[a], a))
    assert len(set(curve.values())) > 1  # the curve is not flat: the check can tell alphas apart
    for a, acc in curve.items():
        assert float(trainer.callback_metrics[f"wise_ft/val_acc_a{a:.2f}"]) == pytest.approx(acc)
    assert float(trainer.callback_metrics["wise_ft/best_alpha"]) == wise.best_alpha
    expected = states[wise.best_alpha]  # weights and (per-candidate) re-estimated statistics of the chosen a
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_alpha_one_reproduces_the_finetuned_model_and_finetuned_select_restores_exactly():
    capture = Capture()
    model, _, _ = fit([capture, WiSEFT(alphas=[1.0])])
    ft_params = {k: v for k, v in capture.state.items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ft_params.items())
    capture = Capture()
    model, _, _ = fit([capture, WiSEFT(alphas=ALPHAS[::-1], select="finetuned")])  # 1.0 not last
    assert all(torch.equal(model.state_dict()[k], v) for k, v in capture.state.items())  # BN statistics too
    assert model.training  # modes restored


def test_every_validation_logs_and_leaves_training_unchanged():
    kwargs = dict(limit_val_batches=None, epochs=3)
    wise = WiSEFT(alphas=[1.0, 0.0, 0.5], every_validation=True, select="finetuned")  # 1.0 not last
    with_wise, _, trainer = fit([wise], **kwargs)
    plain, _, _ = fit([], **kwargs)
    assert all(torch.equal(with_wise.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert len(wise.history) == 3 and wise.history[-1] == wise.curve
    assert "wise_ft/val_acc_a0.50" in trainer.logged_metrics  # through pl_module.log at validation


def test_reuses_l2sp_anchors_without_a_second_copy():
    wise, l2sp = WiSEFT(alphas=[0.0, 1.0]), L2SP(alpha=0.1)
    model, w0, _ = fit([wise, l2sp])  # WiSEFT first: it must not depend on the callbacks' order
    pretrained, anchors = wise.pretrained(), l2sp.anchors
    assert set(anchors) == {n for n in w0 if not n.startswith("head.")} == set(pretrained)
    for n in anchors:
        assert pretrained[n] is anchors[n] and pretrained[n].data_ptr() == anchors[n].data_ptr()
        torch.testing.assert_close(pretrained[n], w0[n])
    assert wise._own == {} and wise.state_dict()["w0"] == {}
    # L2SP without norm/bias anchors: WiSEFT copies exactly those
    wise, l2sp = WiSEFT(alphas=[0.5]), L2SP(alpha=0.1, include_norm_and_bias=False)
    fit([l2sp, wise])
    assert set(wise._own) == {"backbone.0.1.weight", "backbone.0.1.bias", "backbone.1.0.bias"}
    assert set(wise.pretrained()) == set(wise._own) | set(l2sp.anchors)


@pytest.mark.parametrize("with_l2sp", [False, True])
def test_resume_equals_uninterrupted(tmp_path, with_l2sp):
    def callbacks(ckpt=None):
        extra = [L2SP(alpha=0.1)] if with_l2sp else []
        saver = [ModelCheckpoint(dirpath=tmp_path, save_last=True)] if ckpt else []
        return [*extra, WiSEFT(alphas=ALPHAS), *saver]

    full_cb = callbacks()
    full, _, _ = fit(full_cb, epochs=4, model=TinyClassifier(lr=0.3))
    fit(callbacks(ckpt=True), epochs=2, model=TinyClassifier(lr=0.3), enable_checkpointing=True)
    resumed_cb = callbacks()
    resumed = TinyClassifier(lr=0.3, seed=5)  # other init: the checkpoint's weights replace it
    quiet_trainer(max_epochs=4, callbacks=resumed_cb).fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    w0 = params_of(TinyClassifier(lr=0.3))
    for n, t in resumed_cb[-1].pretrained().items():  # the pre-trained weights, not the resume point
        assert torch.equal(t, w0[n]), n
    assert resumed_cb[-1].curve == full_cb[-1].curve
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in full.state_dict().items())


def test_added_on_resume_without_l2sp_is_an_error(tmp_path):
    fit([ModelCheckpoint(dirpath=tmp_path, save_last=True)], epochs=1, enable_checkpointing=True)
    trainer = quiet_trainer(max_epochs=2, callbacks=[WiSEFT()])
    with pytest.raises(ValueError, match="was not in the run that saved this checkpoint"):
        trainer.fit(TinyClassifier(), ckpt_path=tmp_path / "last.ckpt")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"alphas": []}, ValueError, "must not be empty"),
    ({"alphas": [0.5, 1.5]}, ValueError, "<= 1"),
    ({"alphas": [-0.1]}, ValueError, ">= 0"),
    ({"alphas": [float("nan")]}, ValueError, "finite"),
    ({"alphas": "0.5"}, TypeError, "list of numbers"),
    ({"alphas": [0.5, 0.5]}, ValueError, "distinct"),
    ({"select": "worst"}, ValueError, "select must be one of"),
    ({"every_validation": 1}, TypeError, "True or False"),
    ({"bn_batches": 0}, ValueError, ">= 1"),
    ({"head": ""}, ValueError, "must not be empty"),
])
def test_bad_arguments_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        WiSEFT(**kwargs)


class NoValidation(TinyClassifier):
    val_dataloader = LightningModule.val_dataloader  # not overridden: the fit has no validation data


def test_setup_errors_come_before_training():
    model = NoValidation()
    before = params_of(model)
    with pytest.raises(ValueError, match="has none: give the DataModule"):
        quiet_trainer(max_epochs=1, callbacks=[WiSEFT()]).fit(model)
    assert all(torch.equal(before[k], v) for k, v in params_of(model).items())
    with pytest.raises(Exception, match="Unknown head"):
        quiet_trainer(max_epochs=1, callbacks=[WiSEFT(head="nope")]).fit(TinyClassifier())


# ---------------------------------------------------------------- with Lightning's weight averaging

class Trajectory(Callback):
    """The parameters after every optimizer step (on_train_batch_end, where WeightAveraging updates)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(params_of(pl_module))


def hand_ema(steps: list[dict], decay: float) -> dict:
    """EMAWeightAveraging's average, computed here: the first update copies, then ``d·avg + (1 − d)·p``."""
    avg = dict(steps[0])
    for p in steps[1:]:
        avg = {k: decay * avg[k] + (1 - decay) * p[k] for k in avg}
    return avg


@pytest.mark.parametrize("norm", [True, False])
def test_weight_averaging_in_either_order_interpolates_toward_the_average(norm, tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    runs = {}
    for order in ("WiSEFT first", "EMA first"):
        wise = WiSEFT(alphas=ALPHAS, every_validation=True)
        ema, trajectory = EMAWeightAveraging(decay=0.8), Trajectory()
        callbacks = [wise, ema, trajectory] if order == "WiSEFT first" else [ema, wise, trajectory]
        model, w0, trainer = fit(callbacks, model=TinyClassifier(norm=norm, lr=0.1), limit_val_batches=None)
        trainer.save_checkpoint(tmp_path / "after_fit.ckpt")  # its state_dict is the average: the choice
        saved = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)["state_dict"]
        runs[order] = (wise, model.state_dict(), saved)

        average = hand_ema(trajectory.steps, 0.8)
        assert any(not torch.allclose(average[k], trajectory.steps[-1][k], atol=1e-3) for k in average)  # EMA ≠ w_ft
        curve, states = independent_curve(w0, {**model.state_dict(), **average}, ALPHAS, norm)
        assert wise.curve == pytest.approx(curve, abs=1e-6), order
        assert wise.best_alpha == max(curve, key=lambda a: (curve[a], a)) and 0 < wise.best_alpha < 1
        assert wise.history[-1] == wise.curve, order  # the last validation measured the same average
        expected = states[wise.best_alpha]
        for k, v in model.state_dict().items():
            if "num_batches_tracked" not in k:
                torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=f"{order}: {k}")
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items()), order
    (wise_a, final_a, _), (wise_b, final_b, _) = runs.values()
    assert wise_a.history == wise_b.history and wise_a.curve == wise_b.curve
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)  # the same weights, bit for bit


def test_two_weight_averaging_callbacks_are_refused_before_training():
    from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging

    model = TinyClassifier()
    before = params_of(model)
    trainer = quiet_trainer(max_epochs=1, callbacks=[EMAWeightAveraging(), WiSEFT(), WeightAveraging()])
    with pytest.raises(ValueError, match="2 weight-averaging callbacks \\(EMAWeightAveraging, WeightAveraging\\): keep one"):
        trainer.fit(model)
    assert all(torch.equal(before[k], v) for k, v in params_of(model).items())


DDP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from lightning.pytorch import Callback
    from lightning_transfer import WiSEFT
    from tests.contract.multiprocess import finish
    from tests.helpers import TinyClassifier, params_of, quiet_trainer

    class Capture(Callback):
        def on_train_end(self, trainer, pl_module):
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    if __name__ == "__main__":
        model = TinyClassifier(batch_size=8, lr=0.3)
        w0 = params_of(model)
        capture, wise = Capture(), WiSEFT(alphas=[0.0, 0.25, 0.5, 0.75, 1.0])
        trainer = quiet_trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp",
                                callbacks=[capture, wise], deterministic=False)
        trainer.fit(model)
        torch.save({"w0": w0, "ft": capture.state, "final": model.state_dict(), "curve": wise.curve,
                    "best": wise.best_alpha}, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
        finish(trainer)
""")


@pytest.mark.slow
def test_ddp_ranks_agree_and_equal_a_whole_set_evaluation(tmp_path):
    script = tmp_path / "wise_ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(ROOT)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["curve"] == r1["curve"] and r0["best"] == r1["best"]
    assert all(torch.equal(r0["final"][k], r1["final"][k]) for k in r0["final"])
    curve, states = independent_curve(r0["w0"], r0["ft"], sorted(r0["curve"]))
    assert r0["curve"] == pytest.approx(curve, abs=1e-6)  # counts of both ranks' halves, summed
    for k, v in r0["final"].items():
        torch.testing.assert_close(v, states[r0["best"]][k], rtol=1e-5, atol=1e-6, msg=k)


def test_deepcopy_keeps_arguments():  # LightningCLI and sweeps copy callbacks before fit
    wise = copy.deepcopy(WiSEFT(alphas=[0.2, 0.4], select="finetuned"))
    assert wise.alphas == [0.2, 0.4] and wise.select == "finetuned"
