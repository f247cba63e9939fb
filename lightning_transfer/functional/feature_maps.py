"""Feature-map distance used by DELTA-style regularization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["channel_attention", "feature_map_penalty", "resolve_channel_dim"]


def _weight_shape(weight: Tensor, shape: torch.Size, channel_dim: int, index: int) -> list[int]:
    """The shape that broadcasts per-channel weights along ``channel_dim`` of a ``shape`` feature map."""
    ndim = len(shape)
    if not -ndim < channel_dim < ndim or channel_dim % ndim == 0:
        raise ValueError(f"Feature map {index}: channel_dim={channel_dim} is not a non-batch dim of a {ndim}-D map {tuple(shape)}.")
    dim = channel_dim % ndim
    if weight.numel() != shape[dim]:
        raise ValueError(f"Feature map {index}: {weight.numel()} channel weights for dim {dim} of size {shape[dim]} "
                         f"(shape {tuple(shape)}): pass the channel_dim that holds the channels.")
    return [shape[dim] if d == dim else 1 for d in range(ndim)]


def feature_map_penalty(
    live: Sequence[Tensor],
    reference: Sequence[Tensor],
    alpha: float,
    weights: Sequence[Tensor] | None = None,
    channel_dim: int | Sequence[int] = 1,
) -> Tensor:
    """``α/2·Σ_layers mean_batch Σ_{c,...} a_c·(F − F0)²`` in float32, differentiable in ``live``.

    Args:
        live: Feature maps of the model being trained, batch first (``(B, C, H, W)``, ``(B, T, C)``, ...).
        reference: The same layers of the reference (pre-trained) model; no gradient flows into them.
        alpha: Strength.
        weights: Optional per-channel weights ``a`` (``(C,)`` per layer), e.g. DELTA's attention.
        channel_dim: The dim of each map that holds the channels the weights apply to: one int for all
            layers or one per layer (``1`` for ``(B, C, H, W)``, ``-1`` for ``(B, T, C)`` or channels-last).

    Example::

        >>> f, f0 = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
        >>> float(feature_map_penalty([f], [f0], alpha=1.0))
        24.0
    """
    dims = [channel_dim] * len(live) if isinstance(channel_dim, int) else list(channel_dim)
    if len(dims) != len(live):
        raise ValueError(f"channel_dim has {len(dims)} entries for {len(live)} feature maps.")
    total = torch.zeros((), dtype=torch.float32, device=live[0].device)
    for i, (f, f0) in enumerate(zip(live, reference)):
        if f.shape != f0.shape:
            raise ValueError(f"Feature map {i}: live shape {tuple(f.shape)} differs from reference {tuple(f0.shape)}.")
        sq = (f.float() - f0.detach().float()).square()
        if weights is not None:
            sq = sq * weights[i].float().reshape(_weight_shape(weights[i], f.shape, dims[i], i))
        total = total + sq.flatten(1).sum(1).mean()
    return 0.5 * alpha * total


def channel_attention(loss_increase: Tensor, temperature: float = 1.0) -> Tensor:
    """DELTA's channel weights from the loss increase of zeroing each channel: ``C·softmax(Δ/T)`` (mean 1).

    Example::

        >>> channel_attention(torch.zeros(4)).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    delta = loss_increase.float().flatten()
    return delta.numel() * torch.softmax(delta / temperature, dim=0)


def resolve_channel_dim(layer: nn.Module, shape: Sequence[int], channel_dim: int | None = None, name: str = "layer") -> int:
    """The (non-negative) dim of ``layer``'s ``shape`` output that holds its channels.

    ``channel_dim`` given: checked against the shape. Else 2-D → 1; 3-D ``(B, tokens, C)`` → 2; 4-D and
    more → 1 when the layer's last parametrized submodule is a conv/norm with ``shape[1]`` channels,
    the last dim when it is a Linear/LayerNorm with ``shape[-1]`` features; otherwise an error.

    Example::

        >>> resolve_channel_dim(torch.nn.Linear(8, 6), (2, 5, 6))  # (batch, tokens, channels)
        2
    """
    shape, ndim = tuple(shape), len(shape)
    if channel_dim is not None:
        if not -ndim < channel_dim < ndim or channel_dim % ndim == 0:
            raise ValueError(f"channel_dim={channel_dim} is not a non-batch dim of layer {name!r}'s output of "
                             f"shape {shape}.")
        return channel_dim % ndim
    if ndim < 2:
        raise ValueError(f"layer {name!r} outputs shape {shape}; feature maps must be (batch, channels, ...).")
    if ndim <= 3:
        return ndim - 1
    last = None
    for module in layer.modules():
        if next(module.parameters(recurse=False), None) is not None:
            last = module
    if isinstance(last, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        channels = getattr(last, "out_channels", None) or getattr(last, "num_features", None) or last.num_channels
        if channels == shape[1]:
            return 1
    if isinstance(last, (nn.Linear, nn.LayerNorm)):
        if (last.out_features if isinstance(last, nn.Linear) else last.normalized_shape[-1]) == shape[-1]:
            return ndim - 1
    raise ValueError(f"cannot tell which dim of layer {name!r}'s output {shape} holds the channels (its last "
                     f"parametrized module is {type(last).__name__}). Pass channel_dim=1 (channels first, (B, C, H, W)) "
                     "or channel_dim=-1 (channels last, (B, H, W, C)).")
