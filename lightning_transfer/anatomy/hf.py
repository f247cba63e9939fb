"""Hugging Face ``transformers`` models: the head and the block layout, from what the model exposes.

A ``PreTrainedModel`` with a task head keeps its backbone under ``base_model_prefix`` (``bert``,
``transformer``, ``model``, ``vit``, ...) and its task layers as further children (``classifier``,
``score``). The backbone holds one ``ModuleList`` of layers (``encoder.layer``, ``h``, ``layers``): the
blocks are what runs before it (the embeddings), each layer, what runs after it (final norm, pooler),
then any task layers before the logit layer. No per-family names are needed.
"""

from __future__ import annotations

from torch import nn

__all__ = ["hf_base", "hf_head", "hf_layout"]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def hf_base(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, backbone)`` of a Hugging Face model with a task head, else ``None``."""
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix or not hasattr(model, "config"):
        return None
    base = getattr(model, prefix, None)
    if not isinstance(base, nn.Module) or base is model:
        return None
    return prefix, base


def hf_head(model: nn.Module) -> str | None:
    """The last parametrized child registered outside the backbone (``classifier``, ``score``, ...)."""
    found = hf_base(model)
    if found is None:
        return None
    prefix, _ = found
    others = [n for n, c in model.named_children() if n != prefix and _has_params(c)]
    return others[-1] if others else None


def _layers(base: nn.Module) -> str | None:
    """Name (inside the backbone) of the ``ModuleList`` holding the most parameters: the layer stack."""
    best, best_size = None, 0
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    return best


def hf_layout(model: nn.Module) -> list[tuple[str, list[str]]] | None:
    """Blocks of a Hugging Face model as ``(placeholder, parameter names)``, in forward order."""
    found = hf_base(model)
    if found is None:
        return None
    prefix, base = found
    stack = _layers(base)
    if stack is None:
        return None
    stack_prefix = f"{prefix}.{stack}." if stack else f"{prefix}."
    before: list[str] = []
    layers: dict[str, list[str]] = {}
    after: list[str] = []
    outside: list[str] = []
    for name, _ in model.named_parameters():
        if not name.startswith(prefix + "."):
            outside.append(name)  # task layers (the head is taken out by list_blocks)
        elif name.startswith(stack_prefix):
            layers.setdefault(name[len(stack_prefix):].split(".", 1)[0], []).append(name)
        elif layers:
            after.append(name)
        else:
            before.append(name)
    layout = [("embeddings", before)] + [(f"layer{i}", names) for i, names in layers.items()]
    return layout + [("final", after), ("task", outside)]
