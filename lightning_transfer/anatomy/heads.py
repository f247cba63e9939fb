"""Finding a model's head: the module that produces the logits."""

from __future__ import annotations

import difflib
import warnings

from torch import nn

from lightning_transfer.anatomy.hf import hf_head
from lightning_transfer.anatomy.layouts import AnatomyError

__all__ = ["final_linear", "find_head", "name_of", "resolve_module"]

# Attribute names under which known model families keep their classifier, most specific first.
_HEAD_ATTRIBUTES = ("heads.head", "head.fc", "_fc", "fc", "classifier", "head", "last_linear")


def _close_names(model: nn.Module, wrong: str, limit: int = 12) -> str:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(wrong, names, n=limit, cutoff=0.4)
    if not close:
        close = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)][-limit:] or names[:limit]
    return ", ".join(repr(c) for c in close)


def resolve_module(model: nn.Module, name: str, what: str = "module") -> nn.Module:
    """Return ``model.get_submodule(name)`` or raise an :class:`AnatomyError` listing candidates."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise AnatomyError(
            f"Unknown {what} {name!r} in {type(model).__name__}. Candidates: {_close_names(model, name)}. "
            "Pass one of these dotted module names."
        ) from None


def final_linear(module: nn.Module) -> nn.Module:
    """The last layer of ``module`` that holds a weight (the logit layer of an MLP head)."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)):
        return module
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
    if not layers:
        raise AnatomyError(f"The head {type(module).__name__} holds no Linear or Conv layer to act on.")
    return layers[-1]


def name_of(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    for n, m in model.named_modules():
        if m is module:
            return n
    raise AnatomyError(f"{type(module).__name__} is not a submodule of {type(model).__name__}.")


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _timm_head(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str):
        name = cfg["classifier"]
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            pass
    if hasattr(model, "get_classifier") and callable(model.get_classifier):
        clf = model.get_classifier()
        if isinstance(clf, nn.Module) and _has_params(clf):
            return name_of(model, clf)
    return None


def _own_head(model: nn.Module) -> str | None:
    """The head that ``model`` itself declares (timm, Hugging Face, a known attribute), if any."""
    name = _timm_head(model) or hf_head(model)
    if name is not None:
        return name
    for attr in _HEAD_ATTRIBUTES:
        try:
            sub = model.get_submodule(attr)
        except AttributeError:
            continue
        if _has_params(sub):
            return attr
    return None


def _refine(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Descend from a classifier container to the layer that produces the logits."""
    module = model.get_submodule(name)
    layer = final_linear(module)
    return (name if layer is module else name_of(model, layer)), layer


def _head_candidates(model: nn.Module, prefix: str = "", split: bool = True) -> list[tuple[str, nn.Module]]:
    """Heads declared by ``model``, or by the networks it wraps (a student and its teacher: one each)."""
    own = _own_head(model)
    if own is not None:
        name, module = _refine(model, own)
        return [(prefix + name, module)]
    children = [(n, c) for n, c in model.named_children() if _has_params(c)]
    if len(children) == 1 and not list(model.parameters(recurse=False)):
        name, child = children[0]
        return _head_candidates(child, f"{prefix}{name}.", split)
    if split and len(children) > 1:
        return [c for name, child in children for c in _head_candidates(child, f"{prefix}{name}.", False)]
    return []


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """Find the module that produces the logits.

    Auto-detection ignores heads without trainable parameters (a frozen teacher or EMA copy held next to
    the network being trained); two networks with trainable heads are ambiguous and raise an error.

    Args:
        model: Any ``nn.Module`` (a torchvision, timm or Hugging Face classifier, EfficientNet-Lite, a
            LightningModule holding one, or a custom model).
        name: Dotted module name of the head. An explicit name always wins (with a warning when it has
            no trainable parameter); an unknown one raises an error that lists candidate names.

    Returns:
        ``(name, module)``. For containers such as torchvision's ``classifier`` Sequential, the last
        layer holding a weight inside it (``classifier.1`` for EfficientNet, ``classifier.3`` for
        MobileNetV3).

    Raises:
        AnatomyError: unknown ``name``; no head found; several trainable heads (pass ``head=``).

    Example::

        >>> import torchvision
        >>> find_head(torchvision.models.resnet18(weights=None))[0]
        'fc'
    """
    if name is not None:
        module = resolve_module(model, name, "head")
        if not _trainable(module):
            warnings.warn(
                f"The head {name!r} of {type(model).__name__} has no trainable parameter (requires_grad is "
                "False everywhere): head callbacks will act on a frozen module. If it belongs to a frozen "
                "teacher or EMA copy, pass head='<the trained network's head>'.",
                stacklevel=2,
            )
        return name, module
    candidates = _head_candidates(model)
    if candidates:
        pool = [c for c in candidates if _trainable(c[1])] or candidates
        if len(pool) == 1:
            return pool[0]
        raise AnatomyError(
            f"{type(model).__name__} holds several networks with a {'trainable ' if _trainable(pool[0][1]) else ''}"
            f"head: {', '.join(repr(n) for n, _ in pool)}. Pass head='<dotted module name>' to say which one "
            "is trained (freeze a teacher or EMA copy with requires_grad_(False) to have it ignored)."
        )
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise AnatomyError(
            f"Could not find a head in {type(model).__name__}: no known classifier attribute "
            f"({', '.join(_HEAD_ATTRIBUTES)}) and no nn.Linear. Pass head='<dotted module name>'."
        )
    trainable = [(n, m) for n, m in linears if _trainable(m)]
    if trainable and trainable[-1] is not linears[-1]:
        warnings.warn(
            f"The last Linear of {type(model).__name__}, {linears[-1][0]!r}, is frozen; taking "
            f"{trainable[-1][0]!r}, the last trainable one, as the head. Pass head='<dotted module name>' "
            "to choose.",
            stacklevel=2,
        )
    return (trainable or linears)[-1]
