"""Diagonal Fisher information of a pre-trained model, for L2-SP-Fisher and GL-SP-Fisher."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_transfer.safe_load import load_torch_file

__all__ = ["estimate_fisher", "load_fisher", "match_fisher", "save_fisher"]


def estimate_fisher(
    model: nn.Module,
    inputs: Iterable[Tensor],
    max_examples: int | None = None,
    chunk_size: int = 16,
    seed: int = 0,
    normalize: bool = True,
) -> dict[str, Tensor]:
    """Estimate the diagonal Fisher ``F = E_x E_{y~p(y|x)} (∂ log p(y|x) / ∂w)²`` at the current weights.

    Use it on the pre-trained model WITH its source head (e.g. ImageNet's 1000 classes), on target
    inputs. Labels are sampled from the model's own predictive distribution (the true Fisher, not the
    "empirical" one), and gradients are per example (``torch.func.vmap``), never of a batch mean. The
    model runs in eval mode (BatchNorm uses its running statistics).

    Args:
        model: The source model; its output is logits.
        inputs: Iterable of input batches (tensors); a ``(x, y)`` tuple uses ``x``.
        max_examples: Stop after this many examples.
        chunk_size: Examples per vmap call (memory grows with it).
        seed: Seed of the label sampling.
        normalize: Scale so that the mean over all coordinates is 1 (keeps ``α`` comparable to L2-SP).

    Returns:
        ``{parameter name: F}`` for every parameter that requires grad.
    """
    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}
    gen = torch.Generator().manual_seed(seed)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def log_p(p, x, y):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits.float(), dim=-1)[0].gather(0, y.unsqueeze(0)).squeeze(0)

    per_example = vmap(grad(log_p), in_dims=(None, 0, 0))
    count = 0
    for batch in inputs:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        for chunk in x.split(chunk_size):
            if max_examples is not None and count >= max_examples:
                break
            chunk = chunk[: None if max_examples is None else max_examples - count]
            with torch.no_grad():
                probs = torch.softmax(model(chunk).float(), dim=-1)
            y = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(chunk.device)
            grads = per_example(params, chunk, y)
            for n, g in grads.items():
                total[n] += g.float().square().sum(0)
            count += len(chunk)
    model.train(was_training)
    if count == 0:
        raise ValueError("estimate_fisher got no inputs.")
    fisher = {n: t / count for n, t in total.items()}
    if normalize:
        mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
        if mean > 0:
            fisher = {n: f / mean for n, f in fisher.items()}
    return fisher


def save_fisher(fisher: dict[str, Tensor], path: str | Path) -> None:
    """Save a Fisher dict for ``L2SP(fisher=path)``."""
    torch.save({"fisher": {n: f.detach().cpu() for n, f in fisher.items()}, "format": "lightning-transfer/fisher-v1"}, path)


def load_fisher(path: str | Path) -> dict[str, Tensor]:
    """Load a Fisher dict saved by :func:`save_fisher` (safely: tensors and plain values only)."""
    data = load_torch_file(path, "load_fisher", way_out="Estimate it again and save it with save_fisher")
    if not isinstance(data, dict) or "fisher" not in data:
        raise ValueError(f"{path} is not a Fisher file saved by lightning_transfer.functional.save_fisher.")
    return data["fisher"]


def _fisher_key(fisher: dict[str, Tensor], name: str) -> str | None:
    """The entry for parameter ``name``: its own name, else the longest entry ending it at a ``.`` boundary."""
    if name in fisher:
        return name
    fits = [k for k in fisher if name.endswith("." + k)]
    if not fits:
        return None
    longest = max(len(k) for k in fits)
    best = [k for k in fits if len(k) == longest]
    if len(best) > 1:
        raise ValueError(f"Fisher entries {best} fit parameter {name!r} equally well; rename them so one is exact.")
    return best[0]


def match_fisher(fisher: dict[str, Tensor], named_params: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
    """Align Fisher entries to parameters by name.

    A parameter ``backbone.layer1.0.conv1.weight`` gets the entry of the same name, else the LONGEST
    entry that ends its name at a ``.`` boundary (``layer1.0.conv1.weight``, as estimated on the bare
    backbone), never a shorter one such as the stem's ``conv1.weight``. The prefix left over must agree:
    a parameter matched under a longer prefix than others (``backbone.layer1.0.`` + ``bn1.weight`` while
    the rest is matched under ``backbone.``) means the file lacks its entry, which is an error. Missing
    entries or shape mismatches are errors that name the parameters.
    """
    out, missing, wrong, keys = [], [], [], {}
    for name, p in named_params:
        key = _fisher_key(fisher, name)
        if key is None:
            missing.append(name)
            continue
        if fisher[key].shape != p.shape:
            wrong.append(f"{name}: Fisher {tuple(fisher[key].shape)} vs parameter {tuple(p.shape)}")
            continue
        keys[name] = key
        out.append(fisher[key])
    prefixes = {name[: len(name) - len(key)] for name, key in keys.items()} - {""}
    stray = [f"{name} got {key!r}" for name, key in keys.items()
             if any(len(q) < len(name) - len(key) and name.startswith(q) for q in prefixes)]
    if missing or wrong or stray:
        sample = ", ".join(list(fisher)[:5])
        raise ValueError(
            "The Fisher file does not match the model: "
            + (f"no entry for {len(missing)} parameter(s), e.g. {missing[:3]}; " if missing else "")
            + (f"shape mismatch for {wrong[:3]}; " if wrong else "")
            + (f"only a shorter entry fits {len(stray)} parameter(s) whose full entry is missing, e.g. {stray[:3]}; "
               if stray else "")
            + f"the file has entries like {sample}. Estimate it on the same backbone."
        )
    return out
