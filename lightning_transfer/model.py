"""Backbone factory and :class:`TransferClassifier`, a LightningModule for fine-tuning classifiers."""

from __future__ import annotations

import difflib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_transfer.anatomy import find_head
from lightning_transfer.assets import efficientnet_lite0_weights
from lightning_transfer.optim import build_param_groups

__all__ = ["TransferClassifier", "build_backbone", "replace_head"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KNOWN_BACKBONES = "'efficientnet_lite0' (offline ImageNet weights), 'torchvision:<name>', 'timm:<name>'"


def replace_head(model: nn.Module, num_classes: int, head: str | None = None) -> nn.Module:
    """Replace the layer found by :func:`find_head` with a freshly initialized one for ``num_classes``."""
    name, layer = find_head(model, head)
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    elif isinstance(layer, nn.Conv2d):  # SqueezeNet-style convolutional classifier
        new = nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, layer.stride, layer.padding)
    else:
        raise TypeError(f"Cannot replace a head of type {type(layer).__name__}; build the model with num_classes.")
    model.set_submodule(name, new)
    return model


def _torchvision_backbone(name: str, pretrained: bool, weights: str | None) -> tuple[nn.Module, tuple, tuple]:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=8, cutoff=0.3) or known[:20]
        raise ValueError(f"Unknown torchvision model {name!r}. Close names: {', '.join(close)}.")
    if weights is None and pretrained:
        weights = "DEFAULT"  # downloads on first use; pass pretrained=false for an offline random init
    model = torchvision.models.get_model(name, weights=weights if pretrained else None)
    if pretrained and weights is not None:
        transforms = torchvision.models.get_model_weights(name)[weights].transforms()
        return model, tuple(transforms.mean), tuple(transforms.std)
    return model, IMAGENET_MEAN, IMAGENET_STD


def _timm_backbone(name: str, pretrained: bool) -> tuple[nn.Module, tuple, tuple]:
    try:
        import timm
    except ImportError:
        raise ImportError(f"Backbone 'timm:{name}' needs timm: pip install timm") from None
    model = timm.create_model(name, pretrained=pretrained)
    cfg = model.pretrained_cfg
    return model, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def _lite0_backbone(pretrained: bool) -> tuple[nn.Module, tuple, tuple]:
    from efficientnet_lite_pytorch import EfficientNet

    # batch_norm_momentum is TF's convention (1 - PyTorch momentum); its default 0.99 all but freezes
    # the BatchNorm statistics during fine-tuning.
    model = EfficientNet.from_name("efficientnet-lite0", batch_norm_momentum=0.9)
    if pretrained:
        state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def build_backbone(
    name: str, num_classes: int | None, pretrained: bool = True, weights: str | None = None
) -> tuple[nn.Module, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Build a pre-trained classifier and give it a new head.

    Args:
        name: ``"efficientnet_lite0"`` (ImageNet weights from an installed package, offline),
            ``"torchvision:<name>"`` or ``"timm:<name>"``.
        num_classes: Size of the new head; ``None`` keeps the source (e.g. ImageNet) head.
        pretrained: Load pre-trained weights (``False``: random init, e.g. the from-scratch baseline).
        weights: torchvision weights enum name (``"IMAGENET1K_V1"``); default ``"DEFAULT"`` when
            ``pretrained``. torchvision and timm weights download on first use.

    Returns:
        ``(model, (mean, std))``, the input normalization the weights expect.

    Example::

        >>> model, (mean, std) = build_backbone("efficientnet_lite0", num_classes=10)
        >>> model._fc.out_features, mean
        (10, (0.5, 0.5, 0.5))
    """
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    kind, _, rest = name.partition(":")
    if name == "efficientnet_lite0":
        model, mean, std = _lite0_backbone(pretrained)
    elif kind == "torchvision" and rest:
        model, mean, std = _torchvision_backbone(rest, pretrained, weights)
    elif kind == "timm" and rest:
        model, mean, std = _timm_backbone(rest, pretrained)
    else:
        raise ValueError(f"Unknown backbone {name!r}. Known: {KNOWN_BACKBONES}.")
    if num_classes is not None:
        replace_head(model, num_classes)
    return model, (mean, std)


class TransferClassifier(LightningModule):
    """Fine-tune a pre-trained image classifier on a new label set.

    The input normalization of the backbone is applied inside ``forward``, so data modules hand over
    images in ``[0, 1]`` and can never disagree with the weights.

    Args:
        backbone: A name for :func:`build_backbone`, or your own pre-trained network as a module: its
            head (see :func:`~lightning_transfer.find_head`) is replaced by a new one for
            ``num_classes`` and inputs reach it as the data module gives them (no normalization);
            ``pretrained`` and ``weights`` then do not apply.
        num_classes: Number of target classes (at least 2).
        pretrained: ``False`` trains from scratch (the baseline every transfer method should beat).
        weights: torchvision weights enum name.
        optimizer: ``"sgd"`` (momentum, the papers' baseline) or ``"adamw"``.
        lr: Learning rate of the head (and of everything without ``layer_decay``).
        momentum: SGD momentum.
        weight_decay: Weight decay on weights (norm and bias tensors get none).
        layer_decay: Layer-wise LR decay ξ: block ``d`` steps below the head trains at ``lr·ξ^d``.
        scheduler: ``"cosine"`` (per step, to zero over the run) or ``"constant"``.
        warmup_steps: Linear warm-up steps before the cosine decay.
        label_smoothing: Cross-entropy label smoothing.

    Example::

        model = TransferClassifier("efficientnet_lite0", num_classes=10, lr=0.01)
        trainer = Trainer(max_epochs=10, callbacks=[L2SP(alpha=0.01)])
    """

    def __init__(
        self,
        backbone: str | nn.Module = "efficientnet_lite0",
        num_classes: int = 10,
        pretrained: bool = True,
        weights: str | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        layer_decay: float | None = None,
        scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if isinstance(backbone, nn.Module):  # the user's own pre-trained network: new head, no normalization
            self.save_hyperparameters(ignore=["backbone"])
            self.backbone, (mean, std) = replace_head(backbone, num_classes), ((0.0,), (1.0,))
        else:
            self.save_hyperparameters()
            self.backbone, (mean, std) = build_backbone(backbone, num_classes, pretrained, weights)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)

    def _step(self, batch, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "train")
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        hp = self.hparams
        groups = build_param_groups(self.backbone, hp.lr, hp.weight_decay, hp.layer_decay)
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.scheduler == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
