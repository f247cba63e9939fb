"""Greedy model soups (Wortsman et al., ICML 2022), Model Stock (Jang et al., ECCV 2024) and the evaluation
helpers weight-space ensembling shares."""

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
from lightning_transfer.functional.model_stock import model_stock_merge
from lightning_transfer.safe_load import load_torch_file
from lightning_transfer.validation import check_int

__all__ = ["Soup", "Stock", "count_correct", "greedy_soup", "has_batchnorm", "model_stock"]


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


def _load_state(candidate: Mapping[str, Tensor] | str | PathLike, trusted: bool = False,
                owner: str = "greedy_soup") -> dict[str, Tensor]:
    if isinstance(candidate, Mapping):
        return dict(candidate)
    path = Path(candidate)
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: checkpoint {str(path)!r} does not exist.")
    # a Lightning .ckpt with plain hyper-parameters loads with weights_only=True; its state_dict is used
    loaded = load_torch_file(path, owner, trusted, way_out=(
        f"If you made this file or trust its source, pass {owner}(..., trusted=True); else pass the "
        "states as state dicts"))
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{owner}: {str(path)!r} holds neither a Lightning checkpoint nor a state dict.")
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


class Stock(NamedTuple):
    """What :func:`model_stock` returns: the merged state dict, and per merged entry its ``t`` and mean cosine."""

    state_dict: dict[str, Tensor]
    ratio: dict[str, float]
    cosine: dict[str, float]


def model_stock(
    finetuned: Sequence[Mapping[str, Tensor] | str | PathLike],
    pretrained: Mapping[str, Tensor] | str | PathLike,
    max_relative_update: float = 1.0,
    trusted: bool = False,
) -> Stock:
    r"""Model Stock (Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024):
    merge ``k >= 2`` fine-tuning runs from one pre-trained model, per layer, toward the pre-trained weights.

    For every floating-point entry (each weight tensor is a layer) with updates ``d_i = w_i − w0``:
    ``cos`` is the mean over pairs ``i < j`` of the cosine of ``d_i`` and ``d_j`` (the paper's angle for ``k = 2``;
    its formula for ``k`` runs takes one angle for every pair, and for ``k > 2`` the mean pairwise cosine is our
    choice), ``t = k·cos / (1 + (k − 1)·cos)`` clamped to ``[0, 1]`` (``cos <= 0`` gives ``t = 0``: the
    pre-trained value; a pair in which one update is zero counts ``cos = 0``, so for ``k = 2`` such an entry
    stays at ``w0``), and ``w = t·mean(w_i) + (1 − t)·w0``. Integer entries come from ``w0``. BatchNorm running
    statistics are merged like weights: re-estimate them on training data before use
    (:func:`~lightning_transfer.batchnorm.reestimate_batchnorm`), as :func:`greedy_soup` does. The math is
    :func:`~lightning_transfer.functional.model_stock.model_stock_merge`.

    Runs from other starts are refused (their average collapses): a run whose whole update is larger than
    ``max_relative_update`` times the pre-trained weights (``‖w_i − w0‖ > max_relative_update·‖w0‖`` over all
    floating entries; fine-tuning moves far less, a run from another initialization about ``√2·‖w0‖``), and an
    entry on which every run agrees but ``w0`` differs (a frozen layer, a buffer: their common start was not
    ``w0``). The new head too must start from ``w0``'s head in every run (seed its initialization).

    Args:
        finetuned: At least two state dicts or checkpoint paths (Lightning ``.ckpt``: their ``state_dict``).
        pretrained: The state dict (or checkpoint path) every run started from.
        max_relative_update: The largest accepted ``‖w_i − w0‖ / ‖w0‖``.
        trusted: Read files with full unpickling (only for files you made or trust); by default weights only.

    Returns:
        ``Stock(state_dict, ratio, cosine)``: load ``state_dict`` into the model; ``ratio[name]`` is ``t``.

    Example::

        >>> w0 = {"w": torch.zeros(2)}
        >>> runs = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}]  # cos = 1/√2
        >>> stock = model_stock(runs, w0, max_relative_update=float("inf"))  # w0 = 0: any update is "large"
        >>> round(stock.ratio["w"], 4), [round(v, 4) for v in stock.state_dict["w"].tolist()]
        (0.8284, [0.8284, 0.4142])
    """
    if isinstance(finetuned, (str, PathLike, Mapping)) or not isinstance(finetuned, Sequence) or len(finetuned) < 2:
        raise ValueError("model_stock: finetuned must be a list of at least two state dicts or checkpoint paths "
                         "(fine-tuning runs from one pre-trained model).")
    if isinstance(max_relative_update, bool) or not isinstance(max_relative_update, (int, float)) or \
            not max_relative_update > 0:
        raise ValueError(f"model_stock: max_relative_update must be a number > 0, got {max_relative_update!r}.")
    if not isinstance(trusted, bool):
        raise TypeError(f"model_stock: trusted must be True or False, got {trusted!r} ({type(trusted).__name__}).")
    states = [_load_state(c, trusted, "model_stock") for c in finetuned]
    w0 = _load_state(pretrained, trusted, "model_stock")
    merged, ratio, cosine = model_stock_merge(states, w0, max_relative_update)
    return Stock(merged, ratio, cosine)
