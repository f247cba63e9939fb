"""DELTA on padded token batches: padding tokens are no features, whatever the padding side.

A tiny random-initialized Llama sequence classifier (nothing downloaded) trains on dict batches
``{"input_ids", "attention_mask", "labels"}`` of unequal lengths, left- or right-padded. The callback's
update must equal an independent reference that puts the masked penalty (the sum of ``‖F − F0‖²`` over
each example's real tokens, averaged over the batch) into the loss and lets autograd differentiate it,
and must differ from the same reference summing over every token (what counting padding gives).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers  # in the test extra: a missing package fails here, never skips
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader

from lightning_transfer import FeatureMapRegularization
from lightning_transfer.functional.feature_maps import feature_map_penalty
from tests.helpers import params_of, quiet_trainer

PAD, VOCAB, CLASSES, ALPHA = 0, 100, 3, 0.5


def _batches(side: str) -> list[dict[str, torch.Tensor]]:
    """Two batches of 4 examples of unequal lengths, padded to 9 and 11 tokens on ``side``."""
    g = torch.Generator().manual_seed(0)
    out = []
    for lengths, width in (([3, 9, 5, 7], 16), ([11, 2, 6, 8], 20)):
        ids = torch.full((4, width), PAD)
        mask = torch.zeros(4, width, dtype=torch.long)
        for i, n in enumerate(lengths):
            where = slice(width - n, width) if side == "left" else slice(0, n)
            ids[i, where] = torch.randint(1, VOCAB, (n,), generator=g)
            mask[i, where] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, CLASSES, (4,), generator=g)})
    return out


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD,
                                      num_labels=CLASSES, max_position_embeddings=64)
    model = transformers.LlamaForSequenceClassification(config)
    with torch.no_grad():  # a pad embedding of zeros keeps left-padded positions at 0 in every layer, live and
        model.model.embed_tokens.weight[PAD].normal_()  # reference alike; real tokenizers often pad with eos
    return model


class DictInput(nn.Module):
    """A root whose forward takes the whole input dict (as ``TransferClassifier.forward(x)`` does)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: dict[str, torch.Tensor]) -> Any:
        return self.net(**x)


class SequenceClassifier(LightningModule):
    """The Llama classifier as ``backbone``, called with keywords, one dict, or positionally (``call``).

    ``penalty``: ``None``, ``"masked"`` (real tokens only) or ``"all"`` (every token) — the reference
    DELTA penalty put in the loss, from an eval-mode copy of the backbone taken at the first step.
    """

    def __init__(self, side: str, call: str = "kwargs", penalty: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        net = _llama()
        self.backbone = DictInput(net) if call == "dict" else net
        self.side, self.call, self.penalty = side, call, penalty
        self.layers = [f"{self.prefix}.model.layers.{i}" for i in (0, 1)]
        self._frozen: list[nn.Module] = []  # a list: not registered as a submodule

    @property
    def prefix(self) -> str:
        return "backbone.net" if self.call == "dict" else "backbone"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._logits(self.backbone, {"input_ids": input_ids, "attention_mask": attention_mask})

    def _logits(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        if self.call == "dict":
            return module(inputs).logits
        if self.call == "positional":
            return module(inputs["input_ids"], inputs["attention_mask"]).logits
        return module(**inputs).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.penalty is None:
            return F.cross_entropy(self._logits(self.backbone, batch), batch["labels"])
        if not self._frozen:
            self._frozen.append(copy.deepcopy(self.backbone).eval().requires_grad_(False))
        live, ref = {}, {}
        names = [n[len("backbone."):] for n in self.layers]
        hooks = [self.backbone.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: live.__setitem__(n, o))
                 for n in names]
        hooks += [self._frozen[0].get_submodule(n).register_forward_hook(lambda m, a, o, n=n: ref.__setitem__(n, o))
                  for n in names]
        logits = self._logits(self.backbone, batch)
        with torch.no_grad():
            self._logits(self._frozen[0], batch)
        for h in hooks:
            h.remove()
        mask = batch["attention_mask"]
        real = mask.bool() if self.penalty == "masked" else torch.ones_like(mask, dtype=torch.bool)
        size = mask.shape[0]
        penalty = sum((live[n] - ref[n])[real].square().sum() / size for n in names)  # Σ real tokens, mean batch
        return F.cross_entropy(logits, batch["labels"]) + ALPHA / 2 * penalty

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_batches(self.side), batch_size=None, shuffle=False)


def _fit(model: SequenceClassifier, callbacks: list) -> dict[str, torch.Tensor]:
    quiet_trainer(max_steps=6, callbacks=callbacks).fit(model)
    return params_of(model)


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b − base‖ over all parameters."""
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    den = sum(float((b[k] - base[k]).norm() ** 2) for k in b) ** 0.5
    return num / max(den, 1e-12)


TOL = 5e-5  # of the regularizer's effect on the weights (measured: ~2e-6 from float rounding)


@pytest.mark.parametrize("call", ["kwargs", "dict", "positional"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_delta_counts_only_the_real_tokens(side, call):
    """Errors are relative to the regularizer's effect (the masked reference minus a run without it). Padding
    moves it by ~100% on the right and by ~0.25% on the left, where a causal model's leading pad positions
    see only pads (measured): both far above the tolerance."""
    model = SequenceClassifier(side, call)
    got = _fit(model, [FeatureMapRegularization(model.layers, alpha=ALPHA)])
    masked = _fit(SequenceClassifier(side, call, penalty="masked"), [])
    plain = _fit(SequenceClassifier(side, call), [])
    assert _relative_error(got, masked, plain) < TOL
    unmasked = _fit(SequenceClassifier(side, call, penalty="all"), [])
    assert _relative_error(unmasked, masked, plain) > 20 * TOL  # counting padding would have shown


def test_masked_penalty_by_hand():
    """Σ over each example's real tokens (any padding side), mean over the batch; other maps unmasked."""
    g = torch.Generator().manual_seed(1)
    f, f0 = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)  # (batch, tokens, channels)
    f[0, 0] = f0[0, 0] = float("nan")  # a padded position may hold anything: it must not leak in
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])  # left-padded, right-padded, full
    pooled, pooled0 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)  # (batch, channels)
    hand = 0.0
    for b in range(3):
        hand += sum(float(f[b, t, c] - f0[b, t, c]) ** 2 for t in range(4) for c in range(2) if mask[b, t])
        hand += sum(float(pooled[b, c] - pooled0[b, c]) ** 2 for c in range(5))
    live = [f.clone().requires_grad_(), pooled]
    value = feature_map_penalty(live, [f0, pooled0], alpha=0.6, channel_dim=[-1, 1], mask=mask)
    assert float(value) == pytest.approx(0.3 * hand / 3, rel=1e-6)
    value.backward()
    assert torch.isfinite(live[0].grad).all() and (live[0].grad[mask == 0] == 0).all()
    # channel weights combine with the mask
    w = torch.tensor([2.0, 0.5])
    weighted = feature_map_penalty([f], [f0], 1.0, [w], channel_dim=-1, mask=mask)
    by_hand = sum(float(w[c]) * float(f[b, t, c] - f0[b, t, c]) ** 2
                  for b in range(3) for t in range(4) for c in range(2) if mask[b, t])
    assert float(weighted) == pytest.approx(0.5 * by_hand / 3, rel=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_is_not_moved_by_padding(side):
    """DELTA's channel attention measures loss increases: padding a batch further must leave them as they are."""
    weights = []
    for extra in (0, 4):
        model = SequenceClassifier(side)
        batch = _batches(side)[0]
        pad = {"input_ids": torch.full((4, extra), PAD), "attention_mask": torch.zeros(4, extra, dtype=torch.long)}
        padded = {k: (torch.cat([pad[k], v], 1) if side == "left" else torch.cat([v, pad[k]], 1)) if k in pad else v
                  for k, v in batch.items()}
        model.train_dataloader = lambda padded=padded: DataLoader([padded], batch_size=None)
        cb = FeatureMapRegularization(model.layers, alpha=ALPHA, attention=True, attention_examples=4)
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(model)
        weights.append(cb.channel_weights)
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(float((w - 1).abs().max()) > 1e-3 for w in weights[0])  # the attention is not flat
