"""BSS: the analytic gradient against autograd, and the callback against the penalty in the loss."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_transfer import BSS
from lightning_transfer.functional.bss import bss_penalty, bss_penalty_grad
from tests.helpers import TinyClassifier


@pytest.mark.parametrize("shape,k", [((6, 10), 1), ((6, 10), 3), ((12, 5), 2), ((4, 3, 2), 2)])
def test_grad_matches_autograd(shape, k):
    f = torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    value = bss_penalty(f, 0.3, k)
    value.backward()
    v, g = bss_penalty_grad(f.detach(), 0.3, k)
    torch.testing.assert_close(v, value.detach())
    torch.testing.assert_close(g, f.grad, atol=1e-5, rtol=1e-4)


def test_hand_worked_case():
    f = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert float(bss_penalty(f, 0.5, 2)) == pytest.approx(0.5 * (1 + 4))
    assert float(bss_penalty(f, 0.5, 10)) == pytest.approx(0.5 * 14)  # k beyond the rank: all of them


class _InLoss(TinyClassifier):
    """The penalty in the loss, differentiated by autograd (the reference)."""

    def __init__(self, eta: float, k: int, **kwargs):
        super().__init__(**kwargs)
        self.eta, self.k = eta, k

    def training_step(self, batch, batch_idx):
        x, y = batch
        f = self.backbone(x)
        loss = torch.nn.functional.cross_entropy(self.head(f), y) + bss_penalty(f, self.eta, self.k)
        return loss


def _fit(model, callbacks, accumulate=1):
    Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accumulate_grad_batches=accumulate).fit(model)
    return model


@pytest.mark.parametrize("accumulate", [1, 3])
def test_callback_equals_penalty_in_loss(accumulate):
    ours = _fit(TinyClassifier(), [BSS(eta=0.5, k=2)], accumulate)
    ref = _fit(_InLoss(0.5, 2), [], accumulate)
    plain = _fit(TinyClassifier(), [], accumulate)
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)
    assert any(not torch.allclose(a, c) for a, c in zip(ours.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("bad", [{"eta": -1.0}, {"k": 0}, {"k": 1.5}, {"head": 3}])
def test_bad_arguments(bad):
    with pytest.raises((ValueError, TypeError)):
        BSS(**bad)
