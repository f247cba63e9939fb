"""SPD: the functional rule against the rule written out per tensor, and the callback end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_transfer import SPD
from lightning_transfer.functional import spd as spd_functional
from lightning_transfer.functional.spd import spd_after_norms, spd_before_step, spd_step_
from tests.helpers import TinyClassifier


def _plain_rule(w_prev, w_new, w0, g, lam):
    """The paper's rule for one tensor, written out (with ε in the ratio)."""
    c = -(g * (w_prev - w0)).sum()
    if c < 0:
        new, old = torch.linalg.vector_norm(w_new - w0), torch.linalg.vector_norm(w_prev - w0)
        r = min(max(float((new - old) / (new + 1e-12)), 0.0), 1.0)
        return w_new - lam * r * (w_new - w0)
    return w_new.clone()


@pytest.mark.parametrize("peft", [False, True])
def test_rule_matches_plain_per_tensor(peft):
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2), (4,)]
    w0 = [torch.randn(s, generator=g) for s in shapes]
    prev = [a + 0.1 * torch.randn(s, generator=g) for a, s in zip(w0, shapes)]
    grads = [torch.randn(s, generator=g) for s in shapes]
    grads[1] = -(prev[1] - (0 if peft else w0[1]))  # condition false: this tensor stays as the optimizer made it
    grads[0] = prev[0] - (0 if peft else w0[0])  # condition true
    new = [p - 0.3 * gr for p, gr in zip(prev, grads)]
    new[0] = prev[0] + 0.5 * (prev[0] - w0[0])  # moved away despite the gradient (momentum): decayed
    if peft:
        new[0] = 1.5 * prev[0]
    anchors = None if peft else w0
    zero = [torch.zeros_like(a) for a in w0]
    expected = [_plain_rule(p, n, z if peft else a, gr, 0.7) for p, n, a, z, gr in zip(prev, new, w0, zero, grads)]
    dots, before = spd_before_step(prev, grads, anchors)
    out = [n.clone() for n in new]
    factors = spd_step_(out, anchors, dots, before, 0.7)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e)
    assert factors[1] == 0
    assert not torch.equal(out[0], new[0])


def test_no_nan_at_anchor():
    w0 = [torch.ones(4), torch.zeros(3)]
    w = [a.clone() for a in w0]  # w = w0 before and after the step
    dots, before = spd_before_step(w, [torch.ones(4), torch.ones(3)], w0)
    factors = spd_step_(w, w0, dots, before, 1.0)
    assert torch.isfinite(factors).all() and all(torch.isfinite(t).all() for t in w)
    torch.testing.assert_close(w, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sums_in_cache_sized_chunks_equal_whole_tensor_sums(dtype):
    """The CPU path makes ``w − w0`` a chunk at a time: tensors over several chunks (and bf16 weights with
    float32 anchors) give the sums of the whole difference, computed here in float64."""
    g = torch.Generator().manual_seed(1)
    shapes = [(3 * spd_functional.CHUNK + 17,), (spd_functional.CHUNK, 2), (5, 3), (1,)]
    w0 = [torch.randn(s, generator=g) for s in shapes]
    w = [(a + 1e-3 * torch.randn(s, generator=g)).to(dtype) for a, s in zip(w0, shapes)]
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    diffs = [x.double() - a.double() for x, a in zip(w, w0)]
    dots, squares = spd_before_step(w, grads, w0)
    torch.testing.assert_close(dots.double(), torch.stack([(gr.double() * d).sum() for gr, d in zip(grads, diffs)]),
                               rtol=1e-4, atol=1e-5)
    expected = torch.stack([d.square().sum() for d in diffs])
    torch.testing.assert_close(squares.double(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(spd_after_norms(w, w0).double(), expected, rtol=1e-4, atol=0)


def _fit(callbacks, **kwargs):
    model = TinyClassifier(optimizer="adam", lr=0.05, **kwargs)
    trainer = Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    w0 = copy.deepcopy(model.state_dict())
    trainer.fit(model)
    return model, trainer, w0


def test_spd_stays_closer_to_w0_and_logs():
    plain, _, w0 = _fit([])
    spd, trainer, _ = _fit([SPD(lam=1.0)])
    def dist(m):
        return sum(float((m.state_dict()[k].float() - w0[k].float()).norm() ** 2)
                   for k in w0 if k.startswith("backbone") and "running" not in k and "num_batches" not in k)
    assert dist(spd) < dist(plain)
    assert 0.0 <= float(trainer.callback_metrics["spd/decayed_fraction"]) <= 1.0


def test_lam_zero_is_the_plain_optimizer():
    plain, _, _ = _fit([])
    spd, _, _ = _fit([SPD(lam=0.0)])
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(spd.state_dict()[k], v)


def test_peft_checkpoint_holds_no_anchors():
    cb = SPD(peft=True)
    _fit([cb])
    assert cb.state_dict() == {"anchors": {}}


@pytest.mark.parametrize("bad", [{"lam": -1.0}, {"peft": "yes"}])
def test_bad_arguments(bad):
    with pytest.raises((ValueError, TypeError)):
        SPD(**bad)
