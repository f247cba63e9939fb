"""RepresentationSimilarity on padded token batches: padding tokens are no features, whatever the padding side.

A tiny random-initialized Llama sequence classifier (a decoder: causal attention, the pad token with a
non-zero embedding, as when a tokenizer pads with eos; nothing downloaded) is fine-tuned inside
``TransferClassifier`` on dict batches ``{"input_ids", "attention_mask", "labels"}`` of unequal lengths,
left- or right-padded, two batches of different widths. The callback's pooled features and its logged CKA
must equal an independent reference computed here: each block's hidden states taken by a forward hook,
averaged over each example's real tokens, and linear CKA written out in its feature-space form
``‖YᵀX‖²_F / (‖XᵀX‖_F·‖YᵀY‖_F)`` on centred features (the library uses the n×n Gram form). Pooling over
every token (what counting padding gives) must differ. DELTA on the same left-padded decoder:
tests/test_feature_map_padding.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_transfer import RepresentationSimilarity, TransferClassifier
from tests.helpers import quiet_trainer
from tests.test_feature_map_padding import CLASSES, _batches, _llama

BLOCKS = ["backbone.model.embed_tokens", "backbone.model.layers.0", "backbone.model.layers.1", "backbone.model.norm"]


def _model() -> TransferClassifier:
    torch.manual_seed(0)
    return TransferClassifier(_llama(), num_classes=CLASSES, optimizer="sgd", lr=0.1, weight_decay=0.0,
                              scheduler="constant")


def _fit(side: str) -> tuple[TransferClassifier, RepresentationSimilarity]:
    """Two steps on the two batches, then one validation on them (the probe: all 8 examples)."""
    model, cb = _model(), RepresentationSimilarity(blocks=BLOCKS, probe_size=8, measures=["cka"])
    data = DataLoader(_batches(side), batch_size=None)
    quiet_trainer(max_epochs=1, limit_val_batches=2, callbacks=[cb]).fit(model, data, data)
    return model, cb


def _pooled_by_hand(model: TransferClassifier, side: str, block: str, masked: bool) -> torch.Tensor:
    """``(8, hidden)``: each example's hidden states at ``block``, averaged over its real tokens (``masked``)
    or over every token of its padded row."""
    rows, seen = [], {}
    hook = model.get_submodule(block).register_forward_hook(
        lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    model.eval()
    try:
        for batch in _batches(side):
            with torch.no_grad():
                model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for h, real in zip(seen["h"].double(), batch["attention_mask"].bool()):
                rows.append(h[real].mean(0) if masked else h.mean(0))
    finally:
        hook.remove()
    return torch.stack(rows)


def _cka_by_hand(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm()))


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[TransferClassifier, RepresentationSimilarity]]:
    return {side: _fit(side) for side in ("left", "right")}


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooled_features_and_cka_count_only_the_real_tokens(side, runs):
    model, cb = runs[side]
    initial = _model()  # the pre-trained weights the callback compares with (same seed, never trained)
    live = cb._features(model)
    for block in BLOCKS:
        tuned, start = (_pooled_by_hand(m, side, block, masked=True) for m in (model, initial))
        torch.testing.assert_close(live[block].double(), tuned, rtol=1e-5, atol=1e-6)
        centred = start - start.mean(0)  # the callback keeps the pre-trained side as its centred Gram matrix
        torch.testing.assert_close(cb._reference["cka"][block], centred @ centred.T, rtol=1e-5, atol=1e-6)
        expected = _cka_by_hand(tuned, start)
        assert cb.history[f"cka/{block}"] == [pytest.approx(expected, abs=1e-5)]
        assert 0.0 < expected < 1.0 - 1e-4  # the fine-tuning moved the representation
        # pooling over every token (padding counted) gives other features and another CKA
        everything = [_pooled_by_hand(m, side, block, masked=False) for m in (model, initial)]
        assert float((everything[0] - tuned).abs().max()) > 1e-2
        assert abs(_cka_by_hand(*everything) - expected) > 1e-3, (block, _cka_by_hand(*everything), expected)


def test_the_padding_side_does_not_change_the_measure(runs):
    """The same tokens padded on either side: a causal model with rotary positions gives its real tokens the
    same hidden states (relative positions only), so fine-tuning and the measure agree up to rounding."""
    for block in BLOCKS:
        left, right = runs["left"][1].history[f"cka/{block}"], runs["right"][1].history[f"cka/{block}"]
        assert left == pytest.approx(right, abs=1e-4), block


def test_block_features_pools_a_left_padded_map_by_hand():
    from lightning_transfer.functional.similarity import block_features

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, generator=g)
    h[0, :2] = float("nan")  # padded positions may hold anything: they must not leak in
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])  # left, right, none
    by_hand = torch.stack([h[0, 2:].mean(0), h[1, :4].mean(0), h[2].mean(0)])
    torch.testing.assert_close(block_features(h, mask), by_hand)
