"""The set-ups users bring, around one small network: how data arrives, what the model returns, what it holds.

Every set-up trains the same network on the same batches in the same order, so a callback that works
must give the same parameters in each as in the plain one ("hooks": the module's own loaders, tuple
batches, a logits tensor, one optimizer). Set-ups that change what is trained (the user's own frozen
parameters) are checked by invariants instead.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tests.helpers import make_data

SETUPS = ["fit_loaders", "datamodule", "dict_batches", "model_output", "teacher", "two_optimizers", "user_frozen",
          "odd_accumulation", "checkpointed"]
# Parameters the user froze in the "user_frozen" set-up (a whole block, as a user freezing layer3 would).
USER_FROZEN = "net.backbone.0.0"


class Net(nn.Module):
    """TinyClassifier's network: two backbone blocks (one with BatchNorm) and a linear head."""

    def __init__(self, dim: int = 16, classes: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Sequential(nn.Linear(dim, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU()),
            nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
        )
        self.head = nn.Linear(32, classes)
        self.checkpointed = False  # the "checkpointed" set-up: block 1 recomputed in backward (activation checkpointing)

    def forward(self, x):
        if not (self.checkpointed and self.training):
            return self.head(self.backbone(x))
        # (block 0's BatchNorm would update its running statistics again when recomputed: not checkpointed)
        x = torch.utils.checkpoint.checkpoint(self.backbone[1], self.backbone[0](x), use_reentrant=False)
        return self.head(x)


class _DictData(Dataset):
    """Hugging Face style examples: ``{"features": x, "labels": y}`` (the default collate stacks them)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"features": x, "labels": y}


def loaders(setup: str, n: int = 48, batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    train, val = make_data(n), make_data(32, seed=1)
    if setup == "dict_batches":
        train, val = _DictData(train), _DictData(val)
    return DataLoader(train, batch_size=batch_size, shuffle=False), DataLoader(val, batch_size=batch_size)


class SetupModule(LightningModule):
    """One LightningModule for every set-up of :data:`SETUPS` (``"hooks"`` is the plain reference)."""

    def __init__(self, setup: str = "hooks", seed: int = 0, lr: float = 0.1):
        super().__init__()
        torch.manual_seed(seed)
        self.setup_name, self.lr = setup, lr
        self.net = Net()
        if setup == "teacher":  # a frozen copy registered after the student, as distillation / EMA code does
            self.teacher = copy.deepcopy(self.net).requires_grad_(False)
        if setup == "user_frozen":
            self.get_submodule(USER_FROZEN).requires_grad_(False)
        if setup == "two_optimizers":
            self.automatic_optimization = False
        self.net.checkpointed = setup == "checkpointed"

    def forward(self, features):
        logits = self.net(features)
        if self.setup_name == "model_output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=logits)
        return logits

    def _logits_and_labels(self, batch):
        if isinstance(batch, dict):
            return self(features=batch["features"]), batch["labels"]
        x, y = batch
        out = self(x)
        return (out.logits if hasattr(out, "logits") else out), y

    def training_step(self, batch, batch_idx):
        logits, y = self._logits_and_labels(batch)
        loss = F.cross_entropy(logits, y)
        if self.automatic_optimization:
            return loss
        optimizers = self.optimizers()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad()
        return loss

    def validation_step(self, batch, batch_idx):
        logits, y = self._logits_and_labels(batch)
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if self.setup_name == "two_optimizers":  # backbone and head, each its own SGD: per parameter the same math
            return [torch.optim.SGD(self.net.backbone.parameters(), lr=self.lr, momentum=0.9),
                    torch.optim.SGD(self.net.head.parameters(), lr=self.lr, momentum=0.9)]
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class HookModule(SetupModule):
    """The module brings its own loaders (the reference set-up, and every set-up but fit_loaders/datamodule)."""

    def train_dataloader(self):
        return loaders(self.setup_name)[0]

    def val_dataloader(self):
        return loaders(self.setup_name)[1]


class SetupDataModule(LightningDataModule):
    def train_dataloader(self):
        return loaders("datamodule")[0]

    def val_dataloader(self):
        return loaders("datamodule")[1]


def build(setup: str, seed: int = 0) -> tuple[LightningModule, dict]:
    """The module of a set-up and the keyword arguments of its ``trainer.fit`` call."""
    if setup == "fit_loaders":
        train, val = loaders(setup)
        return SetupModule(setup, seed), {"train_dataloaders": train, "val_dataloaders": val}
    if setup == "datamodule":
        return SetupModule(setup, seed), {"datamodule": SetupDataModule()}
    return HookModule(setup, seed), {}


def student_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith("net.")}
