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

from lightning_transfer.anatomy.adapters import (
    frozen_originals,
    is_adapter_wrapper,
    lora_factors,
    unwrap_adapters,
)
from lightning_transfer.anatomy.compiled import is_compiled, plain_name, relative_name
from lightning_transfer.anatomy.heads import _distinct_children, final_linear, find_head, resolve_module
from lightning_transfer.anatomy.layouts import (
    AnatomyError,
    common_prefix,
    generic_layout,
    known_layout,
    timm_layer_ids,
)

__all__ = ["AnatomyError", "BlockGroup", "block_output_module", "find_head", "final_linear", "is_compiled",
           "list_blocks", "lora_factors", "plain_name", "relative_name", "resolve_module", "timm_layer_ids"]


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


def block_output_module(block: nn.Module) -> nn.Module:
    """The module whose output is the block's output: the block, or the last member of a :class:`BlockGroup`."""
    return block.members[-1] if isinstance(block, BlockGroup) and len(block.members) else block


def _match(entry: str, param_name: str) -> bool:
    plain = plain_name(param_name)
    if plain != param_name and _match(entry, plain):  # in a compiled network: its plain name matches too
        return True
    if param_name == entry or param_name.startswith(entry + "."):
        return True
    try:
        return re.match(rf"(?:{entry})(?:\.|$)", param_name) is not None
    except re.error:
        return False


def list_blocks(
    model: nn.Module, blocks: Sequence[str] | None = None, head: str | None = None, fine: bool = False
) -> list[tuple[str, nn.Module]]:
    """List a model's blocks in forward order, the head last.

    Detected blocks carry real names: a block that is one module is named by its dotted module name
    (``model.get_submodule(name)`` returns it); a block of several modules and loose parameters by the
    ``|``-join of their names (``conv1|bn1``, a regex that matches exactly them). Either way the names
    round-trip: ``list_blocks(model, blocks=[n for n, _ in list_blocks(model)][:-1])`` gives the same blocks.
    A ``torch.compile``-d submodule (``self.net = torch.compile(net)``) is looked through: names are those
    of the uncompiled model (``net.layer1``), and ``blocks`` entries may also spell the wrapper
    (``net._orig_mod.layer1``); a compiled alias of a network (``self.fwd = torch.compile(self.net)``)
    is that network.

    Args:
        model: The network (or a module whose only parametrized child is the network).
        blocks: Optional explicit blocks, in forward order: each a dotted module name or a regex matched
            against the start of parameter names. The head is appended when not listed (it may only be the
            last entry: the head is not a block, and an entry naming a part of it is an error).
        head: Explicit head name (see :func:`find_head`).
        fine: For timm models, timm's fine grouping (``group_matcher(coarse=False)``: each block of a
            stage on its own, what timm's layer-wise LR decay uses) instead of its stages.

    Returns:
        ``[(name, module), ...]``: a real submodule when a block is one module, else a
        :class:`BlockGroup` of references. Every parameter belongs to exactly one block.

    Example::

        >>> import torchvision
        >>> [n for n, _ in list_blocks(torchvision.models.resnet18(weights=None))]
        ['conv1|bn1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    """
    head_name, head_module = find_head(model, head)
    head_ids = {id(p) for p in head_module.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]

    if blocks is not None:
        _refuse_head_entries([plain_name(b) for b in blocks], head_name)
        layout: list[tuple[str, object]] = [(b, b) for b in blocks if plain_name(b) != head_name]
        prefix = ""
    else:
        inner, prefix, copies = _unwrap(model, head_name)
        layout = [(prefix + n, r) for n, r in (known_layout(inner, fine) or generic_layout(inner))]
        named = [(n, p) for n, p in named if not any(n.startswith(c + ".") for c in copies)]

    params_all = dict(model.named_parameters())
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
            raise _empty_block_error(model, empty, assigned, head_name, head_ids)
        unmatched = [n for n in unmatched if params_all[n].requires_grad]  # frozen leftovers: left alone
        if unmatched:
            raise AnatomyError(
                f"{len(unmatched)} parameter(s) belong to no listed block, e.g. {unmatched[:5]}. Every "
                "trainable parameter must belong to exactly one block: add a block (name or regex) that covers them."
            )
    elif unmatched:
        # root-level parameters (e.g. a class token) and stragglers join the first block
        first = next(iter(assigned))
        assigned[first] = unmatched + assigned[first]

    params = dict(model.named_parameters())
    result = []
    for name, names in assigned.items():
        if names:
            real, module = _as_module(model, names, params)
            result.append((plain_name(name if blocks is not None else real), module))
    result.append((head_name, head_module))
    return result


def _inside(name: str, container: str) -> bool:
    return name == container or name.startswith(container + ".")


def _refuse_head_entries(blocks: Sequence[str], head_name: str) -> None:
    """The head is not a block: an entry naming it (except as the last entry, where ``list_blocks`` puts it)
    or a module inside it is an error."""
    for i, b in enumerate(blocks):
        if (b == head_name and i < len(blocks) - 1) or b.startswith(head_name + "."):
            where = "the head" if b == head_name else "a part of the head"
            raise AnatomyError(
                f"The head is not a block: blocks entry {b!r} names {where} {head_name!r}. List the blocks "
                "below the head in forward order; the head is always the last block (it may be named only "
                "as the last entry, as list_blocks returns it)."
            )


def _empty_block_error(
    model: nn.Module, empty: list[str], assigned: dict[str, list[str]], head_name: str, head_ids: set[int]
) -> AnatomyError:
    """Why the first of the ``empty`` entries matches no parameter, with candidates other than itself."""
    wrong = empty[0]
    named = list(model.named_parameters())
    modules = {plain_name(n): m for n, m in model.named_modules()}  # compiled submodules: plain names
    earlier = [b for b, names in assigned.items() if b != wrong and any(_match(wrong, n) for n in names)]
    if wrong in modules and not any(True for _ in modules[wrong].parameters()):
        reason = f"{wrong!r} is a {type(modules[wrong]).__name__}, which holds no parameter"
    elif (matched := [p for n, p in named if _match(wrong, n)]) and all(id(p) in head_ids for p in matched):
        reason = f"the head is not a block: {wrong!r} matches only parameters of the head {head_name!r}"
    elif earlier:
        reason = f"its parameters already belong to the earlier block {earlier[0]!r} (the first match wins)"
    else:
        reason = f"{wrong!r} is neither a module name nor a regex matching the start of a parameter name"
    names = [n for n, m in modules.items() if n and n != wrong and not _inside(n, head_name)
             and any(True for _ in m.parameters())]
    close = [] if reason.startswith("the head") else difflib.get_close_matches(wrong, names, n=12, cutoff=0.4)
    if not close:  # the blocks list_blocks detects
        try:
            close = [n for n, _ in list_blocks(model, head=head_name)[:-1]]
        except AnatomyError:
            close = names[:12]
    return AnatomyError(
        f"Block(s) {empty} match no parameter of {type(model).__name__}: {reason}. "
        f"Candidates: {', '.join(repr(c) for c in close) or 'none'}."
    )


def _signature(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in module.named_parameters()]


def _unwrap(model: nn.Module, head_name: str) -> tuple[nn.Module, str, list[str]]:
    """Descend through wrappers (a LightningModule holding one network, peft's ``PeftModel``) to the network.

    Frozen copies of that network beside it (a distillation teacher or an EMA model made with
    ``copy.deepcopy(...).requires_grad_(False)``: same parameter names and shapes, nothing trainable) do
    not stop the descent; their names are returned so that they belong to no block and no schedule
    touches them, as are peft's frozen ``original_module`` copies of its ``modules_to_save``.
    """
    prefix, copies = "", []
    while known_layout(model) is None:
        if is_adapter_wrapper(model):
            model, inner = unwrap_adapters(model)
            prefix += inner
            continue
        children = _distinct_children(model)  # a compiled alias of a child is that child
        if list(model.parameters(recurse=False)) or not children:
            break
        if len(children) > 1:
            holder = [(n, c) for n, c in children if head_name.startswith(plain_name(prefix + n) + ".")]
            if len(holder) != 1:
                break
            signature = _signature(holder[0][1])
            others = [(n, c) for n, c in children if c is not holder[0][1]]
            if not all(_signature(c) == signature and not any(p.requires_grad for p in c.parameters())
                       for _, c in others):
                break
            copies += [prefix + n for n, _ in others]
            children = holder
        name, model = children[0]
        prefix += name + "."
    return model, prefix, copies + [prefix + n for n in frozen_originals(model)]


def _param_names(model: nn.Module, name: str) -> set[str]:
    return {f"{name}.{n}" for n, _ in model.get_submodule(name).named_parameters()}


def _single_module(model: nn.Module, owned: set[str]) -> str | None:
    """The outermost submodule (not ``model`` itself) whose parameters are exactly ``owned``, if any."""
    prefix = common_prefix(sorted(owned))
    try:
        if not prefix or _param_names(model, prefix) != owned:
            return None
    except AttributeError:
        return None
    parts = prefix.split(".")
    while len(parts) > 1 and _param_names(model, ".".join(parts[:-1])) == owned:
        parts.pop()
    return ".".join(parts)


def _as_module(model: nn.Module, names: list[str], params: dict[str, nn.Parameter]) -> tuple[str, nn.Module]:
    """The block's real name and module: one submodule when its parameters are exactly one module's,
    else a :class:`BlockGroup` named by the ``|``-join of its members' names, in parameter order."""
    owned = set(names)
    single = _single_module(model, owned)
    if single is not None:
        return single, model.get_submodule(single)
    # maximal modules all of whose parameters are in the block, plus loose parameters
    modules: list[nn.Module] = []
    covered: list[str] = []
    for mname, module in model.named_modules():
        if not mname or any(mname.startswith(c + ".") for c in covered):
            continue
        mparams = {f"{mname}.{n}" for n, _ in module.named_parameters()}
        if mparams and mparams <= owned:
            modules.append(module)
            covered.append(mname)
    members: dict[str, None] = {}  # ordered set: each parameter's covering module, or the parameter
    for n in names:
        members[next((c for c in covered if n.startswith(c + ".")), n)] = None
    loose = [params[n] for n in names if n in members]
    return "|".join(members), BlockGroup(modules, loose, names)
