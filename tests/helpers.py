"""Small models and data shared by the tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 64, dim: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w).argmax(1)
    return TensorDataset(x, y)


class TinyClassifier(LightningModule):
    """A two-block MLP backbone (with BatchNorm) and a linear head named ``head``.

    ``extra_loss(module) -> Tensor`` is added to the task loss: tests use it as the reference that a
    callback's gradient must reproduce.
    """

    def __init__(self, dim: int = 16, classes: int = 4, optimizer: str = "sgd", lr: float = 0.1,
                 weight_decay: float = 0.0, extra_loss: Callable | None = None, batch_size: int = 16,
                 n: int = 64, seed: int | None = 0, norm: bool = True, layer_decay: float | None = None,
                 fused: bool = False):
        super().__init__()
        if seed is not None:  # None: whatever seed_everything set
            torch.manual_seed(seed)
        self.backbone = nn.Sequential(
            nn.Sequential(nn.Linear(dim, 32, bias=False), nn.BatchNorm1d(32) if norm else nn.Identity(), nn.ReLU()),
            nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
        )
        self.head = nn.Linear(32, classes)
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.extra_loss = extra_loss
        self.batch_size, self.n, self.dim, self.classes = batch_size, n, dim, classes
        self.layer_decay, self.fused = layer_decay, fused  # fused: the torch optimizer's fused=True kernel

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(self)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        params = self.parameters()
        if self.layer_decay is not None:  # per-block groups: lr * layer_decay**(blocks below the head)
            from lightning_transfer import build_param_groups

            params = build_param_groups(self, self.lr, self.weight_decay, self.layer_decay, decay_norm_and_bias=True)
        fused = {"fused": True} if self.fused else {}  # else torch's default (foreach on GPU)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay, **fused)
        adam = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
        return adam(params, lr=self.lr, weight_decay=self.weight_decay, **fused)

    def train_dataloader(self):
        return DataLoader(make_data(self.n, self.dim, self.classes), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(make_data(32, self.dim, self.classes, seed=1), batch_size=16)


class StopAfter(Callback):
    """Interrupt a run at an epoch boundary (the checkpoint of that epoch is still written)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


# LT_TEST_ACCELERATOR=gpu runs the single-device tests on a GPU (the device machine); CI runs them on CPU.
ACCELERATOR = os.environ.get("LT_TEST_ACCELERATOR", "cpu")


def quiet_trainer(**kwargs) -> Trainer:
    defaults = dict(accelerator=ACCELERATOR, devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, deterministic=True)
    defaults.update(kwargs)
    return Trainer(**defaults)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_params_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


class ImageModule(LightningModule):
    """Any network + cross-entropy, on random 32x32 images."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def val_dataloader(self):  # probe data for RepresentationSimilarity (no validation_step: no val loop)
        return self.train_dataloader()

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)


class TinyDataModule(LightningDataModule):
    """make_data() split into train/val/test, with the per_class and seed knobs of the real data modules."""

    def __init__(self, per_class: int = 8, seed: int = 0, batch_size: int = 16):
        super().__init__()
        self.per_class, self.seed, self.batch_size = per_class, seed, batch_size

    def _split(self, offset, n):
        return make_data(n, 16, 4, seed=self.seed * 100 + offset)

    def train_dataloader(self):
        return DataLoader(self._split(0, 4 * self.per_class), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self._split(1, 32), batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self._split(2, 32), batch_size=self.batch_size)


DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                    "LOCAL_WORLD_SIZE", "PL_TRAINER_GPUS")


def destroy_process_group() -> None:
    """End the process group an in-process Trainer with a DDP strategy initialized (Lightning leaves it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_env() -> dict[str, str]:
    """The environment of a test's multi-process launch: the test process's own, without the distributed
    variables an earlier in-process test may have left in it (Lightning sets ``MASTER_PORT``, ``LOCAL_RANK`` ...).

    Inherited, they made the launched script bind the worker's own port (EADDRINUSE) or believe its ranks were
    started externally (rank 1 never started): seen in full runs only, after other tests in the same worker.
    """
    return {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
