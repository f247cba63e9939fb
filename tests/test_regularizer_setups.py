"""L2SP and DTNH in the set-ups users bring: two optimizers, partial accumulation windows, changed resumes."""

import pytest
import torch
import torch.nn.functional as F

from lightning_transfer.callbacks import DTNH, L2SP
from tests.helpers import TinyClassifier, assert_params_close, params_of, quiet_trainer
from tests.test_l2sp import _reference_loss

ALPHA, BETA = 0.3, 0.05


class ManualModule(TinyClassifier):
    """Manual optimization: one ``manual_backward``, then every optimizer steps (``split``: backbone / head)."""

    def __init__(self, split: bool = True, shared: bool = False, **kw):
        super().__init__(n=24, batch_size=8, **kw)
        self.automatic_optimization = False
        self.split, self.shared = split, shared

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(self)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()

    def configure_optimizers(self):
        def sgd(params):
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)

        if not self.split:
            return sgd(self.parameters())
        backbone = list(self.backbone.parameters()) + (list(self.head.parameters()) if self.shared else [])
        return [sgd(backbone), sgd(self.head.parameters())]


def _fit_manual(callbacks, **kw):
    model = ManualModule(**kw)
    quiet_trainer(max_epochs=2, callbacks=callbacks).fit(model)
    return params_of(model)


@pytest.mark.parametrize("norm", ["l2", "l1"])  # "l2": the fused path; "l1": regularizer_gradients
def test_two_optimizers_apply_the_gradient_once(norm):
    split = _fit_manual([L2SP(alpha=ALPHA, beta=BETA, norm=norm)], split=True)
    single = _fit_manual([L2SP(alpha=ALPHA, beta=BETA, norm=norm)], split=False)
    reference = _fit_manual([], split=False, extra_loss=_reference_loss(ALPHA, BETA, norm))
    assert_params_close(split, single, rtol=1e-6, atol=1e-7)
    assert_params_close(split, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True])
def test_two_optimizers_with_dtnh_or_decoupled(decoupled):
    def callbacks():
        return [L2SP(alpha=ALPHA, beta=BETA, decoupled=True)] if decoupled else [L2SP(alpha=ALPHA, beta=BETA), DTNH()]

    assert_params_close(_fit_manual(callbacks(), split=True), _fit_manual(callbacks(), split=False),
                        rtol=1e-6, atol=1e-7)


def test_parameter_in_two_optimizers_is_refused():
    model = ManualModule(split=True, shared=True)
    with pytest.raises(ValueError, match=r"head\.weight.*more than one optimizer"):
        quiet_trainer(max_epochs=1, callbacks=[L2SP()]).fit(model)
    assert model.global_step == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("norm", ["l2", "group_lasso"])
@pytest.mark.parametrize("dtnh", [False, True])
def test_partial_accumulation_window_equals_penalty_in_the_loss(optimizer, norm, dtnh):
    """3 batches per epoch, accumulate 2: every epoch ends on a window of one micro-batch."""
    runs = {}
    for kind in ("callback", "reference"):
        extra = _reference_loss(ALPHA, BETA, norm) if kind == "reference" else None
        model = TinyClassifier(optimizer=optimizer, lr=0.05, extra_loss=extra, batch_size=8, n=24)
        callbacks = [L2SP(alpha=ALPHA, beta=BETA, norm=norm)] if kind == "callback" else []
        if dtnh and kind == "callback":
            callbacks.append(DTNH(eps=float("1e30")))  # projects nothing: DTNH must hand r on unchanged
        quiet_trainer(max_epochs=2, callbacks=callbacks, accumulate_grad_batches=2).fit(model)
        runs[kind] = params_of(model)
    assert_params_close(runs["callback"], runs["reference"], rtol=1e-5, atol=1e-6)


def _pretrained_and_checkpoint(tmp_path, callbacks):
    """One epoch (3 steps) from the seed-0 'pre-trained' weights, checkpointed at the epoch's end."""
    model = TinyClassifier(n=24, batch_size=8)
    start = params_of(model)
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks)
    trainer.fit(model)
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    return start, path


def test_resume_with_changed_alpha_keeps_the_pretrained_anchors(tmp_path):
    start, ckpt = _pretrained_and_checkpoint(tmp_path, [L2SP(alpha=ALPHA, beta=BETA)])
    resumed, cb = TinyClassifier(n=24, batch_size=8), L2SP(alpha=1.0, beta=BETA)
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(resumed, ckpt_path=ckpt)
    for name, anchor in cb.anchors.items():
        torch.testing.assert_close(anchor, start[name], rtol=0, atol=0)
    # reference: one uninterrupted run, the penalty in the loss, alpha switching after the first epoch
    state = {}

    def switching(module):
        alpha = ALPHA if module.current_epoch < 1 else 1.0
        if "w0" not in state:
            state["w0"] = {n: p.detach().clone() for n, p in module.named_parameters()}
        backbone = sum(0.5 * alpha * (p - state["w0"][n]).square().sum()
                       for n, p in module.named_parameters() if not n.startswith("head."))
        return backbone + sum(0.5 * BETA * p.square().sum() for p in module.head.parameters())

    reference = TinyClassifier(n=24, batch_size=8, extra_loss=switching)
    quiet_trainer(max_epochs=2).fit(reference)
    assert_params_close(params_of(resumed), params_of(reference), rtol=1e-5, atol=1e-6)


def test_resume_with_head_written_out_keeps_w0(tmp_path):
    start, ckpt = _pretrained_and_checkpoint(tmp_path, [L2SP(alpha=ALPHA)])
    cb = L2SP(alpha=ALPHA, head="head")
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(TinyClassifier(n=24, batch_size=8), ckpt_path=ckpt)
    assert cb.anchors.keys() == {n for n in start if not n.startswith("head.")}
    for name, anchor in cb.anchors.items():
        torch.testing.assert_close(anchor, start[name], rtol=0, atol=0)


def test_resume_with_two_instances_one_changed_adopts_the_free_state(tmp_path):
    start, ckpt = _pretrained_and_checkpoint(tmp_path, [L2SP(alpha=ALPHA), L2SP(alpha=2 * ALPHA, exclude=["1"])])
    kept, changed = L2SP(alpha=ALPHA), L2SP(alpha=0.7, exclude=["1"])
    quiet_trainer(max_epochs=2, callbacks=[kept, changed]).fit(TinyClassifier(n=24, batch_size=8), ckpt_path=ckpt)
    for cb in (kept, changed):
        for name, anchor in cb.anchors.items():
            torch.testing.assert_close(anchor, start[name], rtol=0, atol=0)


def test_resume_with_ambiguous_l2sp_states_is_refused(tmp_path):
    _, ckpt = _pretrained_and_checkpoint(tmp_path, [L2SP(alpha=ALPHA), L2SP(alpha=2 * ALPHA)])
    model = TinyClassifier(n=24, batch_size=8)
    with pytest.raises(ValueError, match=r"several L2SP states.*L2SP\{"):
        quiet_trainer(max_epochs=2, callbacks=[L2SP(alpha=0.7)]).fit(model, ckpt_path=ckpt)


def test_l2sp_added_on_resume_is_refused(tmp_path):
    _, ckpt = _pretrained_and_checkpoint(tmp_path, [])
    model = TinyClassifier(n=24, batch_size=8)
    with pytest.raises(ValueError, match="anchors w0 are unknown.*without ckpt_path"):
        quiet_trainer(max_epochs=2, callbacks=[L2SP()]).fit(model, ckpt_path=ckpt)
