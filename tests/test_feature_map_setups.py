"""FeatureMapRegularization in the set-ups users bring: freezing schedules, two optimizers, resumes with
changed arguments, token and channels-last feature maps, dict batches and ModelOutputs, bad input."""

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer import DTNH, FeatureMapRegularization, FreezeSchedule
from lightning_transfer.functional.feature_maps import channel_attention, resolve_channel_dim
from tests.helpers import StopAfter, TinyClassifier, assert_params_close, params_of, quiet_trainer
from tests.test_feature_map import LAYERS, RefModel, hand_penalty


def _no_drift(model):
    model.backbone[0][1].momentum = 0.0  # the hand reference runs BatchNorm twice per batch
    return model


# ---------------------------------------------------------------- FreezeSchedule (issue 14 #2)

@pytest.mark.parametrize("milestones", [{0: "all", 1: 0}, {0: 1, 1: 0}], ids=["lp_ft", "unfreeze_backbone0_at_1"])
def test_parameters_unfrozen_later_get_the_reference_gradient(milestones):
    """lp_ft: every parameter upstream of the layers is frozen in epoch 0 (crashed before); {0: 1, 1: 0}:
    backbone.0 is unfrozen at epoch 1 and must get DELTA's gradient from then on (it never did before)."""
    alpha = 0.7
    ref = _no_drift(RefModel(extra_loss=hand_penalty(alpha), batch_size=16, lr=0.05))
    quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule(milestones=milestones)]).fit(ref)
    model = _no_drift(TinyClassifier(batch_size=16, lr=0.05))
    cb = FeatureMapRegularization(LAYERS, alpha=alpha)
    trainer = quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule(milestones=milestones), cb])
    trainer.fit(model)
    start = params_of(TinyClassifier())
    assert not torch.equal(start["backbone.0.0.weight"], params_of(model)["backbone.0.0.weight"])
    assert_params_close(params_of(model), params_of(ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("start,stop", [(1, 2), ("all", 1), ("all", 2)])
def test_resume_with_gradual_unfreezing_equals_uninterrupted(start, stop, tmp_path):
    """Resumed after blocks were unfrozen: they must be regularized exactly as in the uninterrupted run."""
    def callbacks():
        return [FreezeSchedule.gradual(every=1, start=start), FeatureMapRegularization(LAYERS, alpha=1.0)]

    kw = dict(max_epochs=3, limit_train_batches=3)
    full = TinyClassifier(batch_size=8)
    quiet_trainer(callbacks=callbacks(), **kw).fit(full)
    first = TinyClassifier(batch_size=8)
    t1 = quiet_trainer(callbacks=[*callbacks(), StopAfter(stop)], default_root_dir=tmp_path, enable_checkpointing=True, **kw)
    t1.fit(first)
    resumed = TinyClassifier(batch_size=8, seed=123)
    quiet_trainer(callbacks=callbacks(), **kw).fit(resumed, ckpt_path=t1.checkpoint_callback.best_model_path)
    assert_params_close(params_of(resumed), params_of(full), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- two optimizers (issue 14 #4)

class TwoOptimizers(TinyClassifier):
    """Manual optimization: one backward, then one optimizer per part of the model."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        x, y = batch
        self.manual_backward(F.cross_entropy(self(x), y))
        for opt in opts:
            opt.step()

    def configure_optimizers(self):
        first = list(self.backbone[0].parameters())
        rest = [*self.backbone[1].parameters(), *self.head.parameters()]
        return [torch.optim.SGD(first, lr=self.lr, momentum=0.9), torch.optim.SGD(rest, lr=self.lr, momentum=0.9)]


@pytest.mark.parametrize("dtnh", [False, True])
def test_two_optimizers_equal_one_optimizer(dtnh):
    """Both optimizers hold regularized parameters: each must get its r exactly once (errored before);
    with DTNH (per-tensor projection) each optimizer's step projects its own parameters' r."""
    ends = []
    for cls in (TinyClassifier, TwoOptimizers):
        model = cls(batch_size=16)
        callbacks = [FeatureMapRegularization(LAYERS, alpha=1.0), *([DTNH()] if dtnh else [])]
        trainer = quiet_trainer(max_steps=8 if cls is TinyClassifier else 16, callbacks=callbacks)
        trainer.fit(model)  # (Lightning counts one step per optimizer in manual optimization)
        ends.append(params_of(model))
    assert_params_close(ends[1], ends[0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- resume with changed arguments

def _checkpoint(tmp_path, callbacks):
    model = TinyClassifier(batch_size=16)
    start = params_of(model.backbone)
    t = quiet_trainer(max_epochs=2, limit_train_batches=2, callbacks=[*callbacks, StopAfter(1)],
                      default_root_dir=tmp_path, enable_checkpointing=True)
    t.fit(model)
    return t.checkpoint_callback.best_model_path, start


def test_resume_with_changed_alpha_keeps_the_pretrained_reference(tmp_path):
    ckpt, start = _checkpoint(tmp_path, [FeatureMapRegularization(LAYERS, alpha=1.0)])
    cb = FeatureMapRegularization(LAYERS, alpha=0.5, attention=True, attention_epoch=5)
    resumed = TinyClassifier(batch_size=16, seed=123)
    quiet_trainer(max_epochs=2, limit_train_batches=2, callbacks=[cb]).fit(resumed, ckpt_path=ckpt)
    assert_params_close(params_of(cb._reference), start)  # not the resumed (fine-tuned) weights


@pytest.mark.parametrize("saved,match", [
    ([], "no FeatureMapRegularization state"),
    ([FeatureMapRegularization(["backbone.1"], alpha=1.0)], "no FeatureMapRegularization state"),
    ([FeatureMapRegularization(LAYERS, alpha=1.0), FeatureMapRegularization(LAYERS, alpha=2.0)], "ambiguous"),
])
def test_resume_without_a_matching_reference_is_an_error(saved, match, tmp_path):
    ckpt, _ = _checkpoint(tmp_path, saved)
    resumed = TinyClassifier(batch_size=16, seed=123)
    with pytest.raises(ValueError, match=match):
        quiet_trainer(max_epochs=2, callbacks=[FeatureMapRegularization(LAYERS, alpha=0.5)]).fit(resumed, ckpt_path=ckpt)
    assert resumed.global_step == 0  # refused while restoring, before any step


# ---------------------------------------------------------------- channel dims (issue 14 #8), dict batches

class TokenModel(LightningModule):
    """(B, T, C) features (T=5 tokens, C=6 channels) or channels-last (B, H=3, W=4, C=6) features.

    ``dict_batches``: batches are ``{"x": ..., "labels": ...}`` and forward returns a ModelOutput.
    """

    def __init__(self, shape=(5,), dict_batches=False, extra_loss=None):
        super().__init__()
        torch.manual_seed(0)
        self.shape, self.dict_batches, self.extra_loss = shape, dict_batches, extra_loss
        self.body = nn.Sequential(nn.Linear(8, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        logits = self.head(h.flatten(1, -2).mean(1))
        if self.dict_batches:
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=logits)
        return logits

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["labels"]) if self.dict_batches else batch
        out = self(x)
        loss = F.cross_entropy(out.logits if self.dict_batches else out, y)
        return loss + self.extra_loss(self, x) if self.extra_loss else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def data(self):
        g = torch.Generator().manual_seed(1)
        return torch.randn(12, *self.shape, 8, generator=g), torch.randint(0, 3, (12,), generator=g)

    def train_dataloader(self):
        x, y = self.data()
        if self.dict_batches:
            return DataLoader([{"x": a, "labels": b} for a, b in zip(x, y)], batch_size=6)
        return DataLoader(TensorDataset(x, y), batch_size=6)


def hand_attention(model, temperature):
    """Zero channel c on the last dim of body.0's output (tanh(0) = 0: the same as zeroing body's), by hand."""
    x, y = model.data()
    with torch.no_grad():
        h = model.body(x)

        def loss(h):
            return F.cross_entropy(model.head(h.flatten(1, -2).mean(1)), y)

        base = loss(h)
        increases = torch.stack([loss(h * torch.ones(6).index_fill(0, torch.tensor([c]), 0.0)) - base for c in range(6)])
    return channel_attention(increases, temperature)


@pytest.mark.parametrize("shape,dict_batches", [((5,), False), ((3, 4), False), ((5,), True)],
                         ids=["tokens", "channels_last", "dict_batch_model_output"])
def test_attention_weights_channels_of_token_and_channels_last_maps(shape, dict_batches):
    """Weights are per channel (last dim), not per token/row, and enter the penalty along that dim: the run
    equals the weighted penalty written into the loss by hand."""
    alpha, temperature = 2.0, 0.05
    weights = hand_attention(TokenModel(shape), temperature)
    assert float(weights.std()) > 0.01

    state = {}

    def extra(module, x):
        if "ref" not in state:
            state["ref"] = copy.deepcopy(module.body[0]).eval().requires_grad_(False)
        sq = (module.body[0](x) - state["ref"](x)).square() * weights
        return 0.5 * alpha * sq.flatten(1).sum(1).mean()

    ref = TokenModel(shape, dict_batches, extra_loss=extra)
    quiet_trainer(max_epochs=2).fit(ref)
    model = TokenModel(shape, dict_batches)
    cb = FeatureMapRegularization(["body.0"], alpha=alpha, attention=True, attention_examples=12,
                                  attention_temperature=temperature)
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(model)
    torch.testing.assert_close(cb.channel_weights[0], weights, rtol=1e-4, atol=1e-5)
    assert_params_close(params_of(model), params_of(ref), rtol=1e-4, atol=1e-6)


def test_resolve_channel_dim():
    conv, lin = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU()), nn.Sequential(nn.Linear(4, 6), nn.GELU())
    assert resolve_channel_dim(conv, (2, 6, 5, 5)) == 1
    assert resolve_channel_dim(lin, (2, 6)) == 1
    assert resolve_channel_dim(lin, (2, 7, 6)) == 2  # tokens
    assert resolve_channel_dim(lin, (2, 3, 4, 6)) == 3  # channels last (Swin)
    assert resolve_channel_dim(nn.LayerNorm(6), (2, 3, 4, 6)) == 3
    assert resolve_channel_dim(conv, (2, 6, 5, 5), channel_dim=-1) == 3  # explicit wins
    with pytest.raises(ValueError, match="cannot tell which dim.*channel_dim=1"):
        resolve_channel_dim(lin, (2, 6, 3, 4))  # Linear, but its features are not last
    with pytest.raises(ValueError, match="cannot tell"):
        resolve_channel_dim(nn.Identity(), (2, 6, 3, 4))
    with pytest.raises(ValueError, match="channel_dim=3 is not a non-batch dim"):
        resolve_channel_dim(lin, (2, 7, 6), channel_dim=3)


def test_attention_on_bert_hidden_states():
    from transformers import BertConfig, BertForSequenceClassification

    class Bert(LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = BertForSequenceClassification(BertConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                num_labels=3))

        def forward(self, **batch):
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            return self(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            ids, labels = torch.randint(0, 50, (8, 7), generator=g), torch.randint(0, 3, (8,), generator=g)
            data = [{"input_ids": i, "attention_mask": torch.ones(7, dtype=torch.long), "labels": y} for i, y in zip(ids, labels)]
            return DataLoader(data, batch_size=4)

    model = Bert()
    start = copy.deepcopy(model).eval()
    layer = "model.bert.encoder.layer.0"
    cb = FeatureMapRegularization([layer], alpha=0.1, root="model", attention=True, attention_examples=8)
    quiet_trainer(max_steps=1, callbacks=[cb]).fit(model)
    batch = next(iter(model.train_dataloader()))
    inputs = {k: torch.cat([b[k] for b in model.train_dataloader()]) for k in batch}
    labels = inputs.pop("labels")
    with torch.no_grad():
        def loss(c=None):
            hook = None
            if c is not None:
                def zero(m, a, out):
                    out = out.clone()
                    out[:, :, c] = 0  # hidden states are (batch, tokens, hidden)
                    return out

                hook = start.get_submodule(layer).register_forward_hook(zero)
            value = F.cross_entropy(start(**inputs).logits, labels)
            if hook:
                hook.remove()
            return value

        base = loss()
        expected = channel_attention(torch.stack([loss(c) - base for c in range(16)]))
    assert cb.channel_weights[0].shape == (16,)
    torch.testing.assert_close(cb.channel_weights[0], expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad input (issue 14 #14)

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(layers="backbone.0"), TypeError, "layers must be a list of strings"),
    (dict(layers=[0]), TypeError, "layers must be a list of strings"),
    (dict(layers=[]), ValueError, "at least one layer"),
    (dict(alpha=math.inf), ValueError, "alpha must be a finite number"),
    (dict(alpha=math.nan), ValueError, "alpha must be a finite number"),
    (dict(alpha=-0.1), ValueError, "alpha must be >= 0"),
    (dict(alpha=True), TypeError, "alpha must be a real number"),
    (dict(alpha="0.1"), TypeError, "alpha must be a real number"),
    (dict(root=3), TypeError, "root must be a module name"),
    (dict(attention="yes"), TypeError, "attention must be True or False"),
    (dict(attention_epoch=-1), ValueError, "attention_epoch must be an integer >= 0"),
    (dict(attention_epoch=1.5), TypeError, "attention_epoch must be an integer"),
    (dict(attention_examples=0), ValueError, "attention_examples must be an integer >= 1"),
    (dict(attention_temperature=0.0), ValueError, "attention_temperature must be > 0"),
    (dict(attention_temperature=math.inf), ValueError, "attention_temperature must be a finite number"),
    (dict(channel_dim=1.0), TypeError, "channel_dim must be an integer"),
    (dict(channel_dim=0), ValueError, "channel_dim=0 is the batch dim"),
])
def test_invalid_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeatureMapRegularization(**{"layers": LAYERS, **kwargs})


def test_channel_dim_not_in_the_map_is_an_error_before_the_first_step():
    model = TinyClassifier()
    cb = FeatureMapRegularization(["backbone.1"], attention=True, channel_dim=2)  # outputs are (B, 32)
    with pytest.raises(ValueError, match="channel_dim=2 is not a non-batch dim"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(model)
    assert model.global_step == 0


def test_sharded_strategy_is_refused():
    trainer = types.SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(ValueError, match="FeatureMapRegularization does not support FSDPStrategy"):
        FeatureMapRegularization(LAYERS).setup(trainer, TinyClassifier(), "fit")
