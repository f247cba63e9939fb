"""Feature-map distance used by DELTA-style regularization."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "add_gradient_hooks", "channel_attention", "feature_map_penalty", "feature_map_penalty_grad", "gradient_reaches",
    "resolve_channel_dim",
]


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
    mask: Tensor | None = None,
) -> Tensor:
    """``α/2·Σ_layers mean_batch Σ_{c,...} a_c·(F − F0)²`` in float32, differentiable in ``live``.

    With a token ``mask`` (``(B, T)``, e.g. the batch's ``attention_mask``; non-zero marks a real token),
    every map whose first two dims are ``(B, T)`` (``(B, T, C)`` hidden states) counts the real tokens
    only: ``Σ_{t real} Σ_c a_c·(F − F0)²`` per example, then the mean over the batch, whatever the padding
    side and length (so padding a batch further changes nothing). Padding tokens contribute neither value
    nor gradient, even where a model's padded positions hold inf/NaN. Other maps (``(B, C)``, convolutional
    maps, a token count other than ``T``) are not masked.

    Args:
        live: Feature maps of the model being trained, batch first (``(B, C, H, W)``, ``(B, T, C)``, ...).
        reference: The same layers of the reference (pre-trained) model; no gradient flows into them.
        alpha: Strength.
        weights: Optional per-channel weights ``a`` (``(C,)`` per layer), e.g. DELTA's attention.
        channel_dim: The dim of each map that holds the channels the weights apply to: one int for all
            layers or one per layer (``1`` for ``(B, C, H, W)``, ``-1`` for ``(B, T, C)`` or channels-last).
        mask: Optional ``(B, T)`` token mask (see above).

    Example::

        >>> f, f0 = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
        >>> float(feature_map_penalty([f], [f0], alpha=1.0))
        24.0
        >>> h, mask = torch.ones(2, 3, 4), torch.tensor([[0, 1, 1], [1, 1, 1]])  # one left-padded example
        >>> float(feature_map_penalty([h], [torch.zeros(2, 3, 4)], alpha=1.0, mask=mask))  # (8 + 12) / 2 / 2
        5.0
    """
    dims = [channel_dim] * len(live) if isinstance(channel_dim, int) else list(channel_dim)
    if len(dims) != len(live):
        raise ValueError(f"channel_dim has {len(dims)} entries for {len(live)} feature maps.")
    if mask is not None and mask.ndim != 2:
        raise ValueError(f"mask must be (batch, tokens), got shape {tuple(mask.shape)}.")
    total = torch.zeros((), dtype=torch.float32, device=live[0].device)
    for i, (f, f0) in enumerate(zip(live, reference)):
        if f.shape != f0.shape:
            raise ValueError(f"Feature map {i}: live shape {tuple(f.shape)} differs from reference {tuple(f0.shape)}.")
        diff = f.float() - f0.detach().float()
        real = _token_mask_of(f, mask)
        if real is not None:
            diff = torch.where(real, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))  # not ·0: NaN·0
        sq = diff.square()
        if weights is not None:
            sq = sq * weights[i].float().reshape(_weight_shape(weights[i], f.shape, dims[i], i))
        total = total + sq.flatten(1).sum(1).mean()
    return 0.5 * alpha * total


def _token_mask_of(f: Tensor, mask: Tensor | None) -> Tensor | None:
    """``mask`` shaped to broadcast over ``f`` when ``f`` is a ``(B, T, ...)`` map of the mask's tokens, else ``None``."""
    if mask is None or f.ndim < 3 or tuple(f.shape[:2]) != tuple(mask.shape):
        return None
    return (mask != 0).to(f.device).reshape(*mask.shape, *[1] * (f.ndim - 2))


@torch.no_grad()
def feature_map_penalty_grad(
    live: Sequence[Tensor],
    reference: Sequence[Tensor],
    alpha: float,
    weights: Sequence[Tensor] | None = None,
    channel_dim: int | Sequence[int] = 1,
    mask: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """:func:`feature_map_penalty` and its gradient with respect to each live map, in closed form.

    ``∂P/∂F = α·a_c·(F − F0)/B`` on the positions the penalty counts (0 on padding tokens), in float32:
    what autograd of :func:`feature_map_penalty` gives, without a graph. A gradient hook that adds it to
    the gradient flowing into ``F`` puts the penalty into the main backward pass (see
    :func:`add_gradient_hooks`). Same arguments and checks as :func:`feature_map_penalty`.

    Returns:
        ``(value, grads)``: the float32 penalty and one float32 tensor per live map (its shape).

    Example::

        >>> value, (g,) = feature_map_penalty_grad([torch.ones(2, 3)], [torch.zeros(2, 3)], alpha=1.0)
        >>> round(float(value), 4), g[0].tolist()  # 1/2 * (3 + 3) / 2; 1 * 1 / 2
        (1.5, [0.5, 0.5, 0.5])
    """
    dims = [channel_dim] * len(live) if isinstance(channel_dim, int) else list(channel_dim)
    if len(dims) != len(live):
        raise ValueError(f"channel_dim has {len(dims)} entries for {len(live)} feature maps.")
    if mask is not None and mask.ndim != 2:
        raise ValueError(f"mask must be (batch, tokens), got shape {tuple(mask.shape)}.")
    total = torch.zeros((), dtype=torch.float32, device=live[0].device)
    grads = []
    for i, (f, f0) in enumerate(zip(live, reference)):
        if f.shape != f0.shape:
            raise ValueError(f"Feature map {i}: live shape {tuple(f.shape)} differs from reference {tuple(f0.shape)}.")
        diff = f.detach().float() - f0.detach().float()
        real = _token_mask_of(f, mask)
        if real is not None:  # not ·0: a padded position may hold inf/NaN
            diff = torch.where(real, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
        if weights is None:
            total += torch.linalg.vector_norm(diff).square() / f.shape[0]
            grad = diff
        else:
            grad = diff * weights[i].float().reshape(_weight_shape(weights[i], f.shape, dims[i], i))
            total += (grad * diff).sum() / f.shape[0]
        grads.append(grad.mul_(alpha / f.shape[0]))
    return 0.5 * alpha * total, grads


def add_gradient_hooks(
    tensors: Sequence[Tensor], grads: Sequence[Tensor], factor: Callable[[], float | Tensor], on_fire: Callable[[], None]
) -> list:
    """Make backward add ``factor()·grads[i]`` to the gradient flowing into ``tensors[i]``; returns the handles.

    ``factor`` is called when the gradient arrives (e.g. a GradScaler's current scale over the accumulation
    count); ``on_fire`` is called once per tensor when its hook runs. The addition is done in float32 and
    cast to the gradient's dtype (as autograd of a float32 penalty of a half-precision map would).
    """
    def hook_for(extra: Tensor):
        def hook(grad: Tensor | None) -> Tensor | None:
            on_fire()
            if grad is None:  # no gradient reaches this tensor in this backward: nothing to add it to
                return None
            c = factor()
            if grad.dtype == extra.dtype:
                return torch.add(grad, extra, alpha=c) if not isinstance(c, Tensor) else torch.addcmul(grad, extra, c)
            return grad + (extra * c).to(grad.dtype)

        return hook

    return [t.register_hook(hook_for(g)) for t, g in zip(tensors, grads)]


def gradient_reaches(output: Tensor, tensors: Sequence[Tensor]) -> list[bool]:
    """Whether a backward from ``output`` sends a gradient into each of ``tensors`` (one graph walk).

    A tensor is reached when an edge of ``output``'s autograd graph points at its slot (its ``grad_fn``
    and ``output_nr``): not so for an output of a compiled graph used only inside that graph, nor for a
    tensor the loss does not depend on, whose gradient hooks would then see no gradient.
    """
    wanted = {(t.grad_fn, t.output_nr) for t in tensors if t.grad_fn is not None}
    found: set = set()
    start = output.grad_fn
    stack, seen = ([start], {start}) if start is not None else ([], set())
    if start is not None and (start, output.output_nr) in wanted:
        found.add((start, output.output_nr))
    while stack and len(found) < len(wanted):
        node = stack.pop()
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            if (nxt, nr) in wanted:
                found.add((nxt, nr))
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return [t.grad_fn is not None and (t.grad_fn, t.output_nr) in found for t in tensors]


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
