"""A TransferClassifier built around the user's own network: its checkpoint says what it needs to load."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer import TransferClassifier
from lightning_transfer.cli import build_cli
from tests.helpers import quiet_trainer


class UserNet(nn.Module):
    """The user's own pre-trained network (its ``fc`` is replaced by TransferClassifier's new head)."""

    def __init__(self, inputs: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(inputs, 12), nn.ReLU())
        self.fc = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _trained_checkpoint(tmp_path) -> tuple[TransferClassifier, str]:
    torch.manual_seed(0)
    model = TransferClassifier(UserNet(), num_classes=3, lr=0.1, scheduler="constant")
    data = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,))), batch_size=8)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model, data)
    path = str(tmp_path / "user_net.ckpt")
    trainer.save_checkpoint(path)
    return model, path


def test_loading_without_the_backbone_names_the_fix(tmp_path):
    """It used to build the default EfficientNet-Lite0 and fail with a wall of "Missing key(s)"."""
    _, path = _trained_checkpoint(tmp_path)
    fix = r"TransferClassifier\.load_from_checkpoint\(path, backbone=<your module>\)"
    with pytest.raises(ValueError, match=r"own backbone module \(tests\.test_model_checkpoint\.UserNet\).*"
                                         + fix):
        TransferClassifier.load_from_checkpoint(path)


def test_loading_with_the_backbone_restores_every_weight_exactly(tmp_path):
    model, path = _trained_checkpoint(tmp_path)
    loaded = TransferClassifier.load_from_checkpoint(path, backbone=UserNet())
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded.hparams.backbone == "module:tests.test_model_checkpoint.UserNet"  # the checkpoint's record
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_a_checkpoint_of_a_cli_run_rebuilds_the_backbone_from_the_config(tmp_path):
    """LightningCLI records the backbone's class_path and init_args: loading, resuming need nothing more."""
    backbone = '{"class_path": "tests.test_model_checkpoint.UserNet", "init_args": {"inputs": 16}}'
    args = ["fit", "--model=lightning_transfer.TransferClassifier", "--data=tests.helpers.TinyDataModule",
            f"--model.init_args.backbone={backbone}",
            "--model.init_args.num_classes=4", "--trainer.max_epochs=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}"]
    cli = build_cli(args)
    path = str(tmp_path / "cli.ckpt")
    cli.trainer.save_checkpoint(path)
    loaded = TransferClassifier.load_from_checkpoint(path)
    assert isinstance(loaded.backbone, UserNet)
    for name, value in cli.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    resumed = build_cli([*args, "--trainer.max_epochs=2", f"--ckpt_path={path}"])
    assert resumed.trainer.current_epoch == 2
