"""DTNH: the projection against a hand-written reference, and the callback in real Trainer runs."""

import pytest
import torch

from lightning_transfer.callbacks import DTNH, L2SP, FeatureMapRegularization
from lightning_transfer.functional import project_conflicting
from tests.helpers import TinyClassifier, assert_params_close, params_of, quiet_trainer


def reference_projection(g, r, granularity="tensor", eps=1e-20):
    """Hand-written DTNH step, one tensor at a time (or over the concatenation)."""
    if granularity == "global":
        gf, rf = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in r])
        dot, gg = float(gf @ rf), float(gf @ gf)
        c = dot / gg if (dot < 0 and gg > eps) else 0.0
        return [gi + ri - c * gi for gi, ri in zip(g, r)]
    out = []
    for gi, ri in zip(g, r):
        dot, gg = float((gi * ri).sum()), float((gi * gi).sum())
        out.append(gi + ri - (dot / gg) * gi if (dot < 0 and gg > eps) else gi + ri)
    return out


def _grads(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 3), (6,), (4, 6), (4,), (2, 2, 3)]
    return [torch.randn(s, generator=gen) for s in shapes], [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_and_guarantee(granularity, seed):
    g, r = _grads(seed)
    d, stats = project_conflicting(g, r, granularity)
    for a, b in zip(d, reference_projection(g, r, granularity)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if granularity == "tensor":
        for di, gi in zip(d, g):
            assert float((di * gi).sum()) >= float((gi * gi).sum()) - 1e-5
    gf, df = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in d])
    assert float(df @ gf) >= float(gf @ gf) - 1e-4
    assert 0.0 <= float(stats["projected"]) <= 1.0


def test_opposing_is_projected_agreeing_is_not():
    g = [torch.tensor([1.0, 0.0])]
    d, stats = project_conflicting(g, [torch.tensor([-2.0, 1.0])])
    torch.testing.assert_close(d[0], torch.tensor([1.0, 1.0]))
    assert float(stats["projected"]) == 1.0 and float(stats["removed_norm"]) == pytest.approx(2.0)
    d, stats = project_conflicting(g, [torch.tensor([0.5, 1.0])])
    torch.testing.assert_close(d[0], torch.tensor([1.5, 1.0]))
    assert float(stats["projected"]) == 0.0


def test_guards():
    d, _ = project_conflicting([torch.zeros(3)], [torch.tensor([-1.0, 2.0, 3.0])])
    torch.testing.assert_close(d[0], torch.tensor([-1.0, 2.0, 3.0]))  # ||g|| = 0: nothing to protect
    g = [torch.tensor([float("inf"), 1.0]), torch.ones(2)]
    d, _ = project_conflicting(g, [torch.ones(2), torch.ones(2)])
    assert torch.equal(d[0], g[0]) and torch.equal(d[1], g[1])  # non-finite g: untouched
    with pytest.raises(ValueError, match="granularity"):
        project_conflicting(g, g, "layer")


class HandDTNH(TinyClassifier):
    """Reference: L2-SP gradient and per-tensor projection written by hand in the module hook."""

    def __init__(self, alpha, granularity="tensor", **kw):
        super().__init__(**kw)
        self.alpha, self.granularity, self.w0 = alpha, granularity, None

    def on_before_optimizer_step(self, optimizer):
        named = [(n, p) for n, p in self.named_parameters() if not n.startswith("head.")]
        if self.w0 is None:
            self.w0 = {n: p.detach().clone() for n, p in named}
        g = [p.grad.clone() for _, p in named]
        r = [self.alpha * (p.detach() - self.w0[n]) for n, p in named]
        for (_, p), d in zip(named, reference_projection(g, r, self.granularity)):
            p.grad.copy_(d)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("accumulate,clip", [(1, None), (2, 0.3)])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_gradients_reaching_the_optimizer_equal_reference(optimizer, accumulate, clip, granularity):
    alpha = 2.0  # strong, so that conflicts happen
    ref = HandDTNH(alpha, granularity, optimizer=optimizer, lr=0.05, batch_size=8)
    quiet_trainer(max_steps=6, accumulate_grad_batches=accumulate, gradient_clip_val=clip).fit(ref)
    model = TinyClassifier(optimizer=optimizer, lr=0.05, batch_size=8)
    trainer = quiet_trainer(max_steps=6, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
                            callbacks=[DTNH(granularity), L2SP(alpha=alpha, beta=0.0)])
    trainer.fit(model)
    assert_params_close(params_of(model), params_of(ref), rtol=1e-4, atol=1e-6)
    assert {"dtnh/projected", "dtnh/cosine", "dtnh/removed_norm"} <= set(trainer.callback_metrics)


def test_callback_order_does_not_matter():
    ends = []
    for order in ("dtnh_first", "l2sp_first"):
        cbs = [DTNH(), L2SP(alpha=2.0)] if order == "dtnh_first" else [L2SP(alpha=2.0), DTNH()]
        model = TinyClassifier()
        quiet_trainer(max_steps=5, callbacks=cbs).fit(model)
        ends.append(params_of(model))
    assert_params_close(ends[0], ends[1], rtol=0, atol=0)


def test_projection_happens_and_differs_from_plain_l2sp():
    ends, rates = {}, {}
    for with_dtnh in (False, True):
        model = TinyClassifier(lr=0.2)
        cbs = [L2SP(alpha=5.0)] + ([DTNH()] if with_dtnh else [])
        trainer = quiet_trainer(max_steps=8, callbacks=cbs)
        trainer.fit(model)
        ends[with_dtnh] = params_of(model)
        rates[with_dtnh] = trainer.callback_metrics.get("dtnh/projected")
    assert any(not torch.allclose(ends[False][k], ends[True][k]) for k in ends[True])
    assert float(rates[True]) > 0


def test_with_feature_map_regularizer_runs_and_logs():
    model = TinyClassifier()
    trainer = quiet_trainer(max_steps=4, callbacks=[DTNH(), FeatureMapRegularization(["backbone.0", "backbone.1"], alpha=1.0)])
    trainer.fit(model)
    assert "dtnh/projected" in trainer.callback_metrics and "delta/penalty" in trainer.callback_metrics


def test_bad_input():
    with pytest.raises(ValueError, match="needs a regularizer callback"):
        quiet_trainer(max_steps=1, callbacks=[DTNH()]).fit(TinyClassifier())
    with pytest.raises(ValueError, match="decoupled"):
        quiet_trainer(max_steps=1, callbacks=[DTNH(), L2SP(decoupled=True)]).fit(TinyClassifier())
    with pytest.raises(ValueError, match="Only one DTNH"):
        quiet_trainer(max_steps=1, callbacks=[DTNH(), DTNH(), L2SP()]).fit(TinyClassifier())
    with pytest.raises(ValueError, match="granularity"):
        DTNH(granularity="block")


@pytest.mark.parametrize("kwargs,error,match", [
    ({"granularity": "layer"}, ValueError, "granularity must be one of 'tensor', 'global'"),
    ({"eps": float("nan")}, ValueError, "eps must be a finite number"),
    ({"eps": float("inf")}, ValueError, "eps must be a finite number"),
    ({"eps": -1e-8}, ValueError, "eps must be >= 0"),
    ({"eps": "1e-8"}, TypeError, "eps must be a real number"),
])
def test_every_argument_is_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        DTNH(**kwargs)


def test_sharded_strategy_is_refused_at_setup():
    import types

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = types.SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(ValueError, match="DTNH does not support FSDPStrategy"):
        DTNH().setup(trainer, TinyClassifier(), "fit")
