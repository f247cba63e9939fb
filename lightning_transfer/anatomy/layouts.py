"""Known block layouts of model families (torchvision, timm, EfficientNet-Lite, Hugging Face) and the
generic fallback.

A layout is a list of ``(placeholder, rule)`` in forward order; a rule is a regex matched against the
start of parameter names (up to a ``.`` boundary) or, for timm and Hugging Face, the list of parameter
names itself. Placeholders only keep blocks apart: :func:`~lightning_transfer.list_blocks` names each
block after the real modules (and loose parameters) it ends up holding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from lightning_transfer.anatomy.adapters import is_adapter_wrapper
from lightning_transfer.anatomy.compiled import inner_module, is_wrapper
from lightning_transfer.anatomy.hf import hf_layout

__all__ = ["AnatomyError", "common_prefix", "generic_layout", "known_layout", "timm_layer_ids"]


class AnatomyError(ValueError):
    """A model's structure does not fit what was asked of it (unknown name, uncovered parameter, ...)."""


def _torchvision_layout(model: nn.Module) -> list[tuple[str, str]] | None:
    """(block name, regex over parameter names) for known torchvision layouts, in forward order."""
    kind = type(model).__name__
    if kind in ("ResNet",):
        return [("stem", r"(conv1|bn1)")] + [(f"layer{i}", rf"layer{i}") for i in range(1, 5)]
    if kind in ("EfficientNet", "MobileNetV2", "MobileNetV3", "ConvNeXt") and hasattr(model, "features"):
        return [(f"features.{i}", rf"features\.{i}") for i in range(len(model.features))] + [
            ("classifier", r"classifier")
        ]
    if kind == "VisionTransformer" and hasattr(model, "encoder"):
        n = len(model.encoder.layers)
        return (
            [("stem", r"class_token|conv_proj|encoder\.pos_embedding")]
            + [(f"encoder.layers.{i}", rf"encoder\.layers\.encoder_layer_{i}") for i in range(n)]
            + [("encoder.ln", r"encoder\.ln")]
        )
    if kind == "SwinTransformer" and hasattr(model, "features"):
        return [(f"features.{i}", rf"features\.{i}") for i in range(len(model.features))] + [
            ("norm", r"norm")
        ]
    if kind in ("GoogLeNet", "Inception3"):
        aux = [n for n in ("aux1", "aux2", "AuxLogits") if getattr(model, n, None) is not None]
        if aux:
            raise AnatomyError(
                f"{kind} has auxiliary heads ({', '.join(aux)}) that are registered after later stages "
                "and run only in training, so registration order is not forward order. Build it with "
                "aux_logits=False, or pass blocks=[...] explicitly."
            )
    return None


def _lite_layout(model: nn.Module) -> list[tuple[str, str]] | None:
    """EfficientNet(-Lite) of the ``efficientnet_lite_pytorch`` package: stem, 7 stages, conv head."""
    if not (hasattr(model, "_blocks") and hasattr(model, "_conv_stem") and hasattr(model, "_fc")):
        return None
    stages: list[list[int]] = []
    previous = None
    for i, block in enumerate(model._blocks):
        out = block._block_args.output_filters
        if out != previous:
            stages.append([])
        stages[-1].append(i)
        previous = out
    layout = [("stem", r"(_conv_stem|_bn0)")]
    layout += [(f"stage{k}", rf"_blocks\.({'|'.join(map(str, idx))})") for k, idx in enumerate(stages, 1)]
    return layout + [("conv_head", r"(_conv_head|_bn1)")]


def _timm_layout(model: nn.Module, fine: bool = False) -> list[tuple[str, list[str]]] | None:
    """timm's own grouping (``group_matcher``): stages (coarse) or the finer groups its layer decay uses."""
    if not hasattr(model, "group_matcher"):
        return None
    try:
        from timm.models import group_parameters
    except ImportError:  # pragma: no cover - timm-like model without timm
        return None
    groups = group_parameters(model, model.group_matcher(coarse=not fine))
    return [(f"group{i}", list(names)) for i, (_, names) in enumerate(sorted(groups.items()))]


def timm_layer_ids(model: nn.Module) -> dict[str, int] | None:
    """timm's layer id of each parameter (what ``param_groups_layer_decay`` scales by); ``None`` off timm.

    Parameters no group matches (the head, and e.g. ``fc_norm``) share the last id, as in timm.
    """
    if not hasattr(model, "group_matcher") or is_wrapper(model):  # compiled: the ids are the inner model's
        return None
    from timm.models import group_parameters

    ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    last = max(ids.values(), default=0)
    return {n: ids.get(n, last) for n, _ in model.named_parameters()}


def known_layout(model: nn.Module, fine: bool = False) -> list[tuple[str, object]] | None:
    if is_wrapper(model) or is_adapter_wrapper(model):  # they forward attribute reads: the layout is the inner
        return None  # network's, under other parameter names
    return _timm_layout(model, fine) or _lite_layout(model) or hf_layout(model) or _torchvision_layout(model)


def common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    prefix: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def generic_layout(model: nn.Module) -> list[tuple[str, str]]:
    """Top-level children in registration order, Sequential/ModuleList children expanded."""
    layout: list[tuple[str, str]] = []
    for name, child in model.named_children():
        child = inner_module(child)  # a compiled child: its plain names (they match its parameters too)
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            layout += [(f"{name}.{i}", rf"{re.escape(name)}\.{re.escape(i)}") for i, _ in child.named_children()]
        else:
            layout.append((name, rf"{re.escape(name)}"))
    return layout
