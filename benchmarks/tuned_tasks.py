"""The tasks of ``tuned.py``: benchmark A (ImageNet EfficientNet-Lite0 -> Animal-MNIST), B (a small CNN
pre-trained on Animal-MNIST 0-4 -> close and far targets), C (a small pre-trained ViT -> the same
targets) and D (a real pre-trained transformer, all-MiniLM-L6-v2 -> BBC News topics, 8 and 50 articles per
class), with each task's learning-rate grid, DELTA layers, depths and block list."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import accuracy
import accuracy_controlled as controlled
import accuracy_transformer as transformer
from lightning.pytorch import LightningDataModule
from torch import nn

from lightning_transfer import AnimalMNISTDataModule, ArrayDataModule, BBCNewsDataModule, TransferClassifier
from lightning_transfer.anatomy import find_head
from lightning_transfer.assets import minilm_folder
from lightning_transfer.callbacks.co_tuning import PretrainedHead

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Task:
    """A fine-tuning task and the budget grid of its methods."""

    key: str
    title: str
    data: Callable[..., LightningDataModule]  # (seed, augment=...) -> data module
    model: Callable[[dict], TransferClassifier]  # TransferClassifier overrides (lr, ...) -> fresh model
    num_classes: int
    epochs: int
    train_size: int
    batch_size: int
    lrs: tuple[float, ...]  # four learning rates for methods without a knob of their own
    knob_lrs: tuple[float, float]  # two learning rates crossed with a method's knob
    delta_layers: list[str]
    depths: tuple[int, int]
    blocks: list[str] | None = None  # explicit blocks for FreezeSchedule
    augment: bool = True
    source_head: Callable[[], nn.Module] | None = None  # the pre-trained classifier the new head replaced
    mean_pooled_layer: str | None = None  # a text encoder's last layer: a second probe on its mean-pooled output
    tokens: int | None = None  # text: tokens per example, over which DELTA's penalty sums (a second, scaled α grid)
    lora: bool = False  # a LoRA row: the model's overrides take lora_rank

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_size / self.batch_size)


def _animal(seed: int, augment: bool, per_class: int, size: int, val: int, test: int) -> AnimalMNISTDataModule:
    return AnimalMNISTDataModule(per_class=per_class, seed=seed, image_size=size, val_per_class=val,
                                 test_per_class=test, augment=augment)


def _lite0(overrides: dict) -> TransferClassifier:
    return TransferClassifier("efficientnet_lite0", num_classes=10, **overrides)


def _target(target: str, seed: int, augment: bool) -> ArrayDataModule:
    images, labels = controlled.target_arrays(target)
    return ArrayDataModule(images, labels, per_class=10, image_size=28, batch_size=16, seed=seed,
                           augment=augment, **controlled.SPLITS[target])


def _transferred(network: controlled.Network, source: str, num_classes: int, overrides: dict) -> TransferClassifier:
    return controlled.build_model(RESULTS / source, num_classes, overrides, network)


def _source_head(network: controlled.Network, source: str) -> nn.Module:
    """The source network's own classifier (over Animal-MNIST 0-4), from its committed checkpoint."""
    return find_head(controlled.source_network(RESULTS / source, network))[1]


def _b_or_c(key: str, target: str) -> Task:
    cnn = key == "B"
    network = controlled.CNN if cnn else transformer.VIT
    source = "accuracy_controlled/source_cnn_8ep.pt" if cnn else "accuracy_transformer/source_vit_60ep.pt"
    num_classes = 10 if target == "far" else len(controlled.CLOSE_CLASSES)
    return Task(
        key=f"{key}-{target}",
        title=(f"{'SmallCNN' if cnn else 'small ViT'} pre-trained on Animal-MNIST 0-4 -> "
               f"{'Animal-MNIST 5-9' if target == 'close' else 'scikit-learn digits'}, 10/class, 28×28, 30 epochs"),
        data=partial(_target, target),
        model=partial(_transferred, network, source, num_classes),
        source_head=partial(_source_head, network, source),
        num_classes=num_classes, epochs=30, train_size=10 * num_classes, batch_size=16,
        lrs=(0.003, 0.01, 0.03, 0.1) if cnn else (1e-4, 3e-4, 1e-3, 3e-3),
        knob_lrs=(0.01, 0.03) if cnn else (3e-4, 1e-3),
        delta_layers=controlled.DELTA_LAYERS if cnn else transformer.DELTA_LAYERS,
        depths=(1, 2) if cnn else (1, 3),
        blocks=[f"backbone.block{i}" for i in range(1, 5)] if cnn else None,
        augment=False,
    )


# D: MiniLM (6-layer BERT, offline, sha256-pinned) built as configs/text_minilm.yaml builds it (AdamW, weight
# decay 0.01, 5 warm-up steps, cosine). 64 tokens, not the config's 128: on one CPU thread 128 tokens cost about
# twice as much per run, and the whole grid would not fit the benchmark's budget. Validation 20/class and test
# 50/class (the config's 40 and 100 would double the feature passes each run makes).
MINILM = "hf:sentence-transformers/all-MiniLM-L6-v2"
MINILM_DELTA_LAYERS = ["backbone.bert.encoder.layer.3", "backbone.bert.encoder.layer.5"]
D_MAX_LENGTH, D_VAL, D_TEST = 64, 20, 50


def _bbc(seed: int, augment: bool, per_class: int, batch_size: int) -> BBCNewsDataModule:
    del augment  # text: no augmentation
    return BBCNewsDataModule(max_length=D_MAX_LENGTH, per_class=per_class, val_per_class=D_VAL, test_per_class=D_TEST,
                             batch_size=batch_size, seed=seed)


def _minilm(overrides: dict) -> TransferClassifier:
    overrides = dict(overrides)
    lora_rank = overrides.pop("lora_rank", None)
    backbone = MINILM if lora_rank is None else _minilm_lora(lora_rank)
    return TransferClassifier(backbone, num_classes=5, pretrained=True,
                              **{"optimizer": "adamw", "weight_decay": 0.01, "warmup_steps": 5, **overrides})


def _minilm_lora(rank: int) -> nn.Module:
    """MiniLM as a peft user builds it: LoRA (alpha = 2·rank) on the attention's query and value, the new
    classifier trained in full (``modules_to_save``), the rest frozen by peft."""
    import peft
    import transformers

    net = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=5,
                                                                           use_safetensors=True)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["query", "value"],
                             modules_to_save=["classifier"])
    return peft.get_peft_model(net, config).train()  # from_pretrained returns eval mode: dropout back on


def _d(per_class: int, epochs: int, batch_size: int) -> Task:
    return Task(
        key=f"D-{per_class}",
        title=(f"all-MiniLM-L6-v2 -> BBC News (5 topics), {per_class}/class, {D_MAX_LENGTH} tokens, {epochs} epochs, "
               f"batch {batch_size}, AdamW"),
        data=partial(_bbc, per_class=per_class, batch_size=batch_size), model=_minilm, num_classes=5,
        epochs=epochs, train_size=5 * per_class, batch_size=batch_size,
        lrs=(1e-5, 3e-5, 1e-4, 3e-4), knob_lrs=(3e-5, 1e-4),
        delta_layers=MINILM_DELTA_LAYERS,
        depths=(1, 4),  # blocks: embeddings, layers 0-5, pooler, classifier; 1 = embeddings, 4 = + layers 0-2
        augment=False,
        # the head reads BERT's pooler ([CLS] through dense + tanh); sentence-transformers trained the mean of the
        # last layer's tokens, so the probe on that mean (pad tokens excluded) is the baseline the issue measured
        mean_pooled_layer="backbone.bert.encoder.layer.5",
        tokens=D_MAX_LENGTH,
        lora=True,
    )


TASKS: dict[str, Task] = {
    "A": Task("A", "ImageNet EfficientNet-Lite0 -> Animal-MNIST, 10/class, 64×64, 15 epochs",
              data=partial(_animal, per_class=10, size=64, val=30, test=200), model=_lite0, num_classes=10,
              epochs=15, train_size=100, batch_size=32, lrs=(0.003, 0.01, 0.03, 0.1), knob_lrs=(0.01, 0.03),
              delta_layers=accuracy.DELTA_LAYERS, depths=(3, 6),
              source_head=partial(PretrainedHead, "efficientnet_lite0")),
    "quick": Task("quick", "smoke run: Lite0, 2/class, 32×32, 1 epoch",
                  data=partial(_animal, per_class=2, size=32, val=2, test=5), model=_lite0, num_classes=10,
                  epochs=1, train_size=20, batch_size=32, lrs=(0.003, 0.01, 0.03, 0.1), knob_lrs=(0.01, 0.03),
                  delta_layers=accuracy.DELTA_LAYERS, depths=(3, 6),
                  source_head=partial(PretrainedHead, "efficientnet_lite0")),
    **{f"{k}-{t}": _b_or_c(k, t) for k in ("B", "C") for t in ("close", "far")},
    "D-8": _d(8, epochs=8, batch_size=8),
    "D-50": _d(50, epochs=3, batch_size=16),
}
