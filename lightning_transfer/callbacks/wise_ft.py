"""WiSE-FT: evaluate interpolations between the pre-trained and the fine-tuned weights, keep the best."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_transfer.anatomy import lora_factors
from lightning_transfer.batches import train_loader_of, val_loader_of
from lightning_transfer.batchnorm import batchnorm_state_kept, reestimate_batchnorm
from lightning_transfer.callbacks.base import check_still_frozen, movable_parameters, select_parameters
from lightning_transfer.callbacks.l2sp import L2SP
from lightning_transfer.functional.interpolation import check_low_rank_start, interpolate
from lightning_transfer.soup import count_correct, has_batchnorm
from lightning_transfer.validation import (
    check_choice,
    check_int,
    check_number,
    check_optional_str,
    check_strategy,
)
from lightning_transfer.weight_averaging import (
    adopt_average,
    average_in_model,
    find_weight_averaging,
    set_average,
)

__all__ = ["WiSEFT"]

_OWNER = "WiSEFT"
DEFAULT_ALPHAS = [i / 10 for i in range(11)]


def _alpha_name(a: float) -> str:
    return f"{a:.2f}" if round(a, 2) == a else f"{a:g}"


class WiSEFT(Callback):
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
    stay identical (re-estimated statistics are broadcast from rank 0). Checkpoints written during
    training hold ``w_ft``; save one after fit for the selected model.

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
        if alphas is None:
            alphas = list(DEFAULT_ALPHAS)
        if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence):
            raise TypeError(f"{_OWNER}: alphas must be a list of numbers in [0, 1], got {alphas!r}.")
        if not alphas:
            raise ValueError(f"{_OWNER}: alphas must not be empty; e.g. [0.0, 0.5, 1.0] (1.0 is the fine-tuned model).")
        self.alphas = [check_number(_OWNER, "alphas entries", a, minimum=0, maximum=1) for a in alphas]
        if len({_alpha_name(a) for a in self.alphas}) != len(self.alphas):
            raise ValueError(f"{_OWNER}: alphas must be distinct, got {self.alphas}.")
        self.select = check_choice(_OWNER, "select", select, ("best", "finetuned"))
        for name, flag in (("every_validation", every_validation), ("interpolate_head", interpolate_head)):
            if not isinstance(flag, bool):
                raise TypeError(f"{_OWNER}: {name} must be True or False, got {flag!r} ({type(flag).__name__}).")
        self.every_validation, self.interpolate_head = every_validation, interpolate_head
        self.head = check_optional_str(_OWNER, "head", head)
        self.bn_batches = None if bn_batches is None else check_int(_OWNER, "bn_batches", bn_batches, minimum=1)
        self.val_batches = None if val_batches is None else check_int(_OWNER, "val_batches", val_batches, minimum=1)
        self.curve: dict[float, float] = {}
        self.best_alpha: float | None = None
        self.history: list[dict[float, float]] = []  # one curve per validation (every_validation)
        self._own: dict[str, Tensor] = {}  # w0 of the parameters L2SP does not anchor
        self._l2sp: L2SP | None = None
        self._shared: list[str] = []  # names whose w0 is L2SP's anchor
        self._fixed: list[tuple[str, torch.nn.Parameter]] = []  # transferred, frozen by the user: no w0
        self._low_rank: list[tuple[str, str]] = []  # (A, B) names of LoRA factors
        self._loaded: dict[str, Any] | None = None
        self._missing_state = False
        self._modes: dict[str, bool] = {}  # module name -> training flag, as training uses them
        self._modes_fresh = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _OWNER, reason="it evaluates whole-model interpolations with full copies of w0")
        select_parameters(pl_module, self.head)  # an unknown head fails here
        self._low_rank = lora_factors(pl_module)  # DoRA fails here, and so does a LoRA start B0@A0 != 0
        if not trainer.ckpt_path:  # a resume checks the restored w0 at fit start
            check_low_rank_start(dict(pl_module.named_parameters()), self._low_rank, _OWNER)
        find_weight_averaging(trainer, _OWNER)  # two averages to choose between fail here
        if val_loader_of(trainer) is None:
            raise ValueError(f"{_OWNER} selects a on validation data, and this fit has none: give the DataModule or "
                             "the LightningModule a val_dataloader, or pass val_dataloaders to trainer.fit.")
        self._loaded, self._missing_state = None, False  # a resume restores the state after setup

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.state_key not in (checkpoint.get("callbacks") or {}):
            self._missing_state = True  # added on resume: only L2SP's restored anchors can tell w0

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        transferred, head_params, _ = select_parameters(pl_module, self.head)
        transferred, self._fixed = movable_parameters(trainer, transferred)  # what never moves needs no w0
        named = transferred + (head_params if self.interpolate_head else [])
        l2sp = next((cb for cb in trainer.callbacks if isinstance(cb, L2SP)), None)
        shared = set(l2sp.anchored_names(pl_module, trainer)) if l2sp is not None else set()
        self._shared = [n for n, _ in named if n in shared]
        self._l2sp = l2sp if self._shared else None
        own = [(n, p) for n, p in named if n not in shared]
        if self._loaded is not None:  # resume: w0 from the checkpoint, never from the resumed weights
            loaded, self._loaded = self._loaded["w0"], None
            missing = [n for n, _ in own if n not in loaded]
            if missing:
                raise KeyError(f"{_OWNER}: the checkpoint lacks w0 for {missing[:5]}: the run that saved it shared "
                               "them with an L2SP callback (keep that L2SP in the resumed run) or had another head "
                               "setting (interpolate_head).")
            self._own = {n: loaded[n].to(p.device, p.dtype, copy=True) for n, p in own}
        elif self._missing_state and own:
            raise ValueError(f"{_OWNER} was not in the run that saved this checkpoint, so w0 of {[n for n, _ in own][:5]} "
                             "is unknown (the resumed weights have moved). Resume without WiSEFT, or start a new fit "
                             "from the pre-trained weights.")
        else:
            self._own = {n: p.detach().clone() for n, p in own}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_low_rank_start(self.pretrained(), self._low_rank, _OWNER)  # w0 complete: L2SP's part too, or resumed

    def pretrained(self) -> dict[str, Tensor]:
        """``w0`` by parameter name: this callback's copies and, for what L2SP anchors, L2SP's own tensors."""
        anchors = self._l2sp.anchors if self._l2sp is not None else {}
        return {**self._own, **{n: anchors[n] for n in self._shared}}

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._modes_fresh = False

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        check_still_frozen(self._fixed, _OWNER, "the pre-trained weights w0", "or keep them frozen")
        if not self._modes_fresh:  # after every epoch-start change (FreezeSchedule puts frozen BN in eval)
            self._modes = {n: m.training for n, m in pl_module.named_modules()}
            self._modes_fresh = True

    def _set_training_modes(self, pl_module: LightningModule) -> None:
        pl_module.train()
        for name, module in pl_module.named_modules():
            module.training = self._modes.get(name, module.training)

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[float, float], dict]:
        """The curve, and each candidate's re-estimated BatchNorm statistics; the model is left as it was."""
        w0 = self.pretrained()
        params = dict(pl_module.named_parameters())
        w_ft = {n: params[n].detach().clone() for n in w0}
        batchnorm = has_batchnorm(pl_module)
        val, train = val_loader_of(trainer), train_loader_of(trainer) if batchnorm else None
        if batchnorm and train is None:
            raise ValueError(f"{_OWNER}: the model has BatchNorm, whose statistics are re-estimated for each "
                             "interpolation from the training loader, and none was found.")
        counts, stats = [], {}
        with torch.no_grad(), batchnorm_state_kept(pl_module), trainer.strategy.precision_plugin.forward_context():
            try:
                for a in self.alphas:
                    for n, v in interpolate(w0, w_ft, a, low_rank=self._low_rank).items():
                        params[n].copy_(v)
                    if train is not None:
                        self._set_training_modes(pl_module)
                        reestimate_batchnorm(pl_module, train, self.bn_batches)
                        stats[a] = self._bn_stats(trainer, pl_module)
                    counts.append(count_correct(pl_module.eval(), val, self.val_batches,
                                                trainer.global_rank, trainer.world_size))
            finally:
                for n, v in w_ft.items():
                    params[n].copy_(v)
        totals = trainer.strategy.reduce(torch.tensor(counts, dtype=torch.float64, device=pl_module.device),
                                         reduce_op="sum")
        if float(totals[0, 1]) == 0:
            raise ValueError(f"{_OWNER}: the validation loader yielded no examples.")
        return {a: float(c / t) for a, (c, t) in zip(self.alphas, totals.cpu().tolist())}, stats

    @staticmethod
    def _bn_stats(trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """Re-estimated statistics, made identical on every rank (rank 0's)."""
        out = {}
        for name, m in pl_module.named_modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
                for key in ("running_mean", "running_var"):
                    buf = getattr(m, key)
                    if trainer.world_size > 1 and torch.distributed.is_initialized():
                        torch.distributed.broadcast(buf, src=0)
                    out[f"{name}.{key}"] = buf.clone()
        return out

    @staticmethod
    def _best(curve: dict[float, float]) -> float:
        return max(curve, key=lambda a: (curve[a], a))

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.every_validation or trainer.sanity_checking:
            return
        with average_in_model(trainer, pl_module, find_weight_averaging(trainer, _OWNER), self):
            curve, _ = self._evaluate(trainer, pl_module)  # the weights this validation measured
        self.history.append(curve)
        for a, acc in curve.items():
            pl_module.log(f"wise_ft/val_acc_a{_alpha_name(a)}", acc)
        pl_module.log("wise_ft/best_alpha", self._best(curve))

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        averaging = find_weight_averaging(trainer, _OWNER)
        adopt_average(trainer, pl_module, averaging, self)  # w_ft: the average, whatever the callbacks' order
        self.curve, stats = self._evaluate(trainer, pl_module)
        self.best_alpha = self._best(self.curve)
        if self.select == "best":
            params = dict(pl_module.named_parameters())
            w0 = self.pretrained()
            with torch.no_grad():
                for n, v in interpolate(w0, {n: params[n].detach() for n in w0}, self.best_alpha,
                                        low_rank=self._low_rank).items():
                    params[n].copy_(v)
                buffers = dict(pl_module.named_buffers())
                for n, v in stats.get(self.best_alpha, {}).items():
                    buffers[n].copy_(v)
        set_average(pl_module, averaging)  # an averaging listed after WiSEFT then leaves the choice in place
        metrics = {f"wise_ft/val_acc_a{_alpha_name(a)}": acc for a, acc in self.curve.items()}
        metrics["wise_ft/best_alpha"] = self.best_alpha
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._loaded is not None:  # loaded, not yet applied by a fit
            return dict(self._loaded)
        return {"w0": {n: t.detach().cpu() for n, t in self._own.items()}, "shared_with_l2sp": list(self._shared)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
