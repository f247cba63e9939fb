"""Co-Tuning (You et al., NeurIPS 2020): the source-target label relationship and its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["co_tuning_loss", "co_tuning_loss_and_feature_grad", "relationship", "relationship_sums"]


@torch.no_grad()
def relationship_sums(source_logits: Tensor, target_labels: Tensor, num_target: int) -> tuple[Tensor, Tensor]:
    """Per target class ``t``: the sum of the source head's softmax over the examples labelled ``t`` and their
    count, in float64: ``(sums (T, S), counts (T,))``. Sums add across batches and ranks (all-reduce them).

    Example::

        >>> sums, counts = relationship_sums(torch.zeros(3, 2), torch.tensor([0, 0, 1]), num_target=3)
        >>> sums.tolist(), counts.tolist()
        ([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0]], [2.0, 1.0, 0.0])
    """
    labels = target_labels.long().flatten()
    if labels.numel() != source_logits.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {source_logits.shape[0]} source predictions.")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_target):
        raise ValueError(f"target labels must lie in [0, {num_target}), got {labels.min()}..{labels.max()}.")
    probs = torch.softmax(source_logits.double(), dim=1)
    sums = probs.new_zeros(num_target, probs.shape[1]).index_add_(0, labels, probs)
    counts = probs.new_zeros(num_target).index_add_(0, labels, probs.new_ones(labels.numel()))
    return sums, counts


def relationship(sums: Tensor, counts: Tensor) -> Tensor:
    """``p(y_s | y_t)``: the average source softmax per target class (uniform for a class never seen), float32.

    Example::

        >>> relationship(torch.tensor([[3.0, 1.0], [0.0, 0.0]]), torch.tensor([4.0, 0.0])).tolist()
        [[0.75, 0.25], [0.5, 0.5]]
    """
    uniform = torch.full_like(sums, 1.0 / sums.shape[1])
    seen = (counts > 0).unsqueeze(1)
    return torch.where(seen, sums / counts.clamp_min(1).unsqueeze(1), uniform).float()


def co_tuning_loss(source_logits: Tensor, target_labels: Tensor, rel: Tensor, alpha: float) -> Tensor:
    """``α·mean_i CE(p(·|y_i), source_logits_i) = −α/B·Σ_i Σ_s p(s|y_i)·log softmax(source_logits_i)_s``, float32.

    Example::

        >>> rel = torch.tensor([[0.5, 0.5]])
        >>> round(float(co_tuning_loss(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), rel, 1.0)), 4)  # log 2
        0.6931
    """
    soft = rel.to(source_logits.device)[target_labels.long().to(source_logits.device)]
    return -alpha * (soft * F.log_softmax(source_logits.float(), dim=1)).sum(1).mean()


def co_tuning_loss_and_feature_grad(features: Tensor, target_labels: Tensor, rel: Tensor, alpha: float,
                                    source_head: nn.Module) -> tuple[Tensor, Tensor]:
    """:func:`co_tuning_loss` of ``source_head(features)`` and its gradient with respect to ``features``
    (float32, ``features``' shape), from a small graph of the source head alone: a gradient hook that adds it to
    the gradient flowing into ``features`` puts the loss into the main backward (the source head stays fixed:
    no gradient reaches its parameters).

    Example::

        >>> head = torch.nn.Linear(3, 2)
        >>> value, grad = co_tuning_loss_and_feature_grad(torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
        ...                                               torch.tensor([[0.5, 0.5]]), 1.0, head)
        >>> grad.shape
        torch.Size([4, 3])
    """
    x = features.detach().float().requires_grad_(True)
    with torch.enable_grad():
        value = co_tuning_loss(source_head(x), target_labels, rel, alpha)
        (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad
