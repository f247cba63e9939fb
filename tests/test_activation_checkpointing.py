"""Activation checkpointing (#23): the forward hooks fire again when a checkpointed block is recomputed in
backward; the callbacks that hook features must count each forward once.

References: DELTA on a model whose blocks run under ``torch.utils.checkpoint`` (and a Hugging Face BERT with
``gradient_checkpointing_enable()``) equals the penalty put in the loss of the same model without
checkpointing, differentiated by autograd; DTNH + DELTA and RepresentationSimilarity equal their runs without
checkpointing. Reentrant checkpointing, whose first forward runs without autograd, is refused at the first
step with what to do instead.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lightning_transfer import DTNH, FeatureMapRegularization, RepresentationSimilarity
from tests.contract.registry import FeaturePenaltyInLoss
from tests.contract.transformer_models import FamilyData, FeaturePenaltyReference, build
from tests.helpers import TinyClassifier, assert_params_close, params_of, quiet_trainer

LAYERS = ("backbone.0.0", "backbone.1")  # a layer inside a checkpointed block, and a block's output


class CheckpointedBlocks(torch.nn.Sequential):
    """A Sequential whose blocks run under ``torch.utils.checkpoint`` in training (same parameter names)."""

    def __init__(self, blocks: torch.nn.Sequential, use_reentrant: bool) -> None:
        super().__init__(*blocks)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        for block in self:
            x = checkpoint(block, x, use_reentrant=self.use_reentrant) if self.training else block(x)
        return x


class Checkpointed(TinyClassifier):
    """TinyClassifier whose two backbone blocks run under ``torch.utils.checkpoint`` in training."""

    def __init__(self, use_reentrant: bool = False, **kwargs):
        super().__init__(norm=False, **kwargs)  # (BatchNorm would update its statistics again when recomputed)
        self.backbone = CheckpointedBlocks(self.backbone, use_reentrant)


def _fit(model, callbacks, epochs: int = 2):
    quiet_trainer(max_epochs=epochs, callbacks=callbacks).fit(model)
    return params_of(model)


def test_delta_under_checkpointing_equals_the_penalty_in_the_loss():
    model, recomputed = Checkpointed(), []
    model.backbone[1][0].register_forward_hook(lambda *_: recomputed.append(torch._C._current_graph_task_id() != -1))
    got = _fit(model, [FeatureMapRegularization(list(LAYERS), alpha=1.0)])
    assert any(recomputed) and not all(recomputed)  # the hooks did fire again inside backward
    want = _fit(FeaturePenaltyInLoss(layers=LAYERS, alpha=1.0, norm=False), [])
    assert_params_close(got, want, rtol=1e-5, atol=1e-6)
    plain = _fit(Checkpointed(), [])
    assert any((got[k] - plain[k]).abs().max() > 1e-4 for k in got)  # the penalty did act


def test_dtnh_delta_under_checkpointing_equals_the_run_without():
    def run(cls):
        return _fit(cls(), [FeatureMapRegularization(list(LAYERS), alpha=1.0), DTNH()])

    assert_params_close(run(Checkpointed), run(lambda: TinyClassifier(norm=False)), rtol=1e-5, atol=1e-6)


def test_reentrant_checkpointing_is_refused_at_the_first_step():
    with pytest.raises(RuntimeError, match="use_reentrant=True.*Use use_reentrant=False"):
        _fit(Checkpointed(use_reentrant=True), [FeatureMapRegularization(list(LAYERS), alpha=1.0)])


def test_hf_gradient_checkpointing_delta_equals_the_penalty_in_the_loss():
    layers = ("backbone.bert.encoder.layer.0", "backbone.bert.encoder.layer.1.output.dense")
    data = FamilyData("hf_bert")
    model = build("hf_bert", lr=1e-3)
    model.backbone.gradient_checkpointing_enable()  # transformers' default: use_reentrant=False
    assert model.backbone.is_gradient_checkpointing
    quiet_trainer(max_epochs=2, callbacks=[FeatureMapRegularization(list(layers), alpha=1.0)]).fit(model, data)
    reference = build("hf_bert", lr=1e-3, cls=FeaturePenaltyReference, layers=layers, alpha=1.0)
    quiet_trainer(max_epochs=2).fit(reference, data)
    assert_params_close(params_of(model), params_of(reference), rtol=1e-4, atol=1e-6)


def test_similarity_is_the_same_with_checkpointing():
    def run(cls):
        cb = RepresentationSimilarity(probe_size=16, measures=["cka"])
        quiet_trainer(max_epochs=2, callbacks=[cb], limit_val_batches=2).fit(cls())
        return cb.history

    got, want = run(Checkpointed), run(lambda: TinyClassifier(norm=False))
    assert got and got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), msg=key)


class AlwaysCheckpointed(CheckpointedBlocks):
    """Blocks checkpointed in eval mode too (no ``self.training`` guard), as some user code does."""

    def forward(self, x):
        for block in self:
            x = checkpoint(block, x, use_reentrant=self.use_reentrant)
        return x


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_rank_block_features_count_each_forward_once_under_checkpointing(use_reentrant):
    from lightning_transfer.rank import block_features

    plain = TinyClassifier(norm=False)
    model = TinyClassifier(norm=False)
    model.load_state_dict(plain.state_dict())
    model.backbone = AlwaysCheckpointed(model.backbone, use_reentrant)
    model.train()  # block_features switches to eval and back; checkpointing stays on in eval here
    fires = []
    model.backbone[1].register_forward_hook(lambda *_: fires.append(1))
    loader = [(torch.randn(8, 16), torch.arange(8) % 4), (torch.randn(5, 16), torch.arange(5) % 4)]
    got, y = block_features(model, loader)
    want, y_plain = block_features(plain, loader)
    assert len(fires) == len(loader)  # one firing per batch: no recomputation counted
    assert got.keys() == want.keys() and all(f.shape[0] == 13 for f in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert torch.equal(y, y_plain) and model.training
