"""Layer-wise LR decay (`build_param_groups`) as a tool for any LightningModule: timm's own grouping on timm
models (checked against ``timm.optim.param_groups_layer_decay``), one named group per block elsewhere."""

from __future__ import annotations

import pytest
import timm
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer import build_param_groups, list_blocks
from tests.helpers import quiet_trainer

TIMM_MODELS = {
    "vit_class_token": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}),
    "vit_avg_pool_fc_norm": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3,
                                                      "global_pool": "avg", "class_token": False, "fc_norm": True}),
    "convnext": ("convnext_atto", {}),
    "resnet": ("resnet18", {}),
}


def _timm(key: str) -> nn.Module:
    name, kwargs = TIMM_MODELS[key]
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs)


def _by_param(groups: list[dict], lr_key: str) -> dict[int, tuple[float, float]]:
    return {id(p): (g[lr_key], g["weight_decay"]) for g in groups for p in g["params"]}


class Wrapper(LightningModule):
    """A user's own LightningModule holding a timm model (the tool must see through it)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("key", list(TIMM_MODELS))
def test_layer_decay_equals_timms_param_groups_layer_decay(key, wrapped):
    net = _timm(key)
    reference = param_groups_layer_decay(net, weight_decay=0.05, no_weight_decay_list=getattr(net, "no_weight_decay", set)(),
                                         layer_decay=0.7)
    ours = build_param_groups(Wrapper(net) if wrapped else net, lr=1.0, weight_decay=0.05, layer_decay=0.7)
    want, got = _by_param(reference, "lr_scale"), _by_param(ours, "lr")
    assert got.keys() == want.keys()
    names = {id(p): n for n, p in net.named_parameters()}
    wrong = [(names[k], want[k], got[k]) for k in want if got[k][0] != pytest.approx(want[k][0], rel=1e-12) or got[k][1] != want[k][1]]
    assert not wrong, wrong[:5]
    assert len({g["name"] for g in ours}) == len(ours)  # one named group per block and decay kind


def test_vit_groups_are_named_by_real_blocks_and_skip_weight_decay_where_timm_does():
    net = _timm("vit_class_token")
    groups = {g["name"]: g for g in build_param_groups(net, lr=1.0, weight_decay=0.05, layer_decay=0.5)}
    assert list(groups)[::2] == ["cls_token|pos_embed|patch_embed", "blocks.0", "blocks.1", "blocks.2|norm", "head"]
    assert groups["blocks.2|norm"]["lr"] == 0.5 and groups["head"]["lr"] == 1.0
    assert groups["cls_token|pos_embed|patch_embed"]["lr"] == 0.5**4
    exempt = {id(p) for p in groups["cls_token|pos_embed|patch_embed.no_decay"]["params"]}
    assert {id(net.cls_token), id(net.pos_embed)} <= exempt  # timm's no_weight_decay(): 3-d tensors, no decay


def test_hugging_face_bert_decays_per_layer():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    net = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                                   intermediate_size=32, max_position_embeddings=32, num_labels=3))
    groups = build_param_groups(net, lr=2.0, weight_decay=0.01, layer_decay=0.5)
    blocks = [n for n, _ in list_blocks(net)]
    assert blocks == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2",
                      "bert.pooler", "classifier"]
    lr = {g["name"]: g["lr"] for g in groups}
    for depth, name in enumerate(reversed(blocks)):
        assert lr[name] == 2.0 * 0.5**depth
    no_decay = {id(p) for g in groups if g["name"].endswith("no_decay") for p in g["params"]}
    layer_norm = net.bert.encoder.layer[0].output.LayerNorm
    assert {id(layer_norm.weight), id(layer_norm.bias), id(net.classifier.bias)} <= no_decay
    assert id(net.classifier.weight) not in no_decay and all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))


class UsersViT(LightningModule):
    """Layer decay in a user's own LightningModule: build_param_groups in configure_optimizers."""

    def __init__(self):
        super().__init__()
        self.vit = _timm("vit_class_token")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.vit(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(build_param_groups(self, lr=1e-3, weight_decay=0.05, layer_decay=0.5))

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)),
                          batch_size=4)


def test_learning_rate_monitor_shows_one_named_rate_per_block(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = UsersViT()
    trainer = quiet_trainer(max_steps=2, callbacks=[LearningRateMonitor()], log_every_n_steps=1,
                            logger=CSVLogger(tmp_path))
    trainer.fit(module)
    import csv

    rows = list(csv.DictReader(open(trainer.logger.experiment.metrics_file_path)))
    logged = {k: v for row in rows for k, v in row.items() if v}
    assert float(logged["lr-AdamW/vit.head"]) == pytest.approx(1e-3)
    assert float(logged["lr-AdamW/vit.blocks.0"]) == pytest.approx(1e-3 * 0.5**3)
    assert float(logged["lr-AdamW/vit.cls_token|vit.pos_embed|vit.patch_embed"]) == pytest.approx(1e-3 * 0.5**4)
