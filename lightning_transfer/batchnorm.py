"""BatchNorm running statistics: re-estimate them from data, and put them back afterwards.

Early in fine-tuning the weights move faster than BatchNorm's exponential running averages follow,
so eval-mode accuracy understates how far training has come (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021, call the fix *precise BN*). :func:`reestimate_batchnorm` recomputes the statistics
of every BatchNorm layer that is in training mode as an exact average over a few batches; layers in
eval mode (frozen blocks) keep theirs, because training used those. :func:`batchnorm_state_kept`
restores the statistics, the layers' modes and the RNG afterwards, so an evaluation with re-estimated
statistics leaves the training run bit-for-bit as it would have been.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_transfer.batches import batch_inputs, call_model

__all__ = ["batchnorm_state_kept", "reestimate_batchnorm"]


@contextmanager
def batchnorm_state_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, change BatchNorm statistics freely; on exit they, every module's train/eval
    mode and the CPU and CUDA RNG states are as they were.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> with batchnorm_state_kept(net):
        ...     reestimate_batchnorm(net, [torch.randn(8, 3, 6, 6) + 2.0])  # one layer re-estimated
        ...     bool(net[1].running_mean.abs().sum() > 0)
        1
        True
        >>> float(net[1].running_mean.abs().sum())  # put back on exit
        0.0
    """
    saved = {
        m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    }
    modes = {m: m.training for m in model.modules()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield model
        finally:
            for m, (mean, var, count) in saved.items():
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
            for m, training in modes.items():
                m.training = training


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Replace the running statistics of every training-mode BatchNorm layer with the exact mean and
    (unbiased) variance of its input over all samples in ``batches`` (bare inputs, ``(inputs, ...)``
    tuples or dicts, as :mod:`lightning_transfer.batches` reads them), as seen by the model in its
    current modes. Every sample counts equally, whatever the batch sizes (PyTorch's ``momentum=None``
    average weights a last batch of 4 like one of 32). Eval-mode BatchNorm layers, and layers the forward
    pass never reaches (a frozen teacher or EMA copy registered beside the network), are left alone.
    Returns the number of re-estimated layers.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> batches = [(torch.randn(32, 3), 0), (torch.randn(4, 3), 0)]  # (inputs, labels) or bare inputs
        >>> reestimate_batchnorm(net, batches)
        1
        >>> features = torch.cat([net[0](x) for x, _ in batches])
        >>> torch.allclose(net[1].running_mean, features.mean(0), atol=1e-6)  # every sample counts equally
        True
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    if not layers:
        return 0
    sums: dict[nn.Module, list] = {m: [0, 0.0, 0.0] for m in layers}  # count, sum, sum of squares

    def accumulate(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        dims = [0, *range(2, x.dim())]
        acc = sums[module]
        acc[0] += x.numel() // x.shape[1]
        acc[1] = acc[1] + x.sum(dims)
        acc[2] = acc[2] + x.square().sum(dims)

    handles = [m.register_forward_pre_hook(accumulate) for m in layers]
    device = next(model.parameters()).device
    try:
        seen = 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            call_model(model, move_data_to_device(batch_inputs(batch), device))
            seen += 1
        if seen == 0:
            raise ValueError("reestimate_batchnorm got no batches; pass a non-empty loader.")
    finally:
        for h in handles:
            h.remove()
    reached = {m: acc for m, acc in sums.items() if acc[0] > 0}
    for m, (n, total, squares) in reached.items():
        mean = total / n
        var = (squares / n - mean.square()).clamp_min(0) * (n / max(n - 1, 1))
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return len(reached)
