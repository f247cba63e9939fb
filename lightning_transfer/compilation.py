"""Callbacks on ``torch.compile``-d models: what compiled code does not notice, and how it is made to.

Dynamo guards a compiled graph on the module's structure, modes and tensors, but not on its forward
hooks (``torch._dynamo.config.skip_nnmodule_hook_guards`` is True by default). A graph compiled
without a hook keeps running without it; and cache entries belong to a code object shared by every
instance of a class (for ``torch.nn`` containers, one wrapper shared by all of them), so a *new*
compiled model reuses the graphs of an earlier one: a hook registered after any compiled call of that
code is silently skipped. Two remedies, by the hook's lifetime:

* Hooks held for a whole fit (DELTA's feature hooks): :func:`recompile` right after registering them,
  so that the first compiled call traces them. Removing them later is noticed by dynamo.
* Hooks held for one pass (a similarity probe, attention measurement, feature collection):
  :func:`eager` runs that pass uncompiled (``torch.compiler.set_stance("force_eager")``), which honours
  every hook and neither compiles nor leaves a graph for a one-off pass.

``requires_grad`` changes (FreezeSchedule) are noticed by torch 2.14's guards, but each pattern is a new
graph, and after ``recompile_limit`` (8) graphs of one code object dynamo runs it uncompiled for the
rest of the process: FreezeSchedule calls :func:`recompile` at each change (the same number of graphs
is compiled either way). RIFLE and MaxEntropyHeadInit change values in place, which compiled graphs
read as inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_transfer.anatomy import is_compiled

__all__ = ["eager", "recompile", "reference_copy"]

# what Lightning's ``from_compiled`` (``Trainer.fit(torch.compile(module))``) replaces by compiled functions
_LIGHTNING_COMPILED = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def recompile(model: nn.Module) -> bool:
    """Drop dynamo's compiled graphs when ``model`` runs compiled code, so that its next call compiles
    the model as it now is (its forward hooks included). Returns whether anything was dropped.

    ``torch._dynamo.reset()`` clears every graph of the process. The model's own graphs must be compiled
    again anyway (with the new hooks, or for the new ``requires_grad`` pattern); other compiled code of
    the process recompiles on its next call. Resetting only the code of ``type(model).forward``
    (``torch._dynamo.eval_frame.remove_from_cache``) is not enough: a compiled ``torch.nn`` container runs
    as a wrapper function shared by all of them, graph breaks leave resume functions with caches of
    their own, and Lightning's ``Trainer.fit(torch.compile(module))`` compiles ``training_step``.
    """
    if not is_compiled(model):
        return False
    torch._dynamo.reset()
    return True


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules uncompiled inside the block: forward hooks added for one pass are seen, and no
    graph is compiled for (or left behind by) that pass. Do not enter it inside a compiled region."""
    with torch.compiler.set_stance("force_eager"):
        yield


def reference_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that computes with its own weights, however ``module`` was compiled.

    A ``torch.compile(net)`` wrapper copies into a wrapper of the copied ``net`` (still compiled), and
    ``net.compile()`` into an uncompiled copy (``nn.Module`` drops ``_compiled_call_impl`` when copied).
    Lightning's ``Trainer.fit(torch.compile(module))`` instead sets compiled functions bound to the
    *original* module as instance attributes (``forward``, the steps), which ``copy.deepcopy`` shares:
    the "copy" would run the live model (a pre-trained reference equal to the live one). Those are
    dropped, so the copy runs its class's own methods, uncompiled.
    """
    result = copy.deepcopy(module)
    for m in result.modules():
        if isinstance(getattr(m, "_compiler_ctx", None), dict):
            for name in _LIGHTNING_COMPILED:
                m.__dict__.pop(name, None)
            m._compiler_ctx = None
    return result
