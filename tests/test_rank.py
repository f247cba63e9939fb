"""Ranking depths and models: block features (pooling, modes, padding), rows, and the ``rank`` command."""

from __future__ import annotations

import csv
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from lightning_transfer import TransferClassifier, block_features, rank_depths, rank_models
from lightning_transfer.functional.transferability import hscore, leep, logme, nce


class CNN(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.block1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


def _images(n: int = 24, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(classes).repeat(n // classes)
    return torch.rand(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1) * 0.3, y


def test_cnn_block_features_are_global_averages_in_eval_mode_and_modes_are_restored():
    model, (x, y) = CNN(), _images()
    model.train()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)  # 3 batches, the last one short
    feats, labels = block_features(model, loader, blocks=["block1", "block2"])
    assert list(feats) == ["block1", "block2"]
    assert model.training and model.block1[1].training  # restored
    model.eval()
    with torch.no_grad():  # the reference: the blocks called by hand, spatial means
        h1 = model.block1(x)
        h2 = model.block2(h1)
    torch.testing.assert_close(feats["block1"], h1.mean((2, 3)))
    torch.testing.assert_close(feats["block2"], h2.mean((2, 3)))
    assert torch.equal(labels, y)
    feats, labels = block_features(model, loader, max_batches=2)  # default blocks: list_blocks' (conv, BN apart)
    assert list(feats) == ["block1.0", "block1.1", "block2"]
    assert feats["block1.1"].shape == (20, 4) and labels.shape == (20,)


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def _padded(lengths: list[int], width: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + i
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([i % 2 for i in range(len(lengths))])}


def test_bert_block_features_are_means_over_unpadded_tokens():
    model, lengths = _bert(), [3, 5, 2, 4]
    feats, labels = block_features(model, [_padded(lengths, 6)])
    assert list(feats) == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler"]
    batch = _padded(lengths, 6)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states
    for i, name in enumerate(["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"]):
        expected = torch.stack([hidden[i][j, :n].mean(0) for j, n in enumerate(lengths)])  # real tokens only
        torch.testing.assert_close(feats[name], expected, atol=1e-5, rtol=1e-5)
    assert feats["bert.pooler"].shape == (4, 16)
    longer, _ = block_features(model, [_padded(lengths, 11)])  # more padding: the same features
    for name in feats:
        torch.testing.assert_close(longer[name], feats[name], atol=1e-5, rtol=1e-5)


def test_rank_depths_gives_one_row_per_block_scored_on_its_features():
    model, (x, y) = CNN(), _images(60)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    rows = rank_depths(model, loader, ["logme", "hscore"])
    feats, labels = block_features(model, loader)
    assert [(r["block"], r["depth"], r["dim"]) for r in rows] == [("block1.0", 1, 4), ("block1.1", 2, 4), ("block2", 3, 6)]
    for r in rows:
        assert r["logme"] == pytest.approx(logme(feats[r["block"]], labels), abs=1e-9)
        assert r["hscore"] == pytest.approx(hscore(feats[r["block"]], labels), abs=1e-9)
    with pytest.raises(ValueError, match="'leep'"):  # needs a source head: rank_models
        rank_depths(model, loader, ["leep"])


def test_rank_models_scores_head_inputs_and_source_heads_only_where_there_is_one():
    source, (x, y) = CNN(classes=5), _images(60)  # a 5-class source head for a 3-class task
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    fresh = TransferClassifier(CNN(classes=5), num_classes=3, pretrained=False)  # its head is new
    rows = rank_models({"source": source, "fresh": fresh}, loader)
    source.eval()
    with torch.no_grad():
        pooled = source.block2(source.block1(x)).mean((2, 3))  # what the head receives
        logits = source(x)
    assert rows[0]["model"] == "source" and rows[0]["dim"] == 6
    assert rows[0]["logme"] == pytest.approx(logme(pooled, y), abs=1e-9)
    assert rows[0]["leep"] == pytest.approx(leep(torch.softmax(logits.double(), 1), y), abs=1e-9)
    assert rows[0]["nce"] == pytest.approx(nce(logits.argmax(1), y), abs=1e-9)
    assert rows[1]["leep"] is None and rows[1]["nce"] is None and rows[1]["logme"] is not None
    forced = rank_models({"source": source, "fresh": fresh}, loader, ["leep"], source_heads=["fresh"])
    assert forced[0]["leep"] is None and forced[1]["leep"] is not None
    with pytest.raises(ValueError, match="not candidates"):
        rank_models({"source": source}, loader, source_heads=["typo"])
    with pytest.raises(ValueError, match="no batch"):
        rank_models({"source": source}, [])


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # main() reads sys.argv, as the command does
def test_rank_command_writes_table_csv_and_plot_offline(tmp_path, monkeypatch, capsys):
    from lightning_transfer.cli import main

    out = tmp_path / "rank"
    monkeypatch.setattr(sys, "argv", ["lightning-transfer", "rank", "--config", "configs/quickstart.yaml",
                                      "--models", "efficientnet_lite0", "efficientnet_lite2", "--max-batches", "1",
                                      "--out", str(out),
                                      "--data.init_args.batch_size=20", "--data.init_args.image_size=32"])
    main()
    with (out / "rank.csv").open() as f:
        rows = list(csv.DictReader(f))
    depths = [r for r in rows if r["kind"] == "depth"]
    assert [int(r["depth"]) for r in depths] == list(range(1, 10))  # EfficientNet-Lite0: 9 blocks before the head
    assert all(float(r["logme"]) == float(r["logme"]) for r in depths)  # numbers, not NaN
    models = [r for r in rows if r["kind"] == "model"]
    assert [r["name"] for r in models] == ["efficientnet_lite0", "efficientnet_lite2"]  # offline weights, both
    assert all(r["dim"] == "1280" for r in models) and models[0]["logme"] != models[1]["logme"]
    assert all(float(r["leep"]) < 0 and float(r["nce"]) <= 0 for r in models)  # the ImageNet heads were used
    assert (out / "rank.png").stat().st_size > 1000
    assert "backbone._blocks.15" in capsys.readouterr().out
