"""What the callbacks need from a user's batches and model outputs, whatever their shape.

Batches come as ``(x, y)`` tuples (torchvision style), dicts (Hugging Face style: ``input_ids``,
``attention_mask``, ``labels`` or ``pixel_values``, ``labels``) or a bare input tensor. Models return a
logits tensor, a ``ModelOutput``/dict with ``logits``, or a tuple whose first element is the logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

__all__ = ["LABEL_KEYS", "batch_inputs", "batch_labels", "batch_size_of", "call_model", "concat_inputs",
           "hidden_states_of", "logits_of", "slice_inputs", "train_loader_of", "val_loader_of"]

LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def batch_inputs(batch: Any) -> Any:
    """The model inputs of a batch: ``x`` of ``(x, y, ...)``, the non-label entries of a dict, or the batch."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def batch_labels(batch: Any) -> Tensor:
    """The labels of a batch: ``y`` of ``(x, y, ...)`` or ``batch["labels"]`` (or label/targets/target/y)."""
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return torch.as_tensor(batch[key])
        raise ValueError(f"The batch is a dict without labels: its keys are {sorted(batch)}; expected one of {LABEL_KEYS}.")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return torch.as_tensor(batch[1])
    raise ValueError(f"Cannot find labels in a batch of type {type(batch).__name__}: expected (x, y) or a dict with 'labels'.")


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for dict inputs whose keys ``forward`` takes by name (Hugging Face), else ``model(inputs)``.

    A ``forward`` that takes the whole dict as one argument (``TransferClassifier.forward(x)``) gets it
    positionally; one with ``**kwargs`` or a parameter per key gets the keys as keyword arguments.
    """
    if isinstance(inputs, Mapping) and _takes_keywords(model, inputs):
        return model(**inputs)
    return model(inputs)


def _takes_keywords(model: nn.Module, inputs: Mapping) -> bool:
    """Whether ``model.forward`` accepts every key of ``inputs`` as a keyword argument."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C extension): the Hugging Face convention
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return set(inputs) <= names


def logits_of(output: Any) -> Tensor:
    """The logits of a model output: a tensor, ``output.logits`` / ``output["logits"]``, or ``output[0]``."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"Cannot find logits in a model output of type {type(output).__name__}: return a tensor, "
                        "or a ModelOutput/dict with 'logits'.")
    return logits


def hidden_states_of(output: Any, name: str) -> Tensor:
    """The hidden states in a module's output: the tensor, else the first tensor of a tuple or ModelOutput
    (a Hugging Face layer returns ``(hidden_states, ...)``). ``name`` names the module in the error."""
    if isinstance(output, Tensor):
        return output
    values = list(output.values()) if isinstance(output, Mapping) else list(output) if isinstance(output, (tuple, list)) else []
    for value in values:
        if isinstance(value, (Tensor, Mapping, tuple, list)):
            try:
                return hidden_states_of(value, name)
            except TypeError:
                continue
    raise TypeError(f"Block {name!r} returns a {type(output).__name__} holding no tensor; "
                    "pass blocks= whose modules return hidden states.")


def batch_size_of(inputs: Any) -> int:
    """Number of examples in model inputs (a tensor, or a dict of tensors sharing dim 0)."""
    if isinstance(inputs, Mapping):
        tensors = [v for v in inputs.values() if isinstance(v, Tensor)]
        if not tensors:
            raise ValueError(f"The batch inputs hold no tensor: keys {sorted(inputs)}.")
        return int(tensors[0].shape[0])
    return int(inputs.shape[0])


def slice_inputs(inputs: Any, stop: int) -> Any:
    """The first ``stop`` examples of model inputs."""
    if isinstance(inputs, Mapping):
        return {k: v[:stop] if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return inputs[:stop]


def concat_inputs(parts: list[Any]) -> Any:
    """Concatenate model inputs of several batches along dim 0 (dicts key by key)."""
    def cat(tensors: list[Tensor], key: str) -> Tensor:
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"Cannot concatenate batches whose {key} have different shapes after dim 0: "
                             f"{sorted(shapes)} (e.g. padding per batch). Pad to one length, or use one batch.")
        return torch.cat(tensors)

    if isinstance(parts[0], Mapping):
        return {k: cat([p[k] for p in parts], repr(k)) if isinstance(parts[0][k], Tensor) else parts[0][k]
                for k in parts[0]}
    return cat(list(parts), "inputs")


def _unwrap_loader(loader: Any) -> Any:
    """The user's iterable(s) inside a ``CombinedLoader`` (Lightning wraps loaders in one)."""
    return loader.iterables if isinstance(loader, CombinedLoader) else loader


def _loader_of(trainer: Any, loop: Any, hook: str) -> Any:
    """The raw loader(s) that ``trainer.fit`` draws from, however they were given.

    ``trainer.fit`` stores its data source in ``attach_data`` before any hook runs: the loaders passed to
    ``fit``, else the DataModule, else the LightningModule (``loop._data_source.instance``, read by
    ``_request_dataloader``; checked against Lightning 2.6.6). The loop itself builds its
    (sampler-wrapped) loader only in ``fit_loop.run()``, after ``on_fit_start``, so ``trainer.train_dataloader``
    is still ``None`` there. The raw source is also what callbacks want: the full data, identical on every
    DDP rank (no ``DistributedSampler``). A ``*_dataloader`` hook is called anew (as Lightning does
    on a reload).
    """
    source = getattr(loop, "_data_source", None)
    if source is not None and getattr(source, "instance", None) is not None:
        return _unwrap_loader(source.dataloader()) if source.is_defined() else None
    # public fallback for a Lightning without ``_data_source``: the DataModule, else the module's hook
    owner = trainer.datamodule if trainer.datamodule is not None else trainer.lightning_module
    if owner is not None and is_overridden(hook, owner):
        return _unwrap_loader(getattr(owner, hook)())
    return None


def train_loader_of(trainer: Any) -> Iterable | None:
    """The training loader of ``trainer.fit`` (loaders passed to ``fit``, DataModule or module hook).

    Usable from ``setup``/``on_fit_start`` on. Returns the user's raw loader (no distributed sampler), the
    collection (list/dict) when several were given, or ``None`` when there is none.
    """
    return _loader_of(trainer, trainer.fit_loop, "train_dataloader")


def val_loader_of(trainer: Any) -> Iterable | None:
    """The first validation loader of ``trainer.fit`` (``dataloader_idx`` 0), or ``None`` when there is none.

    Same sources and timing as :func:`train_loader_of`.
    """
    loader = _loader_of(trainer, trainer.fit_loop.epoch_loop.val_loop, "val_dataloader")
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return loader
