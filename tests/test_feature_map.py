"""FeatureMapRegularization against the penalty written into the loss by hand."""

import copy

import pytest
import torch

from lightning_transfer import AnatomyError
from lightning_transfer.callbacks import FeatureMapRegularization
from lightning_transfer.functional.feature_maps import feature_map_penalty
from tests.helpers import TinyClassifier, assert_params_close, params_of, quiet_trainer

LAYERS = ["backbone.0", "backbone.1"]


def hand_penalty(alpha):
    """Reference: a frozen eval-mode copy of the backbone, the penalty added to the training loss."""
    state = {}

    def extra(module):
        if "ref" not in state:
            state["ref"] = copy.deepcopy(module.backbone).eval().requires_grad_(False)
        x = module._last_x
        live0 = module.backbone[0](x)
        live1 = module.backbone[1](live0)
        with torch.no_grad():
            r0 = state["ref"][0](x)
            r1 = state["ref"][1](r0)
        total = 0.5 * alpha * ((live0 - r0).square().sum(1).mean() + (live1 - r1).square().sum(1).mean())
        return total

    return extra


class RefModel(TinyClassifier):
    def training_step(self, batch, batch_idx):
        self._last_x = batch[0]
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("accumulate,clip", [(1, None), (2, 0.3)])
def test_equals_penalty_in_the_loss(accumulate, clip):
    alpha = 0.7
    ref = RefModel(extra_loss=hand_penalty(alpha), batch_size=8, lr=0.05)
    # the reference recomputes the features outside the hooks: BatchNorm in train mode would see the
    # batch twice and update its statistics twice, so compare with a model without running-stat drift
    ref.backbone[0][1].momentum = 0.0
    quiet_trainer(max_steps=6, accumulate_grad_batches=accumulate, gradient_clip_val=clip).fit(ref)
    model = TinyClassifier(batch_size=8, lr=0.05)
    model.backbone[0][1].momentum = 0.0
    cb = FeatureMapRegularization(LAYERS, alpha=alpha)
    trainer = quiet_trainer(max_steps=6, accumulate_grad_batches=accumulate, gradient_clip_val=clip, callbacks=[cb])
    trainer.fit(model)
    assert_params_close(params_of(model), params_of(ref), rtol=1e-4, atol=1e-6)
    assert float(trainer.callback_metrics["delta/penalty"]) > 0


def test_penalty_function():
    f = torch.randn(3, 4, 5, 5, requires_grad=True)
    f0 = torch.randn(3, 4, 5, 5)
    value = feature_map_penalty([f], [f0], alpha=0.4)
    torch.testing.assert_close(value, 0.2 * ((f - f0) ** 2).sum((1, 2, 3)).mean())
    w = torch.tensor([1.0, 0.0, 2.0, 0.5])
    weighted = feature_map_penalty([f], [f0], 0.4, [w])
    torch.testing.assert_close(weighted, 0.2 * (((f - f0) ** 2) * w.view(1, 4, 1, 1)).sum((1, 2, 3)).mean())
    with pytest.raises(ValueError, match="differs from reference"):
        feature_map_penalty([f], [f0[:, :2]], 1.0)


def test_penalty_function_channel_dim():
    """Channel weights broadcast along channel_dim (tokens/channels-last maps), checked element by element."""
    f = torch.randn(3, 5, 4, requires_grad=True)  # (batch, tokens=5, channels=4)
    f0 = torch.randn(3, 5, 4)
    g, g0 = torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4)  # channels last (batch, H, W, C=4)
    w, v = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.5, 1.5, 1.0, 1.0])
    hand = sum(float(w[c]) * float(f[b, t, c] - f0[b, t, c]) ** 2 for b in range(3) for t in range(5) for c in range(4))
    hand += sum(float(v[c]) * float(g[b, i, j, c] - g0[b, i, j, c]) ** 2
                for b in range(3) for i in range(2) for j in range(3) for c in range(4))
    value = feature_map_penalty([f, g], [f0, g0], 0.4, [w, v], channel_dim=[2, -1])
    assert float(value) == pytest.approx(0.2 * hand / 3, rel=1e-5)
    assert float(feature_map_penalty([f], [f0], 0.4, [w], channel_dim=-1)) == pytest.approx(
        float(feature_map_penalty([f], [f0], 0.4, [w], channel_dim=2)))
    with pytest.raises(ValueError, match="4 channel weights for dim 1 of size 5"):
        feature_map_penalty([f], [f0], 0.4, [w])  # the default dim 1 holds tokens here
    with pytest.raises(ValueError, match="channel_dim=0 is not a non-batch dim"):
        feature_map_penalty([f], [f0], 0.4, [w], channel_dim=0)


def test_reference_is_frozen_and_unchanged():
    model = TinyClassifier()
    start = params_of(model.backbone)
    cb = FeatureMapRegularization(LAYERS, alpha=0.1)
    quiet_trainer(max_steps=4, callbacks=[cb]).fit(model)
    assert all(not p.requires_grad for p in cb._reference.parameters())
    assert_params_close(params_of(cb._reference), start)


def test_bad_input():
    with pytest.raises(ValueError, match="at least one layer"):
        FeatureMapRegularization([])
    model = TinyClassifier()
    with pytest.raises(AnatomyError, match=r"Unknown layer 'backbone.7'.*Candidates"):
        quiet_trainer(max_steps=1, callbacks=[FeatureMapRegularization(["backbone.7"])]).fit(model)
    assert model.global_step == 0


def test_root_never_called_is_an_error():
    class Direct(TinyClassifier):
        def forward(self, x):  # calls the layers without going through `backbone`
            return self.head(self.backbone[1](self.backbone[0](x)))

    with pytest.raises(RuntimeError, match="captured no features"):
        quiet_trainer(max_steps=1, callbacks=[FeatureMapRegularization(LAYERS)]).fit(Direct())


def test_channel_attention_matches_hand_computed_loss_increases():
    import torch.nn.functional as F

    from lightning_transfer.functional.feature_maps import channel_attention

    model = TinyClassifier(norm=False)
    cb = FeatureMapRegularization(["backbone.1"], alpha=0.5, attention=True, attention_examples=24, attention_temperature=0.1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[cb])
    trainer.fit(model)
    # reference: the same losses, computed by hand at the weights the run started from
    ref = TinyClassifier(norm=False)
    ref.load_state_dict(start)
    ref.eval()
    x, y = ref.train_dataloader().dataset.tensors
    x, y = x[:24], y[:24]  # the first 24 training examples (unshuffled loader)

    def loss(mask=None):
        h = ref.backbone[1](ref.backbone[0](x))
        return F.cross_entropy(ref.head(h if mask is None else h * mask), y)

    with torch.no_grad():
        base = loss()
        increases = torch.stack([loss(torch.ones(32).index_fill(0, torch.tensor([c]), 0.0)) - base for c in range(32)])
    expected = channel_attention(increases, 0.1)
    torch.testing.assert_close(cb.channel_weights[0], expected, rtol=1e-4, atol=1e-5)
    assert float(expected.mean()) == pytest.approx(1.0) and float(expected.std()) > 0.01
    assert cb.state_dict()["channel_weights"][0] is cb.channel_weights[0]


def test_attention_weights_enter_the_penalty():
    ends = {}
    for attention in (False, True):
        model = TinyClassifier(norm=False)
        cb = FeatureMapRegularization(["backbone.1"], alpha=5.0, attention=attention, attention_temperature=0.05)
        quiet_trainer(max_steps=4, callbacks=[cb]).fit(model)
        ends[attention] = params_of(model)
    assert any(not torch.allclose(ends[False][k], ends[True][k]) for k in ends[False])
