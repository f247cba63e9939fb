"""Model anatomy: the one place that knows how models are built.

Two contracts, used by every callback of the library:

* :func:`find_head` returns the module that produces the logits (the new, task-specific layer).
* :func:`list_blocks` returns meaningful blocks (stem, stages or transformer blocks, head last) in
  forward order, such that every parameter of the model belongs to exactly one block.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

__all__ = ["AnatomyError", "BlockGroup", "find_head", "final_linear", "list_blocks", "resolve_module"]


class AnatomyError(ValueError):
    """A model's structure does not fit what was asked of it (unknown name, uncovered parameter, ...)."""


# Attribute names under which known model families keep their classifier, most specific first.
_HEAD_ATTRIBUTES = ("heads.head", "head.fc", "_fc", "fc", "classifier", "head", "last_linear")


def _candidates(model: nn.Module, wrong: str, limit: int = 12) -> str:
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
            f"Unknown {what} {name!r} in {type(model).__name__}. Candidates: {_candidates(model, name)}. "
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


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise AnatomyError(f"{type(module).__name__} is not a submodule of {type(model).__name__}.")


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
        if isinstance(clf, nn.Module) and any(True for _ in clf.parameters()):
            return _name_of(model, clf)
    return None


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """Find the module that produces the logits.

    Args:
        model: Any ``nn.Module`` (a torchvision or timm classifier, EfficientNet-Lite, a LightningModule
            holding one, or a custom model).
        name: Dotted module name of the head. An explicit name always wins; an unknown one raises an
            error that lists candidate names.

    Returns:
        ``(name, module)``. For containers such as torchvision's ``classifier`` Sequential, the last
        layer holding a weight inside it (``classifier.1`` for EfficientNet, ``classifier.3`` for
        MobileNetV3).

    Example::

        >>> import torchvision
        >>> find_head(torchvision.models.resnet18(weights=None))[0]
        'fc'
    """
    if name is not None:
        return name, resolve_module(model, name, "head")
    timm_name = _timm_head(model)
    if timm_name is not None:
        return _refine(model, timm_name)
    # a LightningModule (or any wrapper) whose single child with parameters is the network
    children = [(n, c) for n, c in model.named_children() if any(True for _ in c.parameters())]
    for attr in _HEAD_ATTRIBUTES:
        try:
            sub = model.get_submodule(attr)
        except AttributeError:
            continue
        if isinstance(sub, nn.Module) and any(True for _ in sub.parameters()):
            return _refine(model, attr)
    if len(children) == 1 and len(list(model.parameters(recurse=False))) == 0:
        child_name, child = children[0]
        sub_name, sub = find_head(child)
        return f"{child_name}.{sub_name}", sub
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise AnatomyError(
            f"Could not find a head in {type(model).__name__}: no known classifier attribute "
            f"({', '.join(_HEAD_ATTRIBUTES)}) and no nn.Linear. Pass head='<dotted module name>'."
        )
    return linears[-1]


def _refine(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Descend from a classifier container to the layer that produces the logits."""
    module = model.get_submodule(name)
    layer = final_linear(module)
    return (name if layer is module else _name_of(model, layer)), layer


class BlockGroup(nn.Module):
    """A block made of several modules and loose parameters of a model (no copies: references).

    ``parameters()`` yields exactly the block's parameters and ``modules()`` its modules, so code that
    freezes a block or puts its BatchNorm layers in eval mode treats it like any other module.
    """

    def __init__(self, modules: Sequence[nn.Module], params: Sequence[nn.Parameter], names: Sequence[str]):
        super().__init__()
        self.members = nn.ModuleList(modules)
        self.loose = nn.ParameterList(params)
        self.names = list(names)

    def forward(self, *args, **kwargs):  # pragma: no cover - a block group is never called
        raise RuntimeError("A BlockGroup only groups existing modules of a model; it has no forward.")


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


def _timm_layout(model: nn.Module) -> list[tuple[str, list[str]]] | None:
    if not hasattr(model, "group_matcher"):
        return None
    try:
        from timm.models import group_parameters
    except ImportError:  # pragma: no cover - timm-like model without timm
        return None
    groups = group_parameters(model, model.group_matcher(coarse=True))
    layout = []
    for i, (_, names) in enumerate(sorted(groups.items())):
        prefix = _common_prefix(names)
        layout.append((prefix if prefix and i else ("stem" if i == 0 else f"group{i}"), list(names)))
    return layout


def _layout(model: nn.Module) -> list[tuple[str, object]] | None:
    return _timm_layout(model) or _lite_layout(model) or _torchvision_layout(model)


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    prefix: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _generic_layout(model: nn.Module) -> list[tuple[str, str]]:
    """Top-level children in registration order, Sequential/ModuleList children expanded."""
    layout: list[tuple[str, str]] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            layout += [(f"{name}.{i}", rf"{re.escape(name)}\.{re.escape(i)}") for i, _ in child.named_children()]
        else:
            layout.append((name, rf"{re.escape(name)}"))
    return layout


def _match(entry: str, param_name: str) -> bool:
    if param_name == entry or param_name.startswith(entry + "."):
        return True
    try:
        return re.match(rf"(?:{entry})(?:\.|$)", param_name) is not None
    except re.error:
        return False


def list_blocks(
    model: nn.Module, blocks: Sequence[str] | None = None, head: str | None = None
) -> list[tuple[str, nn.Module]]:
    """List a model's blocks in forward order, the head last.

    Args:
        model: The network (or a module whose only parametrized child is the network).
        blocks: Optional explicit blocks, in forward order: each a dotted module name or a regex matched
            against the start of parameter names. The head is appended when not listed.
        head: Explicit head name (see :func:`find_head`).

    Returns:
        ``[(name, module), ...]``: a real submodule when a block is one module, else a
        :class:`BlockGroup` of references. Every parameter belongs to exactly one block.

    Example::

        >>> import torchvision
        >>> [n for n, _ in list_blocks(torchvision.models.resnet18(weights=None))]
        ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    """
    head_name, head_module = find_head(model, head)
    head_ids = {id(p) for p in head_module.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]

    if blocks is not None:
        layout: list[tuple[str, object]] = [(b, b) for b in blocks if b != head_name]
        prefix = ""
    else:
        inner, prefix = _unwrap(model)
        layout = [(prefix + n, r) for n, r in (_layout(inner) or _generic_layout(inner))]

    assigned: dict[str, list[str]] = {name: [] for name, _ in layout}
    unmatched: list[str] = []
    for pname, _ in named:
        local = pname[len(prefix):] if prefix and pname.startswith(prefix) else pname
        for bname, rule in layout:
            if (local in rule) if isinstance(rule, list) else _match(rule, local):
                assigned[bname].append(pname)
                break
        else:
            unmatched.append(pname)

    if blocks is not None:
        empty = [b for b, names in assigned.items() if not names]
        if empty:
            raise AnatomyError(
                f"Block(s) {empty} match no parameter of {type(model).__name__}. "
                f"Candidates: {_candidates(model, empty[0])}."
            )
        if unmatched:
            raise AnatomyError(
                f"{len(unmatched)} parameter(s) belong to no listed block, e.g. {unmatched[:5]}. Every "
                "parameter must belong to exactly one block: add a block (name or regex) that covers them."
            )
    elif unmatched:
        # root-level parameters (e.g. a class token) and stragglers join the first block
        first = next(iter(assigned))
        assigned[first] = unmatched + assigned[first]

    params = dict(model.named_parameters())
    result = [(name, _as_module(model, names, params)) for name, names in assigned.items() if names]
    result.append((head_name, head_module))
    return result


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Descend through wrappers (a LightningModule holding one network) to the network."""
    prefix = ""
    while _layout(model) is None:
        children = [(n, c) for n, c in model.named_children() if any(True for _ in c.parameters())]
        if len(children) != 1 or list(model.parameters(recurse=False)):
            break
        name, model = children[0]
        prefix += name + "."
    return model, prefix


def _as_module(model: nn.Module, names: list[str], params: dict[str, nn.Parameter]) -> nn.Module:
    """The block as one real submodule when its parameters are exactly one module's, else a group."""
    owned = set(names)
    prefix = _common_prefix(names)
    try:
        candidate = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        candidate = None
    if candidate is not None and candidate is not model:
        cand_names = {f"{prefix}.{n}" for n, _ in candidate.named_parameters()}
        if cand_names == owned:
            return candidate
    # maximal modules all of whose parameters are in the block, plus loose parameters
    modules: list[nn.Module] = []
    covered: set[str] = set()
    for mname, module in model.named_modules():
        if not mname or any(mname == c or mname.startswith(c + ".") for c in covered):
            continue
        mparams = {f"{mname}.{n}" for n, _ in module.named_parameters()}
        if mparams and mparams <= owned:
            modules.append(module)
            covered.add(mname)
    in_modules = {n for n in owned if any(n.startswith(c + ".") for c in covered)}
    loose = [params[n] for n in names if n not in in_modules]
    return BlockGroup(modules, loose, names)
