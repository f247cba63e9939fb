"""Compiled networks: ``torch.compile(net)`` wraps ``net`` as the ``_orig_mod`` child of an ``OptimizedModule``.

The wrapper owns no parameter of its own and forwards attribute reads to ``net``, so ``get_submodule``
already resolves a plain name through it (``"net.layer1"`` is ``net._orig_mod.layer1``); only
``named_modules``/``named_parameters`` spell the ``_orig_mod`` segment. Anatomy therefore reports
*plain* names (the names of the uncompiled model), accepts both spellings, and looks through the
wrapper wherever it inspects a network's type or attributes. Nothing outside anatomy needs to know
about ``_orig_mod``.
"""

from __future__ import annotations

from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

__all__ = ["inner_module", "is_compiled", "is_wrapper", "plain_name", "relative_name"]

WRAPPED = "_orig_mod"


def is_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the ``OptimizedModule`` that ``torch.compile(net)`` returns."""
    return isinstance(module, OptimizedModule)


def inner_module(module: nn.Module) -> nn.Module:
    """The network under any ``torch.compile`` wrappers (``module`` itself when it is not one)."""
    while is_wrapper(module):
        module = module._orig_mod
    return module


def plain_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` segments of compiled wrappers (each ``|``-joined part too)."""
    if WRAPPED not in name:
        return name
    return "|".join(".".join(s for s in part.split(".") if s != WRAPPED) for part in name.split("|"))


def relative_name(name: str, root: str) -> str | None:
    """The plain name of module ``name`` inside module ``root`` (``""``: the whole model), either spelled
    plain or wrapped; ``None`` when ``name`` is not strictly inside ``root``.

    Example::

        >>> relative_name("net.layer1.0", "net._orig_mod")
        'layer1.0'
    """
    name, root = plain_name(name), plain_name(root)
    if not root:
        return name or None
    return name[len(root) + 1:] if name.startswith(root + ".") else None


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs compiled code: a ``torch.compile``-d submodule (or ``model`` itself), a
    module compiled in place (``module.compile()``), or a LightningModule passed to ``Trainer.fit`` as
    ``torch.compile(module)`` (Lightning compiles its ``forward`` and steps)."""
    if getattr(model, "_compiler_ctx", None) is not None:
        return True
    return any(is_wrapper(m) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
