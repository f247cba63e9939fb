"""Co-Tuning: the relationship against a plain per-class average, the loss against autograd of it in the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_transfer import CoTuning
from lightning_transfer.functional.co_tuning import (
    co_tuning_loss,
    co_tuning_loss_and_feature_grad,
    relationship,
    relationship_sums,
)
from tests.helpers import TinyClassifier, assert_params_close, launch_env, make_data, params_of, quiet_trainer


def _plain_average(logits, labels, num_target):
    rows = []
    for t in range(num_target):
        picked = [torch.softmax(logits[i].double(), 0) for i in range(len(labels)) if int(labels[i]) == t]
        rows.append(sum(picked) / len(picked) if picked else torch.full((logits.shape[1],), 1.0 / logits.shape[1]))
    return torch.stack(rows).float()


def test_relationship_is_the_per_class_average_of_source_softmax_over_batches():
    torch.manual_seed(0)
    logits, labels = torch.randn(40, 6), torch.randint(0, 4, (40,))
    labels[labels == 3] = 2  # class 3 never seen: uniform
    sums = counts = None
    for part in range(0, 40, 16):  # batches of 16, 16, 8: sums add, as across DDP ranks
        s, c = relationship_sums(logits[part:part + 16], labels[part:part + 16], 4)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    torch.testing.assert_close(relationship(sums, counts), _plain_average(logits, labels, 4))


def test_feature_gradient_equals_autograd_of_the_loss():
    torch.manual_seed(0)
    head, features, labels = nn.Linear(8, 5), torch.randn(6, 8, requires_grad=True), torch.randint(0, 3, (6,))
    rel = torch.softmax(torch.randn(3, 5), 1)
    loss = -0.7 * sum((rel[labels[i]] * torch.log_softmax(head(features[i]), 0)).sum() for i in range(6)) / 6
    (expected,) = torch.autograd.grad(loss, features)
    value, grad = co_tuning_loss_and_feature_grad(features, labels, rel, 0.7, head)
    torch.testing.assert_close(value, loss.detach())
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(co_tuning_loss(head(features), labels, rel, 0.7), loss)


class CoTuningInLoss(TinyClassifier):
    """TinyClassifier whose loss includes Co-Tuning's term itself: ``p(y_s|y_t)`` averaged plainly over the
    training data by the model at fit start (eval mode), ``α·CE(p(·|y), source(features))`` in the loss."""

    def __init__(self, source: nn.Module, alpha: float, **kwargs):
        super().__init__(**kwargs)
        self.source, self.alpha, self.rel = [source], alpha, None

    def on_train_start(self):
        x, y = make_data(self.n, self.dim, self.classes).tensors
        self.eval()
        with torch.no_grad():
            self.rel = _plain_average(self.source[0](self.backbone(x)), y, self.classes)
        self.train()

    def training_step(self, batch, batch_idx):
        x, y = batch
        features = self.backbone(x)
        loss = F.cross_entropy(self.head(features), y)
        soft = self.rel[y]
        return loss - self.alpha * (soft * torch.log_softmax(self.source[0](features), 1)).sum(1).mean()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_callback_equals_the_loss_in_the_training_step(accumulate):
    torch.manual_seed(1)
    source = nn.Linear(32, 7).requires_grad_(False)
    runs = []
    for model, callbacks in ((TinyClassifier(batch_size=16, n=48), [CoTuning(source, alpha=2.0)]),
                             (CoTuningInLoss(source, 2.0, batch_size=16, n=48), [])):
        quiet_trainer(max_epochs=2, callbacks=callbacks, accumulate_grad_batches=accumulate).fit(model)
        runs.append({k: v for k, v in params_of(model).items() if not k.startswith("source")})
    assert_params_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)
    plain = TinyClassifier(batch_size=16, n=48)
    quiet_trainer(max_epochs=2, accumulate_grad_batches=accumulate).fit(plain)
    assert not torch.allclose(params_of(plain)["backbone.0.0.weight"], runs[0]["backbone.0.0.weight"])


def test_relationship_is_saved_and_the_wrong_width_fails_before_a_step():
    cb = CoTuning(nn.Linear(32, 5), alpha=1.0)
    quiet_trainer(max_steps=1, callbacks=[cb]).fit(TinyClassifier())
    state = cb.state_dict()
    assert state["relationship"].shape == (4, 5)
    torch.testing.assert_close(state["relationship"].sum(1), torch.ones(4))
    model = TinyClassifier()
    with pytest.raises(ValueError, match="source_head cannot take"):
        quiet_trainer(max_steps=1, callbacks=[CoTuning(nn.Linear(31, 5))]).fit(model)
    assert model.global_step == 0


DDP_SCRIPT = '''
import sys, torch
from torch import nn
sys.path.insert(0, sys.argv[2])
from lightning_transfer import CoTuning
from tests.helpers import TinyClassifier, quiet_trainer
torch.manual_seed(1)
cb = CoTuning(nn.Linear(32, 7), alpha=1.0)
trainer = quiet_trainer(max_steps=1, callbacks=[cb], strategy="ddp", devices=2)
trainer.fit(TinyClassifier(batch_size=8, n=48))
if trainer.global_rank == 0:
    torch.save(cb.relationship, sys.argv[1])
'''


@pytest.mark.slow
def test_ddp_relationship_averages_over_every_rank(tmp_path):
    """Two ranks, each half of the data: the relationship is the average over all of it (sums all-reduced)."""
    import subprocess
    import sys
    from pathlib import Path

    script, out, root = tmp_path / "run.py", tmp_path / "rel.pt", Path(__file__).resolve().parents[1]
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out), str(root)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(1)
    source, model = nn.Linear(32, 7), TinyClassifier(batch_size=8, n=48).eval()
    x, y = make_data(48, 16, 4).tensors
    with torch.no_grad():
        expected = _plain_average(source(model.backbone(x)), y, 4)
    torch.testing.assert_close(torch.load(out), expected)
