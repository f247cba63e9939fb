"""`TransferClassifier`, a LightningModule for fine-tuning classifiers: images or text, any backbone."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_transfer.anatomy import list_blocks
from lightning_transfer.backbones import build_backbone, replace_head
from lightning_transfer.batches import batch_inputs, batch_labels, logits_of
from lightning_transfer.functional.sharding import ShardingError, fully_shard_blocks
from lightning_transfer.optim import build_param_groups

__all__ = ["TransferClassifier", "build_backbone", "replace_head"]

# hparams["backbone"] of a model built around a module: this prefix and the module's class path
_MODULE_BACKBONE = "module:"


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


class TransferClassifier(LightningModule):
    """Fine-tune a pre-trained classifier (images or text; CNN or transformer) on a new label set.

    Batches are ``(x, y)`` tuples or Hugging Face style dicts (``input_ids``, ``attention_mask``, ...,
    ``labels``; or ``pixel_values``, ``labels``): dict inputs reach the backbone as keyword arguments,
    and a ``ModelOutput`` is reduced to its logits, so ``forward`` always returns logits. A named image
    backbone gets the input normalization of its weights inside ``forward`` (data modules hand over
    images in ``[0, 1]`` and can never disagree with the weights); token ids are never normalized.

    Args:
        backbone: A name for :func:`build_backbone` (``"efficientnet_lite0"``, ``"torchvision:<name>"``,
            ``"timm:<name>"``, ``"hf:<name>"``), or your own pre-trained network as a module (a Hugging
            Face model included): its head (see :func:`~lightning_transfer.find_head`) is replaced by a
            new one for ``num_classes`` and inputs reach it as the data module gives them (no
            normalization); ``pretrained`` and ``weights`` then do not apply. Its checkpoints record the
            module's class (``hparams.backbone == "module:<class path>"``); load them with
            ``TransferClassifier.load_from_checkpoint(path, backbone=<a new instance of the network>)``.
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

        >>> import torch
        >>> model = TransferClassifier("efficientnet_lite0", num_classes=10, lr=0.01)  # offline ImageNet weights
        >>> model(torch.rand(2, 3, 64, 64)).shape  # images in [0, 1]; normalized inside
        torch.Size([2, 10])
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1000))
        >>> TransferClassifier(net, num_classes=3).backbone[2]  # your own network: its head is replaced
        Linear(in_features=8, out_features=3, bias=True)

    A Hugging Face model is given the same way (``TransferClassifier(bert, num_classes=2,
    optimizer="adamw", lr=2e-5, layer_decay=0.9)``), with batches ``{"input_ids": ..., "labels": ...}``.
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
            if "_instantiator" in self.hparams:  # built by LightningCLI: its config of the backbone rebuilds it
                self.save_hyperparameters()
            else:  # the checkpoint (and hparams.yaml) record the network it needs: loading without it says so
                recorded = _MODULE_BACKBONE + _class_path(backbone)
                self.save_hyperparameters({**self.hparams, "backbone": recorded})
            self.backbone, normalization = replace_head(backbone, num_classes), None
        else:
            if isinstance(backbone, str) and backbone.startswith(_MODULE_BACKBONE):  # from a checkpoint
                name, module = type(self).__name__, backbone[len(_MODULE_BACKBONE):]
                raise ValueError(
                    f"This checkpoint holds a {name} built around your own backbone module ({module}), which "
                    "the checkpoint cannot rebuild by itself: pass a new instance of that network, "
                    f"{name}.load_from_checkpoint(path, backbone=<your module>)."
                )
            self.save_hyperparameters()
            self.backbone, normalization = build_backbone(backbone, num_classes, pretrained, weights)
            # Hugging Face's from_pretrained returns the model in eval mode, which Lightning keeps through fit (it
            # restores each submodule's mode): the network the library builds starts in train mode, dropout on
            self.backbone.train()
        mean, std = normalization or (None, None)
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return images
        if not images.is_floating_point():
            raise TypeError(
                f"{type(self.backbone).__name__} is an image backbone and expects float images in [0, 1], but got a "
                f"{images.dtype} tensor (token ids?). Pass a text model (e.g. backbone='hf:<text model>'), or "
                "convert the images with torchvision's ToTensor / ToImage + ToDtype(torch.float32, scale=True).")
        return (images - self.mean) / self.std

    def forward(self, x: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
        """Logits for an image batch ``x`` or a dict of model inputs (``input_ids``/``pixel_values``, ...)."""
        if isinstance(x, Mapping):
            inputs = dict(x)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = self._normalize(inputs["pixel_values"])
            return logits_of(self.backbone(**inputs))
        return logits_of(self.backbone(self._normalize(x)))

    def configure_model(self) -> None:
        """Shard the model with FSDP2 under ``ModelParallelStrategy``; under any other strategy, do nothing.

        Each block of the backbone (:func:`~lightning_transfer.list_blocks`, the head included) becomes a
        ``fully_shard`` unit over the strategy's data-parallel mesh, then the whole module does (the root:
        it holds whatever no block does). The backbone itself is not wrapped, so its class, which the
        anatomy reads, stays as it was. Lightning calls this hook at setup; a second call does nothing.

        Raises:
            ShardingError: ``tensor_parallel_size > 1``: the model shards with FSDP2 only.
        """
        mesh = self.device_mesh  # set by ModelParallelStrategy only
        if mesh is None:
            return
        names = mesh.mesh_dim_names or ()
        tensor_parallel = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
        if tensor_parallel > 1:
            raise ShardingError(
                f"{type(self).__name__} shards itself with FSDP2 only (fully_shard per block over the data-parallel "
                f"mesh), not with tensor parallelism (tensor_parallel_size={tensor_parallel}). Use "
                "ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1) (see "
                "configs/fsdp2.yaml), or subclass it and override configure_model with your own parallelize plan."
            )
        fully_shard_blocks(self, [block for _, block in list_blocks(self.backbone)], mesh["data_parallel"])

    def _step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        y = batch_labels(batch)
        logits = self(batch_inputs(batch))
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        metric(logits, y)
        on_step, size = stage == "train", len(y)
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "train", batch_size=size)
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
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
