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

from lightning_transfer.anatomy.layouts import AnatomyError, common_prefix, generic_layout, known_layout

__all__ = ["AnatomyError", "BlockGroup", "find_head", "final_linear", "list_blocks", "resolve_module"]


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
        layout = [(prefix + n, r) for n, r in (known_layout(inner) or generic_layout(inner))]

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
    while known_layout(model) is None:
        children = [(n, c) for n, c in model.named_children() if any(True for _ in c.parameters())]
        if len(children) != 1 or list(model.parameters(recurse=False)):
            break
        name, model = children[0]
        prefix += name + "."
    return model, prefix


def _as_module(model: nn.Module, names: list[str], params: dict[str, nn.Parameter]) -> nn.Module:
    """The block as one real submodule when its parameters are exactly one module's, else a group."""
    owned = set(names)
    prefix = common_prefix(names)
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
