"""WiSE-FT: evaluate interpolations between the pre-trained and the fine-tuned weights, keep the best."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor

from lightning_transfer.callbacks.weight_space import WeightSpaceSelection
from lightning_transfer.functional.interpolation import interpolate

__all__ = ["WiSEFT"]


class WiSEFT(WeightSpaceSelection):
    """Weight-space ensembles of the pre-trained and the fine-tuned model (Wortsman et al., CVPR 2022).

    At fit start ``w0`` (the weights then: pre-trained, after any loading) is kept. When training ends the
    interpolations ``(1 − a)·w0 + a·w_ft`` are evaluated for every ``a`` of ``alphas``: accuracy
    (``argmax(logits) == labels``) on the whole validation loader of the fit (see
    :func:`~lightning_transfer.batches.val_loader_of`). The model is left at the best ``a``
    (``select="best"``, ties go to the larger ``a``) or at the fine-tuned weights (``select="finetuned"``).
    The curve is kept in :attr:`curve` and :attr:`best_alpha`, put in ``trainer.callback_metrics`` and
    written to the Trainer's loggers as ``wise_ft/val_acc_a0.50``, ..., ``wise_ft/best_alpha`` (Lightning
    forbids ``self.log`` in ``on_train_end``). With ``every_validation`` the curve is also evaluated at each
    validation epoch end and logged there with ``pl_module.log``; training continues from ``w_ft``, bit
    for bit as without the callback (weights, BatchNorm statistics, modes and RNG are restored).

    The new head has no pre-trained value: by default every interpolation keeps the fine-tuned head
    (``a`` mixes the transferred weights only). With ``interpolate_head=True`` the head is interpolated
    toward its value at fit start: meaningful when that head was already trained (the linear probe of an
    LP-FT run done as two fits, a zero-shot head), not for a random one. Buffers other than BatchNorm
    statistics keep their fine-tuned values. Parameters frozen by you (outside any
    :class:`~lightning_transfer.FreezeSchedule`) never move and are neither copied nor interpolated; one thawed
    by hand during the fit is an error at its first step. Where the model has BatchNorm, each interpolated model's
    statistics are re-estimated on the training loader (exact averages, in the modules' training modes;
    :mod:`lightning_transfer.batchnorm`); candidates not chosen leave no trace.

    LoRA adapters of a peft model (``W0 + s·B@A``) are interpolated as updates: ``A`` stays fine-tuned and
    ``B ← a·B_ft``, exactly ``W0 + a·(s·B_ft@A_ft − s·B0@A0)`` for adapters that start with ``B0@A0 = 0`` (peft's
    default ``init_lora_weights=True``); any other start is refused at setup (interpolating ``A`` and ``B``
    apart would miss the interpolated update). DoRA layers are refused too.

    With an :class:`~lightning_transfer.L2SP` callback in the Trainer, its anchors serve as ``w0`` for the
    parameters it anchors (one copy of ``w0``; ``anchor_dtype="bfloat16"`` then rounds ``w0``), and only
    the rest is copied. ``w0`` is saved in checkpoints and restored on resume, so a resumed run
    interpolates toward the pre-trained weights, not the resume point. Under DDP every rank evaluates its
    share of the validation batches and the counts are summed, so all ranks choose the same ``a`` and
    stay identical (re-estimated statistics are broadcast from rank 0). Under FSDP2 (``ModelParallelStrategy``)
    ``w0`` is kept as local shards and every candidate is formed shard by shard and evaluated with the sharded
    forward, every rank running every validation batch (:mod:`~lightning_transfer.callbacks.weight_space`).
    Checkpoints written during training hold ``w_ft``; save one after fit for the selected model.

    With Lightning's weight averaging (``EMAWeightAveraging``, ``WeightAveraging``) in the Trainer, ``w_ft``
    is the averaged model, whatever the order of the callbacks: the curve interpolates between ``w0`` and
    the average (at train end, and with ``every_validation`` between ``w0`` and the average that the
    validation loop just measured), and the model is left at the chosen interpolation (``select="finetuned"``:
    at the average). The chosen weights are also written into the averaging's copy, so the averaging's own
    ``on_train_end``, when listed after WiSEFT, leaves them in place, and a checkpoint saved after fit
    (whose ``state_dict`` is the average) holds them. More than one weight-averaging callback is an error.

    Args:
        alphas: Interpolation coefficients in ``[0, 1]`` (distinct); default ``0, 0.1, ..., 1``.
        select: ``"best"`` (leave the model at the best ``a``) or ``"finetuned"`` (only measure).
        every_validation: Also evaluate the curve at each validation epoch end.
        head: Dotted name of the new head; auto-detected by default.
        interpolate_head: Interpolate the head toward its value at fit start instead of keeping it fine-tuned.
        bn_batches: At most this many training batches per BatchNorm re-estimation (``None``: all).
        val_batches: At most this many validation batches per evaluation (``None``: all).

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> wise = WiSEFT(alphas=[0.0, 0.5, 1.0])
        >>> trainer = Trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[wise],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data, data)  # the model ends at the best a
        >>> sorted(wise.curve), wise.best_alpha in wise.curve
        ([0.0, 0.5, 1.0], True)
    """

    owner = "WiSEFT"
    prefix = "wise_ft"

    def __init__(
        self,
        alphas: list[float] | None = None,
        select: Literal["best", "finetuned"] = "best",
        every_validation: bool = False,
        head: str | None = None,
        interpolate_head: bool = False,
        bn_batches: int | None = None,
        val_batches: int | None = None,
    ) -> None:
        super().__init__(alphas, select, every_validation, head, interpolate_head, bn_batches, val_batches)

    def _candidate(self, w0: Mapping[str, Tensor], w_ft: Mapping[str, Tensor], a: float) -> dict[str, Tensor]:
        return interpolate(w0, w_ft, a, low_rank=self._low_rank)
