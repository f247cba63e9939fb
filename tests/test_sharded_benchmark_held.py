"""benchmarks/sharded.py's count of what a callback holds: its own copies, never the live model's tensors."""

import sys
from pathlib import Path

from lightning.pytorch import Callback, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sharded  # noqa: E402

from lightning_transfer import DTNH, L2SP  # noqa: E402


class Holder(Callback):
    """References the live parameters, and keeps one clone of the first one (twice: one storage)."""

    def on_fit_start(self, trainer, pl_module):
        params = list(pl_module.parameters())
        self.refs = {"live": params, "grads": [p.grad for p in params]}
        clone = params[0].detach().clone()
        self.copies = [clone, (clone[:1], {"again": clone})]


def _fit(callbacks):
    model = sharded.MLP(16, 2, n=64, n_val=64)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model)
    return trainer, model


def test_references_to_the_live_model_count_nothing_and_copies_count_once():
    holder = Holder()
    trainer, model = _fit([holder])
    held = sharded.held_bytes([holder], trainer, model)
    first = next(model.parameters())
    assert held == {"Holder.copies": first.numel() * 4}


def test_l2sp_anchors_are_counted_once_under_dtnh():
    l2sp = L2SP(alpha=0.01, beta=0.01)
    trainer, model = _fit([l2sp, DTNH()])
    held = sharded.held_bytes([l2sp, *trainer.callbacks], trainer, model)
    anchored = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("head."))
    assert held["L2SP._anchors"] == anchored
    assert not any(k.startswith("DTNH.") for k in held)  # DTNH reaches L2SP again: not counted twice
