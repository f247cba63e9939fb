"""Greedy model soups (Wortsman et al., ICML 2022) and the evaluation helpers weight-space ensembling shares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_transfer.anatomy import lora_factors
from lightning_transfer.batches import batch_inputs, batch_labels, call_model, logits_of
from lightning_transfer.batchnorm import batchnorm_state_kept, reestimate_batchnorm
from lightning_transfer.functional.interpolation import uniform_soup
from lightning_transfer.safe_load import load_torch_file
from lightning_transfer.validation import check_int

__all__ = ["Soup", "count_correct", "greedy_soup", "has_batchnorm"]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def count_correct(model: nn.Module, loader: Iterable, max_batches: int | None = None,
                  rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """``(correct, total)`` of ``argmax(logits) == labels`` over the batches ``i`` with ``i % world_size == rank``
    (this rank's shard of the loader) among the first ``max_batches``; the model is run as it is (set eval first)."""
    device = next(model.parameters()).device
    correct = total = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if i % world_size != rank:
            continue
        batch = move_data_to_device(batch, device)
        labels = batch_labels(batch)
        logits = logits_of(call_model(model, batch_inputs(batch)))
        correct += int((logits.argmax(-1) == labels.to(logits.device)).sum())
        total += int(labels.numel())
    return correct, total


class Soup(NamedTuple):
    """What :func:`greedy_soup` returns: the soup's state dict and one log entry per candidate."""

    state_dict: dict[str, Tensor]
    log: list[dict[str, Any]]


def _load_state(candidate: Mapping[str, Tensor] | str | PathLike, trusted: bool = False) -> dict[str, Tensor]:
    if isinstance(candidate, Mapping):
        return dict(candidate)
    path = Path(candidate)
    if not path.is_file():
        raise FileNotFoundError(f"greedy_soup: checkpoint {str(path)!r} does not exist.")
    # a Lightning .ckpt with plain hyper-parameters loads with weights_only=True; its state_dict is used
    loaded = load_torch_file(path, "greedy_soup", trusted, way_out=(
        "If you made this file or trust its source, pass greedy_soup(..., trusted=True); else pass the "
        "candidates as state dicts"))
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"greedy_soup: {str(path)!r} holds neither a Lightning checkpoint nor a state dict.")
    return dict(state)


def greedy_soup(
    candidates: Sequence[Mapping[str, Tensor] | str | PathLike],
    model: nn.Module,
    val_loader: Iterable,
    train_loader: Iterable | None = None,
    bn_batches: int | None = None,
    trusted: bool = False,
) -> Soup:
    r"""Greedy soup: sort candidates by validation accuracy; add each to the soup if the uniform average's
    validation accuracy does not drop (Wortsman et al., "Model soups", ICML 2022, Recipe 1).

    Candidates are state dicts or checkpoint paths (Lightning ``.ckpt`` files: their ``state_dict``) of
    fine-tuning runs from one start, with ``model``'s architecture (``model.load_state_dict`` keys).
    Accuracy is ``argmax(logits) == labels`` in eval mode. Where ``model`` has BatchNorm, every evaluated
    model (each candidate and each trial soup) gets statistics re-estimated on ``train_loader`` (every
    BatchNorm layer, in train mode; averaged statistics do not describe averaged weights). Ties keep the
    earlier candidate (stable sort). ``model`` is left as it was; load the result yourself. LoRA candidates
    (a peft ``model``) are averaged only where they share each adapter's ``A`` (then the mean of the ``B``\ s is
    the mean of the updates); others are refused: merge their adapters and soup the merged models.

    Args:
        candidates: At least one state dict or checkpoint path.
        model: A module to evaluate in (its weights and BatchNorm statistics are restored afterwards).
        val_loader: Batches ``(x, y)`` or dicts with labels, for the selection.
        train_loader: Batches for the BatchNorm re-estimation (required when ``model`` has BatchNorm).
        bn_batches: Use at most this many ``train_loader`` batches per re-estimation (``None``: all).
        trusted: Read checkpoint files with full unpickling (``torch.load(weights_only=False)``), which
            runs any code stored in them: only for files you made or trust. By default they are read
            with ``weights_only=True`` (tensors, plain containers and numbers), which reads Lightning
            checkpoints whose hyper-parameters are plain values, and anything else is refused.

    Returns:
        ``Soup(state_dict, log)``: log entries ``{"candidate", "val_acc", "soup_val_acc", "kept"}`` in the
        greedy order; ``soup_val_acc`` is the accuracy of the soup with that candidate added.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> val = [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))]
        >>> good = {"weight": torch.eye(2), "bias": torch.zeros(2)}  # state dicts, or checkpoint paths
        >>> bad = {"weight": -torch.eye(2), "bias": torch.zeros(2)}
        >>> soup, log = greedy_soup([bad, good], model, val)
        >>> [(entry["candidate"], entry["val_acc"], entry["kept"]) for entry in log]  # best first
        [(1, 1.0, True), (0, 0.0, False)]
        >>> model.load_state_dict(soup)
        <All keys matched successfully>
    """
    if isinstance(candidates, (str, PathLike, Mapping)) or not isinstance(candidates, Sequence) or not candidates:
        raise ValueError("greedy_soup: candidates must be a non-empty list of state dicts or checkpoint paths.")
    if bn_batches is not None:
        check_int("greedy_soup", "bn_batches", bn_batches, minimum=1)
    if not isinstance(trusted, bool):
        raise TypeError(f"greedy_soup: trusted must be True or False, got {trusted!r} "
                        f"({type(trusted).__name__}).")
    batchnorm = has_batchnorm(model)
    if batchnorm and train_loader is None:
        raise ValueError("greedy_soup: the model has BatchNorm layers, whose statistics must be re-estimated for "
                         "averaged weights; pass train_loader (batches of training data).")
    states = [_load_state(c, trusted) for c in candidates]
    low_rank = lora_factors(model)
    uniform_soup(states, low_rank)  # LoRA factors that cannot be averaged: refused before any evaluation
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def accuracy(state: Mapping[str, Tensor]) -> float:
        model.load_state_dict(state)
        with batchnorm_state_kept(model):
            if batchnorm:
                model.train()
                reestimate_batchnorm(model, train_loader, bn_batches)
            correct, total = count_correct(model.eval(), val_loader)
        if total == 0:
            raise ValueError("greedy_soup: val_loader yielded no examples.")
        return correct / total

    try:
        individual = [accuracy(s) for s in states]
        order = sorted(range(len(states)), key=lambda i: -individual[i])
        kept, best, log = [order[0]], individual[order[0]], []
        log.append({"candidate": order[0], "val_acc": best, "soup_val_acc": best, "kept": True})
        for i in order[1:]:
            trial = accuracy(uniform_soup([states[j] for j in [*kept, i]], low_rank))
            keep = trial >= best
            log.append({"candidate": i, "val_acc": individual[i], "soup_val_acc": trial, "kept": keep})
            if keep:
                kept.append(i)
                best = trial
        soup = uniform_soup([states[j] for j in kept], low_rank)
        if batchnorm:  # the soup with the statistics it was selected with
            model.load_state_dict(soup)
            with torch.random.fork_rng():
                modes = {m: m.training for m in model.modules()}
                model.train()
                reestimate_batchnorm(model, train_loader, bn_batches)
                for m, training in modes.items():
                    m.training = training
            soup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        model.load_state_dict(original)
    return Soup(soup, log)
