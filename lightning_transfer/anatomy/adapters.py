"""peft adapters (LoRA): the one place in anatomy that sees through what ``peft`` inserts into a model.

``peft.get_peft_model(net, LoraConfig(...))`` wraps ``net`` as ``PeftModel.base_model.model`` (the
``LoraModel`` tuner holds it as ``model``) and rewrites it in place: each targeted layer becomes a
``LoraLayer`` holding the frozen ``base_layer`` and the factors ``lora_A``/``lora_B`` (``ModuleDict``\\ s
keyed by adapter name), and each ``modules_to_save`` entry (the new classifier) becomes a
``ModulesToSaveWrapper`` holding the frozen ``original_module`` and the trained copy
``modules_to_save[<adapter>]``. Both wrappers forward attribute reads to the network they hold, so a
``PeftModel`` *looks* like the network (``base_model_prefix``, ``config``) while its parameters are named
``base_model.model.<name>``.

Anatomy reports the real dotted names of the model it was given (``base_model.model.bert.encoder.layer.0``
round-trips through ``get_submodule``), takes the blocks of the network under the wrappers, the trained
copy of a ``modules_to_save`` head, and never counts an ``original_module`` in a block (a frozen copy,
unused while the adapter is active). Nothing here imports ``peft`` unless the process already did: a model
can only hold peft modules once ``peft`` is imported.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

__all__ = ["active_copy", "frozen_originals", "is_adapter_wrapper", "lora_factors", "unwrap_adapters"]


def _peft() -> Any | None:
    """The ``peft`` package when it is imported in this process, else ``None`` (no model can hold its modules)."""
    if "peft" not in sys.modules:
        return None
    import peft

    return peft


def is_adapter_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a ``peft.PeftModel`` or a peft tuner (``LoraModel``) wrapping a network."""
    peft = _peft()
    if peft is None:
        return False
    from peft.tuners.tuners_utils import BaseTuner

    return isinstance(module, (peft.PeftModel, BaseTuner))


def unwrap_adapters(module: nn.Module) -> tuple[nn.Module, str]:
    """The network under peft's wrappers and the prefix of its names in ``module`` (``"base_model.model."``).

    ``(module, "")`` when ``module`` is no peft wrapper. A prompt-learning ``PeftModel`` (no tuner layers)
    holds the network as its ``base_model``: ``"base_model."``.

    Example::

        >>> from torch import nn
        >>> unwrap_adapters(nn.Linear(2, 2))[1]
        ''
    """
    peft = _peft()
    prefix = ""
    while peft is not None and is_adapter_wrapper(module):
        inner = module.get_base_model() if isinstance(module, peft.PeftModel) else module.model
        name = next((n for n, c in module.named_modules() if c is inner and n), None)
        if name is None:  # pragma: no cover - every peft wrapper registers the network it holds
            break
        module, prefix = inner, f"{prefix}{name}."
    return module, prefix


def _modules_to_save_wrapper() -> type | None:
    peft = _peft()
    if peft is None:
        return None
    from peft.utils import ModulesToSaveWrapper

    return ModulesToSaveWrapper


def active_copy(module: nn.Module) -> nn.Module:
    """The trained copy ``modules_to_save[<active adapter>]`` of a ``ModulesToSaveWrapper``, else ``module``."""
    wrapper = _modules_to_save_wrapper()
    if wrapper is None or not isinstance(module, wrapper):
        return module
    active = module.active_adapters
    if len(active) != 1 or active[0] not in module.modules_to_save:
        from lightning_transfer.anatomy.layouts import AnatomyError

        raise AnatomyError(
            f"The peft ModulesToSaveWrapper has active adapters {active} (copies: {list(module.modules_to_save)}): "
            "exactly one must be active to tell which copy is trained. Call model.set_adapter('<name>') first."
        )
    return module.modules_to_save[active[0]]


def frozen_originals(model: nn.Module) -> list[str]:
    """Names (in ``model``) of the ``original_module`` of every ``ModulesToSaveWrapper``: frozen copies kept
    by peft beside the trained one, in no block."""
    wrapper = _modules_to_save_wrapper()
    if wrapper is None:
        return []
    return [f"{n}.original_module" if n else "original_module" for n, m in model.named_modules()
            if isinstance(m, wrapper) and isinstance(getattr(m, "original_module", None), nn.Module)]


def lora_factors(model: nn.Module) -> list[tuple[str, str]]:
    """``(A, B)`` parameter names (in ``model``) of every LoRA adapter, whose update of the layer's weight is
    ``s·B@A``: ``lora_A[<adapter>].weight`` and ``lora_B[<adapter>].weight`` in Linear and conv layers,
    ``lora_embedding_A[<adapter>]`` and ``lora_embedding_B[<adapter>]`` in embeddings. (A ``lora_B`` bias,
    peft's ``lora_bias=True``, adds to the output linearly: it is an ordinary parameter.)

    Raises:
        ValueError: a DoRA layer (``use_dora=True``): its weight is not ``W0 + s·B@A`` (it is renormalized by a
            trained magnitude), so no factor-wise rule interpolates it.
    """
    if _peft() is None:
        return []
    from peft.tuners.lora import LoraLayer

    pairs: list[tuple[str, str]] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        where = f"{name}." if name else ""
        if len(layer.lora_magnitude_vector):
            raise ValueError(
                f"{where[:-1] or 'The model'} is a DoRA layer (use_dora=True): its weight is renormalized by a "
                "trained magnitude, not W0 + s·B@A, so its factors cannot be interpolated. Merge the adapter "
                "first (model.merge_and_unload()) and interpolate the merged weights, or use plain LoRA."
            )
        for adapter in layer.lora_A:
            pairs.append((f"{where}lora_A.{adapter}.weight", f"{where}lora_B.{adapter}.weight"))
        for adapter in layer.lora_embedding_A:
            pairs.append((f"{where}lora_embedding_A.{adapter}", f"{where}lora_embedding_B.{adapter}"))
    return pairs
