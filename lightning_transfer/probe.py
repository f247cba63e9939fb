"""Linear probe on a network's own features: the baseline every fine-tuning method must beat, and the
"LP" of LP-FT done as its paper intends (probe to convergence on cached features, then fine-tune).

The features are the input of the head's final linear layer (what the network's classifier sees),
computed once in eval mode; :mod:`lightning_transfer.functional.linear_probe` fits the probe.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from lightning_transfer.anatomy import final_linear, find_head
from lightning_transfer.functional.linear_probe import DEFAULT_L2_GRID, ProbeFit, select_linear_probe
from lightning_transfer.rank import collect_features

__all__ = ["head_features", "linear_probe", "set_head_from_probe_"]


def head_features(model: nn.Module, loader: Iterable, head: str | None = None,
                  max_batches: int | None = None) -> tuple[Tensor, Tensor]:
    """``(features (N, D), labels (N,))``: the input of the head's final linear layer for every example
    of ``loader`` (tuple or dict batches), with the model in eval mode; its modes are restored after.
    A token-shaped input is mean-pooled over tokens, as the transferability ranking pools it.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        >>> feats, labels = head_features(net, [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))])
        >>> tuple(feats.shape), labels.tolist()  # the input of the last Linear
        ((5, 6), [0, 1, 2, 0, 1])
    """
    layer = final_linear(find_head(model, head)[1])
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"A linear probe needs a Linear final head layer; this head ends in {type(layer).__name__}.")
    features, labels, _ = collect_features(model, loader, {"head": layer}, max_batches, pre=True,
                                           owner="head_features", hint="pass head= naming the classifier forward runs")
    return features["head"], labels


def linear_probe(model: nn.Module, train_loader: Iterable, val_loader: Iterable,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, head: str | None = None) -> ProbeFit:
    """Fit a linear probe to convergence on the model's cached head features of ``train_loader``, the
    L2 strength chosen on ``val_loader``. The number of classes is the head's output size.

    Pass loaders without augmentation: each image's features are computed once.

    Example::

        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> x = torch.randn(40, 4)
        >>> batches = [(x[:20], (x[:20, 0] > 0).long()), (x[20:], (x[20:, 0] > 0).long())]
        >>> fit = linear_probe(net, batches[:1], batches[1:])  # train loader, val loader
        >>> fit.l2 in fit.val_acc_by_l2, 0.0 <= fit.val_acc <= 1.0
        (True, True)
        >>> set_head_from_probe_(net, fit)  # LP-FT: fine-tune from the converged probe
        >>> torch.equal(net[2].weight, fit.weight)
        True
    """
    layer = final_linear(find_head(model, head)[1])
    train_x, train_y = head_features(model, train_loader, head)
    val_x, val_y = head_features(model, val_loader, head)
    return select_linear_probe(train_x, train_y, val_x, val_y, layer.out_features, l2_grid)


@torch.no_grad()
def set_head_from_probe_(model: nn.Module, fit: ProbeFit, head: str | None = None) -> None:
    """Copy a probe's weight and bias into the head's final linear layer (the LP of LP-FT)."""
    layer = final_linear(find_head(model, head)[1])
    if tuple(layer.weight.shape) != tuple(fit.weight.shape):
        raise ValueError(f"The probe's weight {tuple(fit.weight.shape)} does not fit the head layer's {tuple(layer.weight.shape)}.")
    layer.weight.copy_(fit.weight.to(layer.weight))
    if layer.bias is not None:
        layer.bias.copy_(fit.bias.to(layer.bias))
    elif fit.bias.abs().max() > 0:
        raise ValueError("The head layer has no bias; the probe's bias cannot be copied into it.")
