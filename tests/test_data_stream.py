"""The data modules' training stream depends on (seed, epoch) only: paired methods see the same batches,
whatever else draws from the global RNG, and a resume at an epoch boundary continues the stream."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_transfer.data import ArrayDataModule, SeededEpochSampler
from tests.helpers import StopAfter, quiet_trainer


def _data(seed=0, augment=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 20)
    return ArrayDataModule(images, labels, per_class=6, val_per_class=4, test_per_class=4, image_size=8,
                           batch_size=4, seed=seed, augment=augment)


class Recorder(LightningModule):
    """A linear classifier that records every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 64, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        return self.fc(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.detach().clone())
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DrawsGlobalRNG(Callback):
    """What head re-inits, evaluation loaders and dropout do between epochs: draw the global RNG."""

    def on_train_epoch_end(self, trainer, pl_module):
        torch.rand(17)


def _seen(callbacks=(), val=False, seed=0, augment=True):
    model = Recorder()
    trainer = quiet_trainer(max_epochs=3, callbacks=list(callbacks), limit_val_batches=None if val else 0)
    trainer.fit(model, datamodule=_data(seed, augment))
    return torch.cat(model.seen)


def test_sampler_stream_is_a_function_of_seed_and_epoch():
    a, b = SeededEpochSampler(10, seed=3, flips=True), SeededEpochSampler(10, seed=3, flips=True)
    torch.rand(5)  # the global RNG plays no part
    b.set_epoch(1)
    first, second = list(a), list(a)  # iterated without set_epoch: epoch 0, then epoch 1
    assert list(b) == second != first
    assert sorted(i for i, _ in first) == list(range(10))
    assert {f for _, f in first + second} == {True, False}
    assert list(SeededEpochSampler(10, seed=4)) != [i for i, _ in first]
    assert all(isinstance(i, int) for i in SeededEpochSampler(10, seed=3))  # no flips: plain indices


def test_training_batches_do_not_depend_on_global_rng_draws_or_validation():
    reference = _seen()
    torch.testing.assert_close(_seen([DrawsGlobalRNG()], val=True), reference, rtol=0, atol=0)
    assert not torch.equal(_seen(seed=1), reference)
    flipped = _seen()
    assert torch.equal(flipped, reference)
    assert not torch.equal(_seen(augment=False), reference)  # the flips are real


def test_resume_at_an_epoch_boundary_continues_the_same_stream(tmp_path):
    uninterrupted = _seen()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = Recorder()
    quiet_trainer(max_epochs=3, callbacks=[StopAfter(2), ckpt], enable_checkpointing=True).fit(first, datamodule=_data())
    resumed = Recorder()
    quiet_trainer(max_epochs=3, enable_checkpointing=False).fit(resumed, datamodule=_data(),
                                                                 ckpt_path=str(tmp_path / "last.ckpt"))
    torch.testing.assert_close(torch.cat(first.seen + resumed.seen), uninterrupted, rtol=0, atol=0)
