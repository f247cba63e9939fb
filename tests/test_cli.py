"""The `lightning-transfer` command: stacked method configs compose, and no user file is overwritten."""

from pathlib import Path

import pytest
import torch
import yaml

from lightning_transfer.cli import build_cli, compose_callbacks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
OFFLINE = ["--model.init_args.pretrained=false"]  # no weights needed to check what is built


def _callbacks(*configs: str) -> list[str]:
    args = [a for c in configs for a in ("--config", str(CONFIGS / c))]
    cli = build_cli([*args, *OFFLINE], run=False)
    return [type(cb).__name__ for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_transfer.callbacks")]


def test_stacked_method_configs_keep_every_callback():
    """Issue 14 #1: the later file's trainer.callbacks used to replace the earlier list (only FreezeSchedule)."""
    args = [a for c in ("quickstart.yaml", "l2sp.yaml", "freeze_depth.yaml") for a in ("--config", str(CONFIGS / c))]
    cli = build_cli([*args, *OFFLINE], run=False)
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "L2SP" in names and "FreezeSchedule" in names
    assert cli.model.hparams.weight_decay == 0.0  # l2sp.yaml's other settings still apply


@pytest.mark.parametrize(
    "configs,expected",
    [
        (("l2sp.yaml", "freeze_depth.yaml"), ["L2SP", "FreezeSchedule"]),
        (("delta.yaml", "lp_ft.yaml"), ["FeatureMapRegularization", "FreezeSchedule"]),
        (("dtnh_delta.yaml", "gradual_unfreeze.yaml"), ["FeatureMapRegularization", "DTNH", "FreezeSchedule"]),
        (("mei.yaml", "rifle.yaml"), ["MaxEntropyHeadInit", "RIFLE"]),
        (("rifle.yaml", "freeze_depth.yaml"), ["RIFLE", "FreezeSchedule"]),
        (("l2sp.yaml", "layer_decay.yaml"), ["L2SP"]),
        (("l2sp.yaml", "lines.yaml"), ["L2SP", "LiNeS"]),  # LiNeS after L2SP, reading its anchors
    ],
)
def test_the_combinations_of_the_readme_compose(configs, expected):
    assert _callbacks("quickstart.yaml", *configs) == expected


def test_the_same_callback_twice_is_an_error():
    with pytest.raises(ValueError, match="would apply twice"):
        _callbacks("quickstart.yaml", "dtnh.yaml", "l2sp.yaml")


def test_a_command_line_append_still_appends():
    args = ["--config", str(CONFIGS / "l2sp.yaml"), "--config", str(CONFIGS / "mei.yaml"),
            "--trainer.callbacks+=lightning_transfer.RIFLE"]
    composed = compose_callbacks(args)
    assert composed[-1] == "--trainer.callbacks+=lightning_transfer.RIFLE"
    assert composed.index(next(a for a in composed if a.startswith("--trainer.callbacks="))) == 4


def test_a_single_config_is_left_to_jsonargparse():
    args = ["fit", "--config", str(CONFIGS / "l2sp.yaml")]
    assert compose_callbacks(args) == args


def _tiny_config(tmp_path: Path, logger) -> Path:
    config = {
        "model": {"class_path": "tests.helpers.TinyClassifier"},
        "data": {"class_path": "tests.helpers.TinyDataModule"},
        "trainer": {"max_epochs": 1, "logger": logger, "accelerator": "cpu", "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path)},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_users_config_yaml_is_never_overwritten(tmp_path, monkeypatch):
    """Issue 14 #11: without a logger the config was saved (overwrite=True) into the working directory."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "config.yaml"
    mine.write_text("my: own file\n")
    build_cli(["fit", "--config", str(_tiny_config(tmp_path, False))])
    assert mine.read_text() == "my: own file\n"


def test_with_a_logger_the_config_is_kept_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}}
    cli = build_cli(["fit", "--config", str(_tiny_config(tmp_path, logger))])
    saved = Path(cli.trainer.log_dir) / "config.yaml"
    assert saved.is_file() and "TinyClassifier" in saved.read_text()
    assert not (tmp_path / "config.yaml").exists()


def test_no_stray_config_is_committed_at_the_root():
    assert not (ROOT / "config.yaml").exists()


def test_timm_vit_config_fine_tunes_by_name(tmp_path):
    """configs/vit_timm.yaml on the quickstart task: a timm ViT by name, AdamW, layer decay (random init here)."""
    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "vit_timm.yaml"), *OFFLINE,
            "--data.init_args.batch_size=4", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    cli = build_cli(args, run=False)
    assert type(cli.model.backbone).__name__ == "VisionTransformer" and cli.datamodule.hparams.image_size == 224
    cli.trainer.fit_loop.max_epochs, cli.trainer.limit_train_batches, cli.trainer.limit_val_batches = 1, 1, 0
    before = cli.model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not torch.equal(before, cli.model.backbone.blocks[0].attn.qkv.weight)
    lrs = {g["name"]: g["lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert lrs["blocks.11|norm"] == pytest.approx(0.75 * lrs["head"])


def test_hf_config_builds_the_named_model(tmp_path):
    """configs/hf_vit.yaml with the hub name swapped for a local folder (no download in the tests)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    ViTForImageClassification(ViTConfig(image_size=224, patch_size=32, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    ViTImageProcessor().save_pretrained(tmp_path)
    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "hf_vit.yaml"),
            f"--model.init_args.backbone=hf:{tmp_path}", "--trainer.logger=false"]
    cli = build_cli(args, run=False)
    assert type(cli.model.backbone).__name__ == "ViTForImageClassification"
    assert cli.model.backbone.classifier.out_features == 10 and cli.model.hparams.layer_decay == 0.75


def test_no_warning_about_args_and_command_line_arguments_together(monkeypatch, tmp_path):
    """Every run used to warn "not recommended to provide both args and command line arguments": the CLI
    composed sys.argv into args itself (`lightning-transfer fit ...`), and `rank` / `depth-scan` pass args
    while sys.argv holds their own arguments."""
    import warnings

    from lightning_transfer.cli import main

    argv = ["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "l2sp.yaml"), *OFFLINE,
            "--trainer.logger=false", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}", "--data.init_args.per_class=2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr("sys.argv", ["lightning-transfer", "fit", *argv])
        main()  # what the console script runs
        monkeypatch.setattr("sys.argv", ["lightning-transfer", "rank", "--config", "x.yaml"])
        cli = build_cli(argv, run=False)  # what `rank` and `depth-scan` do in-process
    assert "L2SP" in [type(cb).__name__ for cb in cli.trainer.callbacks]
    both = [str(w.message) for w in caught if "not recommended to provide both" in str(w.message)]
    assert not both, both


def test_fsdp2_config_stacks_a_model_parallel_strategy():
    """configs/fsdp2.yaml on the quickstart config: FSDP2 on 2 processes, data parallel only (the strategy is
    built, no process starts; tests/test_transfer_classifier_sharded.py runs the sharded fits)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "fsdp2.yaml"), *OFFLINE,
            "--trainer.logger=false"]
    cli = build_cli(args, run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy) and cli.trainer.num_devices == 2
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)
    assert type(cli.model).__name__ == "TransferClassifier" and cli.trainer.max_epochs == 30  # the rest stays
