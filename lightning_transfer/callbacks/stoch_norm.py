"""StochNorm: each BatchNorm channel normalizes with running or batch statistics at random while training."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_transfer.functional.stoch_norm import stoch_norm, stoch_norm_masks
from lightning_transfer.validation import check_int, check_number, check_strategy

__all__ = ["StochBatchNorm1d", "StochBatchNorm2d", "StochBatchNorm3d", "StochNorm"]


class _StochNormMixin:
    """The forward of a BatchNorm layer whose class :class:`StochNorm` swapped: with a mask set for this step
    (``stoch_mask``) and in training mode, :func:`~lightning_transfer.functional.stoch_norm.stoch_norm`;
    otherwise (eval mode, or no mask: a forward outside a training step) exactly BatchNorm's forward."""

    def forward(self, input: Tensor) -> Tensor:
        mask = self.__dict__.get("stoch_mask")
        if mask is None or not self.training:
            return super().forward(input)  # type: ignore[misc]
        self._check_input_dim(input)  # type: ignore[attr-defined]
        factor = self.momentum if self.momentum is not None else 0.0  # type: ignore[attr-defined]
        if self.num_batches_tracked is not None:  # type: ignore[attr-defined]
            self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
            if self.momentum is None:  # cumulative moving average, as BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
        return stoch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,  # type: ignore
                          mask, factor, self.eps)  # type: ignore[attr-defined]


class StochBatchNorm1d(_StochNormMixin, nn.BatchNorm1d):
    """A BatchNorm1d swapped in place by :class:`StochNorm` (same parameters, buffers and state_dict keys)."""


class StochBatchNorm2d(_StochNormMixin, nn.BatchNorm2d):
    """A BatchNorm2d swapped in place by :class:`StochNorm` (same parameters, buffers and state_dict keys)."""


class StochBatchNorm3d(_StochNormMixin, nn.BatchNorm3d):
    """A BatchNorm3d swapped in place by :class:`StochNorm` (same parameters, buffers and state_dict keys)."""


_SWAP: dict[type, type] = {nn.BatchNorm1d: StochBatchNorm1d, nn.BatchNorm2d: StochBatchNorm2d,
                           nn.BatchNorm3d: StochBatchNorm3d}


class StochNorm(Callback):
    """Stochastic normalization (Kou et al., "Stochastic Normalization", NeurIPS 2020).

    In training, every channel of every BatchNorm layer normalizes with the running statistics (probability
    ``p``) or with the batch's statistics, chosen anew for each training batch; the running statistics are
    updated as BatchNorm updates them. Running statistics carry the pre-trained model's statistics into the
    early steps, so a small target set overfits less. In eval mode a StochNorm layer *is* BatchNorm with
    running statistics.

    The swap: at fit start each ``nn.BatchNorm1d/2d/3d`` with running statistics gets its class changed in
    place to a subclass (:class:`StochBatchNorm2d`, ...) whose training forward is
    :func:`~lightning_transfer.functional.stoch_norm.stoch_norm`: the same module object, parameters, buffers
    and ``state_dict`` keys, so optimizers, DDP and checkpoints see nothing new and a checkpoint loads into the
    user's plain model. When fit ends the original classes are put back (the trained model is the user's
    plain model again, for export and inference; eval behaviour is identical either way). Layers in eval mode
    during training (frozen blocks of a FreezeSchedule) keep BatchNorm's eval forward.

    Randomness: the masks of a batch come from a torch generator seeded with ``(seed, epoch, batch index)``,
    drawn on the CPU (no global RNG consumed), so a resumed run draws what the uninterrupted one drew, every
    DDP rank draws the same, whatever the number of optimizers; each micro-batch of an accumulated step draws
    its own, as each forward does in the paper's code. ``seed=None`` takes one from
    torch's RNG at setup (broadcast from rank 0) and saves it in the checkpoint.

    Args:
        p: Probability that a channel uses the running statistics in a step (the paper's 0.5).
        seed: Seed of the masks; ``None`` draws one at setup.

    Example::

        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 3))
        >>> cb = StochNorm(p=0.5, seed=0)
        >>> trainer = Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
        >>> trainer.fit(TransferClassifier(net, num_classes=3), torch.utils.data.DataLoader(data, batch_size=8))
        >>> cb.num_layers, type(net[1]).__name__  # one layer swapped during fit, the plain class back after
        (1, 'BatchNorm1d')
    """

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        self.p = check_number("StochNorm", "p", p, minimum=0.0, maximum=1.0)
        self.seed = None if seed is None else check_int("StochNorm", "seed", seed, minimum=0)
        self._layers: list[tuple[nn.Module, type]] = []
        self.num_layers = 0  # how many BatchNorm layers the last fit swapped

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "StochNorm", sharded=True)
        if getattr(trainer.strategy, "_layer_sync", None) is not None:
            raise ValueError("StochNorm does not support Trainer(sync_batchnorm=True): SyncBatchNorm replaces the "
                             "swapped layers and normalizes with statistics of the global batch. Remove "
                             "sync_batchnorm, or StochNorm.")
        synced = [n for n, m in pl_module.named_modules() if isinstance(m, nn.SyncBatchNorm)]
        if synced:
            raise ValueError(f"StochNorm does not support SyncBatchNorm layers ({synced[:3]}): convert them back to "
                             "BatchNorm, or remove StochNorm.")
        self._restore()  # an instance reused for a second fit starts afresh
        for m in pl_module.modules():
            cls = _SWAP.get(type(m))
            if cls is not None and m.track_running_stats and m.running_mean is not None:
                self._layers.append((m, type(m)))
                m.__class__ = cls
        self.num_layers = len(self._layers)
        if not self._layers:
            rank_zero_warn("StochNorm found no BatchNorm layer with running statistics in the model: it changes "
                           "nothing (LayerNorm and GroupNorm have no running statistics). Remove StochNorm.")
        if self.seed is None:
            self.seed = int(trainer.strategy.broadcast(int(torch.randint(0, 2**31 - 1, ()).item()), src=0))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._layers:
            return
        assert self.seed is not None
        masks = stoch_norm_masks([m.num_features for m, _ in self._layers], self.p, self.seed,
                                 trainer.current_epoch, batch_idx)
        device = self._layers[0][0].running_mean.device
        flat = torch.cat(masks).to(device, non_blocking=True)
        for (m, _), mask in zip(self._layers, flat.split([len(x) for x in masks])):
            m.stoch_mask = mask
        pl_module.log("stochnorm/running_fraction", float(torch.cat(masks).float().mean()), on_step=True,
                      on_epoch=False)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for m, _ in self._layers:  # a forward outside a training step (BatchNorm re-estimation) is BatchNorm's
            m.__dict__.pop("stoch_mask", None)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def _restore(self) -> None:
        for m, cls in self._layers:
            m.__dict__.pop("stoch_mask", None)
            if type(m) is _SWAP[cls]:
                m.__class__ = cls
        self._layers = []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p, "seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
