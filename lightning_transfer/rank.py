"""Rank transfer depths and pre-trained models for a task from features alone, before any fine-tuning."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_transfer.anatomy import block_output_module, find_head, list_blocks
from lightning_transfer.batches import batch_inputs, batch_labels, call_model, hidden_states_of, logits_of
from lightning_transfer.compilation import eager
from lightning_transfer.functional.similarity import block_features as _token_pooled
from lightning_transfer.functional.transferability import hscore, leep, logme, nce
from lightning_transfer.validation import check_choice, check_int, check_strings

__all__ = ["FEATURE_ESTIMATORS", "SOURCE_ESTIMATORS", "Normalized", "block_features", "collect_features", "pool",
           "rank_depths", "rank_models", "save_ranking"]

#: Estimators on features alone: name -> ``f(features, labels)``.
FEATURE_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], float]] = {"logme": logme, "hscore": hscore}
#: Estimators on a source head's outputs: name -> ``f(logits, labels)``.
SOURCE_ESTIMATORS = {"leep": lambda logits, y: leep(torch.softmax(logits.double(), 1), y),
                     "nce": lambda logits, y: nce(logits.argmax(1), y)}


def pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """A block output as ``(n, d)`` features: global average over the spatial dims of a ``(n, C, H, W)``
    (channels-first) map, the mean over unpadded tokens of a ``(n, tokens, hidden)`` output (``mask``:
    the batch's ``attention_mask``, as :class:`~lightning_transfer.RepresentationSimilarity` pools)."""
    return x.flatten(2).mean(2) if x.ndim >= 4 else _token_pooled(x, mask)


def _loader(data: LightningDataModule | Iterable, split: str) -> Iterable:
    if not isinstance(data, LightningDataModule):
        return data
    check_choice("rank", "split", split, ("train", "val"))
    data.prepare_data()
    data.setup("fit")
    return data.train_dataloader() if split == "train" else data.val_dataloader()


def collect_features(model: nn.Module, loader: Iterable, modules: dict[str, nn.Module], max_batches: int | None,
                     pre: bool, owner: str = "rank", hint: str = "pass blocks= that forward runs"
                     ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One no-grad pass in eval mode (modes restored after); pooled outputs (inputs, ``pre``) of
    ``modules`` as ``(n, d)`` features (:func:`pool`), labels, logits. Errors name ``owner`` and ``hint``."""
    parts: dict[str, list[Tensor]] = {name: [] for name in modules}
    labels, logits, last = [], [], {}

    def hook(name: str) -> Callable:
        if pre:
            return lambda m, args: last.__setitem__(name, hidden_states_of(args, name).detach())
        return lambda m, i, o: last.__setitem__(name, hidden_states_of(o, name).detach())

    handles = [m.register_forward_pre_hook(hook(n)) if pre else m.register_forward_hook(hook(n))
               for n, m in modules.items()]
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad(), eager():  # one pass: hooks that compiled graphs would skip
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                inputs = move_data_to_device(batch_inputs(batch), device)
                last.clear()
                logits.append(logits_of(call_model(model, inputs)).float().cpu())
                labels.append(batch_labels(batch).cpu())
                mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
                for name in modules:
                    if name not in last:
                        raise ValueError(f"{owner}: {name!r} produced no output (forward does not call it); {hint}.")
                    parts[name].append(pool(last[name], mask).float().cpu())
    finally:
        for h in handles:
            h.remove()
        for module, mode in modes:
            module.training = mode
    if not labels:
        raise ValueError(f"{owner}: the loader yielded no batch; pass data with at least one labelled batch.")
    return {n: torch.cat(p) for n, p in parts.items()}, torch.cat(labels), torch.cat(logits)


def block_features(model: nn.Module, loader: Iterable, blocks: Sequence[str] | None = None,
                   max_batches: int | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Pooled ``(N, d)`` features at the output of each block before the head, and the ``(N,)`` labels.

    Blocks come from :func:`~lightning_transfer.list_blocks` (``blocks`` as there; the head is left
    out); a block of several modules is read at its last module. One pass in eval mode without
    gradients (the modes are restored); tuple or dict batches, tensors, tuples or ModelOutputs from the
    blocks. Pooling: see :func:`pool`.

    Args:
        model: The network (a LightningModule included).
        loader: Labelled batches (``(x, y)`` or dicts with ``labels``).
        blocks: Explicit blocks; default every block before the head.
        max_batches: Read at most this many batches.

    Example::

        >>> import torch, torchvision
        >>> loader = [(torch.rand(8, 3, 32, 32), torch.arange(8) % 2)]
        >>> feats, y = block_features(torchvision.models.resnet18(weights=None), loader)
        >>> {name: tuple(f.shape) for name, f in feats.items()}
        {'conv1|bn1': (8, 64), 'layer1': (8, 64), 'layer2': (8, 128),
         'layer3': (8, 256), 'layer4': (8, 512)}
        >>> y.tolist()
        [0, 1, 0, 1, 0, 1, 0, 1]
    """
    if blocks is not None:
        blocks = check_strings("block_features", "blocks", blocks, allow_empty=False)
    if max_batches is not None:
        max_batches = check_int("block_features", "max_batches", max_batches, minimum=1)
    listed = list_blocks(model, blocks)[:-1]
    if not listed:
        raise ValueError("block_features: the model has no block before its head; nothing to score.")
    modules = {name: block_output_module(b) for name, b in listed}
    features, labels, _ = collect_features(model, loader, modules, max_batches, pre=False)
    return features, labels


def _estimators(names: Sequence[str], allowed: Mapping[str, Any]) -> list[str]:
    names = check_strings("rank", "estimators", names, allow_empty=False)
    for name in names:
        check_choice("rank", "estimators", name, tuple(allowed))
    return list(dict.fromkeys(names))


def rank_depths(model: nn.Module, data: LightningDataModule | Iterable, estimators: Sequence[str] = ("logme", "hscore"),
                blocks: Sequence[str] | None = None, max_batches: int | None = None, split: str = "train") -> list[dict]:
    """Score each transfer depth of ``model`` on ``data``: features at each block output, before fine-tuning.

    Row ``k`` scores the output of block ``k``: what the trainable part sees when the first ``k`` blocks
    are frozen (``FreezeSchedule(depth=k)``). Depth 0 (nothing frozen) has no frozen features to score.

    Args:
        model: The pre-trained model (its head need not be trained).
        data: A LightningDataModule (its ``split`` loader) or an iterable of labelled batches. Turn
            training augmentation off for reproducible scores.
        estimators: Of ``"logme"`` and ``"hscore"`` (features only; LEEP and NCE need a source head: see
            :func:`rank_models`).
        blocks: Explicit blocks (see :func:`~lightning_transfer.list_blocks`).
        max_batches: Read at most this many batches.
        split: ``"train"`` or ``"val"`` loader of a DataModule.

    Returns:
        ``[{"block", "depth", "dim", <estimator>: score, ...}]`` in forward order.

    Example::

        >>> from lightning_transfer import AnimalMNISTDataModule, TransferClassifier
        >>> dm = AnimalMNISTDataModule(per_class=2, val_per_class=2, test_per_class=2, image_size=32, augment=False)
        >>> rows = rank_depths(TransferClassifier("efficientnet_lite0", 10), dm)
        >>> [(r["depth"], r["block"]) for r in rows][:2]
        [(1, 'backbone._conv_stem|backbone._bn0'), (2, 'backbone._blocks.0')]
        >>> sorted(rows[0])
        ['block', 'depth', 'dim', 'hscore', 'logme']
    """
    names = _estimators(estimators, FEATURE_ESTIMATORS)
    features, labels = block_features(model, _loader(data, split), blocks, max_batches)
    return [{"block": name, "depth": depth, "dim": f.shape[1],
             **{e: FEATURE_ESTIMATORS[e](f, labels) for e in names}}
            for depth, (name, f) in enumerate(features.items(), 1)]


def rank_models(candidates: Mapping[str, nn.Module], data: LightningDataModule | Iterable,
                estimators: Sequence[str] = ("logme", "hscore", "leep", "nce"), source_heads: Sequence[str] | None = None,
                max_batches: int | None = None, split: str = "train") -> list[dict]:
    """Score pre-trained candidates for ``data`` on the features their head receives (and their source head).

    LogME and H-score use the head's input (pooled). LEEP (softmax of the outputs) and NCE (their argmax)
    need the candidate's **source** head, e.g. ``build_backbone(name, num_classes=None)`` keeps the
    ImageNet head; they are ``None`` for other candidates. Which candidates have one: ``source_heads``
    (names), by default every candidate but :class:`~lightning_transfer.TransferClassifier` modules (whose
    head is always new).

    Args:
        candidates: ``{name: model}``; each model gets the batches' inputs as they are (normalize inside).
        data: A LightningDataModule (its ``split`` loader) or an iterable of labelled batches.
        estimators: Of ``"logme"``, ``"hscore"``, ``"leep"``, ``"nce"``.
        source_heads: Names of the candidates whose head is their source head.
        max_batches: Read at most this many batches per candidate.
        split: ``"train"`` or ``"val"`` loader of a DataModule.

    Returns:
        ``[{"model", "dim", <estimator>: score or None, ...}]`` in the order of ``candidates``.

    Example::

        >>> from lightning_transfer import AnimalMNISTDataModule, build_backbone
        >>> net, (mean, std) = build_backbone("efficientnet_lite0", num_classes=None)  # keeps the ImageNet head
        >>> dm = AnimalMNISTDataModule(per_class=2, val_per_class=2, test_per_class=2, image_size=32, augment=False)
        >>> (row,) = rank_models({"lite0": Normalized(net, mean, std)}, dm)
        >>> row["model"], row["dim"], sorted(row)
        ('lite0', 1280, ['dim', 'hscore', 'leep', 'logme', 'model', 'nce'])
    """
    from lightning_transfer.model import TransferClassifier

    names = _estimators(estimators, {**FEATURE_ESTIMATORS, **SOURCE_ESTIMATORS})
    if not isinstance(candidates, Mapping) or not candidates:
        raise ValueError("rank_models: candidates must be a non-empty {name: model} mapping.")
    if source_heads is not None:
        source_heads = check_strings("rank_models", "source_heads", source_heads)
        unknown = sorted(set(source_heads) - set(candidates))
        if unknown:
            raise ValueError(f"rank_models: source_heads names {unknown} that are not candidates {sorted(candidates)}.")
    if max_batches is not None:
        max_batches = check_int("rank_models", "max_batches", max_batches, minimum=1)
    loader = _loader(data, split)
    rows = []
    for cand, model in candidates.items():
        head_name, head = find_head(model)
        features, labels, logits = collect_features(model, loader, {head_name: head}, max_batches, pre=True)
        f = features[head_name]
        has_source = cand in source_heads if source_heads is not None else not isinstance(model, TransferClassifier)
        row: dict[str, Any] = {"model": cand, "dim": f.shape[1]}
        for e in names:
            if e in FEATURE_ESTIMATORS:
                row[e] = FEATURE_ESTIMATORS[e](f, labels)
            else:
                row[e] = SOURCE_ESTIMATORS[e](logits, labels) if has_source else None
        rows.append(row)
    return rows


class Normalized(nn.Module):
    """``net((x - mean) / std)``: a raw backbone with the input normalization its weights expect (images
    in ``[0, 1]``, as the data modules give them), for :func:`rank_models`."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Any:
        return self.net((x - self.mean) / self.std)



def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)


def save_ranking(depth_rows: Sequence[dict], model_rows: Sequence[dict], out_dir: str | Path, plot: bool = True) -> str:
    """Write ``rank.csv`` (and ``rank.png``: scores by depth, and by model) to ``out_dir``; return a text table.

    Example::

        >>> import os, tempfile
        >>> out = tempfile.mkdtemp()
        >>> rows = [{"block": "layer1", "depth": 1, "dim": 64, "logme": 0.5}]
        >>> table = save_ranking(rows, [], out, plot=False)  # the printable table
        >>> "layer1" in table, os.listdir(out)
        (True, ['rank.csv'])
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = [k for k in (*FEATURE_ESTIMATORS, *SOURCE_ESTIMATORS) if any(k in r for r in (*depth_rows, *model_rows))]
    rows = [{"kind": "depth", "name": r["block"], "depth": r["depth"], "dim": r["dim"], **{k: r.get(k) for k in scores}}
            for r in depth_rows]
    rows += [{"kind": "model", "name": r["model"], "depth": "", "dim": r["dim"], **{k: r.get(k) for k in scores}}
             for r in model_rows]
    fields = ["kind", "name", "depth", "dim", *scores]
    with (out / "rank.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
    width = max([len(r["name"]) for r in rows] + [4])
    lines = [f"{'kind':<6} {'name':<{width}} {'depth':>5} {'dim':>5} " + " ".join(f"{k:>8}" for k in scores)]
    lines += [f"{r['kind']:<6} {r['name']:<{width}} {r['depth']!s:>5} {r['dim']:>5} "
              + " ".join(f"{_fmt(r[k]):>8}" for k in scores) for r in rows]
    if plot and rows:
        _plot(depth_rows, model_rows, scores, out / "rank.png")
    return "\n".join(lines)


def _plot(depth_rows: Sequence[dict], model_rows: Sequence[dict], scores: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("depth", k) for k in scores if depth_rows and k in depth_rows[0]] + [("model", k) for k in scores if model_rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (kind, key) in zip(axes[0], panels):
        if kind == "depth":
            ax.plot([r["depth"] for r in depth_rows], [r[key] for r in depth_rows], marker="o")
            ax.set_xlabel("transfer depth k (features after block k)")
        else:
            kept = [r for r in model_rows if r.get(key) is not None]
            ax.bar([r["model"] for r in kept], [r[key] for r in kept])
            ax.tick_params(axis="x", labelrotation=30)
        ax.set_title(f"{key} by {kind}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
