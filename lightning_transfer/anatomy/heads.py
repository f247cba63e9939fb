"""Finding a model's head: the module that produces the logits."""

from __future__ import annotations

import difflib
import warnings

from torch import nn

from lightning_transfer.anatomy.adapters import active_copy, is_adapter_wrapper, unwrap_adapters
from lightning_transfer.anatomy.compiled import inner_module, plain_name
from lightning_transfer.anatomy.hf import hf_head
from lightning_transfer.anatomy.layouts import AnatomyError

__all__ = ["final_linear", "find_head", "name_of", "resolve_module"]

# Attribute names under which known model families keep their classifier, most specific first.
_HEAD_ATTRIBUTES = ("heads.head", "head.fc", "_fc", "fc", "classifier", "head", "last_linear")


def _close_names(model: nn.Module, wrong: str, limit: int = 12) -> str:
    modules = list({plain_name(n): m for n, m in model.named_modules() if n}.items())  # compiled: plain names
    names = [n for n, _ in modules]
    close = difflib.get_close_matches(plain_name(wrong), names, n=limit, cutoff=0.4)
    if not close:
        close = [n for n, m in modules if isinstance(m, nn.Linear)][-limit:] or names[:limit]
    return ", ".join(repr(c) for c in close)


def resolve_module(model: nn.Module, name: str, what: str = "module") -> nn.Module:
    """Return ``model.get_submodule(name)`` or raise an :class:`AnatomyError` listing candidates.

    Through a ``torch.compile``-d submodule the plain name (``net.layer1``) and the wrapped one
    (``net._orig_mod.layer1``) both resolve, to the same layer.
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise AnatomyError(
            f"Unknown {what} {name!r} in {type(model).__name__}. Candidates: {_close_names(model, name)}. "
            "Pass one of these dotted module names."
        ) from None


# Layers that can produce logits: a Linear, or the conv of a 1x1-conv head (SqueezeNet).
_LOGIT_LAYERS = (nn.Linear, nn.Conv2d, nn.Conv1d)


def final_linear(module: nn.Module) -> nn.Module:
    """The last layer of ``module`` that holds a weight (the logit layer of an MLP head)."""
    if isinstance(module, _LOGIT_LAYERS):
        return module
    layers = [m for m in module.modules() if isinstance(m, _LOGIT_LAYERS)]
    if not layers:
        raise AnatomyError(f"The head {type(module).__name__} holds no Linear or Conv layer to act on.")
    return layers[-1]


def name_of(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model`` (its plain name when it sits in a compiled submodule)."""
    for n, m in model.named_modules():
        if m is module:
            return plain_name(n)
    raise AnatomyError(f"{type(module).__name__} is not a submodule of {type(model).__name__}.")


def _last_layer(module: nn.Module) -> nn.Module | None:
    """The last layer holding parameters in ``module`` (children in registration order), or ``None``.

    A wrapper of one layer (peft's LoRA layers: ``base_layer``) counts as that layer.
    """
    if isinstance(module, _LOGIT_LAYERS):
        return module
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):
        return _last_layer(base)
    for child in reversed(list(module.children())):
        if _has_params(child):
            return _last_layer(child)
    return module if any(True for _ in module.parameters(recurse=False)) else None


def _produces_logits(layer: nn.Module | None) -> bool:
    """A Linear or 1x1 conv, or a layer of the user's own class with a weight matrix (cosine classifier)."""
    if isinstance(layer, nn.Linear):
        return True
    if isinstance(layer, _LOGIT_LAYERS):  # a conv head: 1x1, a Linear applied at every position
        return all(k == 1 for k in layer.kernel_size)
    own = type(layer).__module__.startswith("torch.") or layer is None
    return not own and any(p.dim() >= 2 for p in layer.parameters(recurse=False))


def _check_head_kind(model: nn.Module, name: str, module: nn.Module) -> None:
    """Refuse an explicit head that cannot produce logits (its last layer must be a Linear or a 1x1 conv)
    or that is the whole network."""
    last = _last_layer(module)
    held = {id(p) for p in module.parameters()}  # all of them, frozen or not (a linear probe freezes the rest)
    whole = last is not module and held >= {id(p) for p in model.parameters()}
    if _produces_logits(last) and not whole:
        return
    what = type(module).__name__
    if whole:
        what += ", the whole network: it holds every parameter"
    elif last is None:
        what += ", with no parameter"
    elif last is not module:
        what += f" ending in {type(last).__name__}"
    if isinstance(last, _LOGIT_LAYERS) and not whole:
        what += f" with a {'x'.join(map(str, last.kernel_size))} kernel"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            candidates = f"{find_head(model)[0]!r} (the auto-detected head: omit head= to use it)"
        except AnatomyError:
            layers = [n for n, m in model.named_modules() if n and isinstance(m, _LOGIT_LAYERS)][-5:]
            candidates = ", ".join(repr(n) for n in layers) or "none (no Linear or conv layer)"
    raise AnatomyError(
        f"head={name!r} is not a classifier layer ({what}): the head's last layer must be the Linear (or the "
        f"1x1 conv of a conv head) that produces the logits. Candidates: {candidates}."
    )


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
    """Descend from a classifier container to the layer that produces the logits (in a peft
    ``modules_to_save`` wrapper: in its trained copy)."""
    module = model.get_submodule(name)
    layer = final_linear(active_copy(module))
    return (name if layer is module else name_of(model, layer)), layer


def _head_candidates(model: nn.Module, prefix: str = "", split: bool = True) -> list[tuple[str, nn.Module]]:
    """Heads declared by ``model``, or by the networks it wraps (a student and its teacher: one each)."""
    model = inner_module(model)  # a compiled network declares its head through the network it wraps
    if is_adapter_wrapper(model):  # so does a peft model, under the names of its wrapper
        inner, more = unwrap_adapters(model)
        return _head_candidates(inner, prefix + more, split)
    own = _own_head(model)
    if own is not None:
        name, module = _refine(model, own)
        return [(prefix + name, module)]
    children = _distinct_children(model)
    if len(children) == 1 and not list(model.parameters(recurse=False)):
        name, child = children[0]
        return _head_candidates(child, f"{prefix}{name}.", split)
    if split and len(children) > 1:
        return [c for name, child in children for c in _head_candidates(child, f"{prefix}{name}.", False)]
    return []


def _distinct_children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children holding parameters, each network once: an alias of an earlier child (``self.fwd =
    torch.compile(self.net)``: the same parameters under a second name) is left out."""
    seen: set[int] = set()
    children = []
    for n, c in model.named_children():
        if _has_params(c) and id(inner_module(c)) not in seen:
            seen.add(id(inner_module(c)))
            children.append((n, c))
    return children


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """Find the module that produces the logits.

    Auto-detection ignores heads without trainable parameters (a frozen teacher or EMA copy held next to
    the network being trained); two networks with trainable heads are ambiguous and raise an error.

    Args:
        model: Any ``nn.Module`` (a torchvision, timm or Hugging Face classifier, EfficientNet-Lite, a
            LightningModule holding one, or a custom model).
        name: Dotted module name of the head. An explicit name always wins (with a warning when it has
            no trainable parameter); an unknown one raises an error that lists candidate names, and so
            does a module of the wrong kind: the head's last layer holding parameters must be a Linear
            (or the 1x1 conv of a conv head), as in an MLP head ending in its logit layer.

    Returns:
        ``(name, module)``, the name as the uncompiled model spells it (``net.fc`` for a
        ``torch.compile``-d ``net``, whose parameters are ``net._orig_mod.fc.*``). In a peft model, the
        trained copy of a ``modules_to_save`` head (``base_model.model.classifier.modules_to_save.default``,
        also when ``name`` names the wrapper), never its frozen ``original_module``. For containers
        such as torchvision's ``classifier`` Sequential, the last layer holding a weight inside it
        (``classifier.1`` for EfficientNet, ``classifier.3`` for MobileNetV3).

    Raises:
        AnatomyError: unknown ``name``; a ``name`` that is no classifier layer (a BatchNorm, a backbone
            block); no head found; several trainable heads (pass ``head=``).

    Example::

        >>> import torchvision
        >>> find_head(torchvision.models.resnet18(weights=None))[0]
        'fc'
    """
    if name is not None:
        module = resolve_module(model, name, "head")
        if active_copy(module) is not module:  # a peft modules_to_save wrapper: the copy it trains
            module = active_copy(module)
            name = name_of(model, module)
        _check_head_kind(model, name, module)
        if not _trainable(module):
            warnings.warn(
                f"The head {name!r} of {type(model).__name__} has no trainable parameter (requires_grad is "
                "False everywhere): head callbacks will act on a frozen module. If it belongs to a frozen "
                "teacher or EMA copy, pass head='<the trained network's head>'.",
                stacklevel=2,
            )
        return plain_name(name), module
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
    linears = [(plain_name(n), m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise AnatomyError(
            f"Could not find a head in {type(model).__name__}: no known classifier attribute "
            f"({', '.join(_HEAD_ATTRIBUTES)}) and no nn.Linear. Pass head='<dotted module name>'."
        )
    trainable = [(n, m) for n, m in linears if _trainable(m)]
    if trainable and trainable[-1][1] is not linears[-1][1]:
        warnings.warn(
            f"The last Linear of {type(model).__name__}, {linears[-1][0]!r}, is frozen; taking "
            f"{trainable[-1][0]!r}, the last trainable one, as the head. Pass head='<dotted module name>' "
            "to choose.",
            stacklevel=2,
        )
    return (trainable or linears)[-1]
