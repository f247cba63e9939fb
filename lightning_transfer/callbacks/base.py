"""Shared plumbing of the callbacks: parameter selection and gradient contribution."""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_transfer.anatomy import AnatomyError, find_head, plain_name
from lightning_transfer.callbacks.freeze import FreezeSchedule
from lightning_transfer.functional.sharding import is_sharded, local
from lightning_transfer.optim import norm_and_bias_ids

__all__ = [
    "GradientRegularizer", "add_to_grads", "carried_grad_scale", "check_one_optimizer_per_parameter",
    "check_still_frozen", "is_logging_step", "local_grads", "movable_parameters", "optimizer_param_ids",
    "select_parameters",
]

NamedParams = list[tuple[str, torch.nn.Parameter]]


def select_parameters(
    pl_module: torch.nn.Module,
    head: str | None = None,
    exclude: Sequence[str] = (),
    include_norm_and_bias: bool = True,
) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]], str]:
    """Split a model's parameters into (transferred, head, head name).

    ``exclude`` entries are regexes searched in parameter names; one that matches nothing is an error
    that lists parameter names, so a typo never silently regularizes everything.
    """
    head_name, head_module = find_head(pl_module, head)
    head_ids = {id(p) for p in head_module.parameters()}
    named = list(pl_module.named_parameters())
    patterns = []
    for e in exclude:
        try:
            pattern = re.compile(e)
        except re.error as err:
            raise ValueError(f"exclude entry {e!r} is not a valid regex: {err}") from None
        if not any(pattern.search(n) or pattern.search(plain_name(n)) for n, _ in named):  # compiled: either name
            sample = ", ".join(plain_name(n) for n, _ in named[:8])
            raise AnatomyError(f"exclude entry {e!r} matches no parameter. Parameter names look like: {sample}, ...")
        patterns.append(pattern)
    skip = set() if include_norm_and_bias else norm_and_bias_ids(pl_module)
    transferred = [
        (n, p) for n, p in named
        if id(p) not in head_ids and id(p) not in skip
        and not any(pt.search(n) or pt.search(plain_name(n)) for pt in patterns)
    ]
    head_params = [(n, p) for n, p in named if id(p) in head_ids]
    return transferred, head_params, head_name


def movable_parameters(
    trainer: Trainer, named: Sequence[tuple[str, torch.nn.Parameter]]
) -> tuple[NamedParams, NamedParams]:
    """Split ``named`` into the parameters that can move in this fit and those that cannot.

    Movable: ``requires_grad`` now (call it when fit starts, after every callback's ``setup``), or frozen by a
    :class:`~lightning_transfer.FreezeSchedule` of ``trainer`` whose schedule trains them at some depth;
    everything when ``trainer`` has one of Lightning's ``BaseFinetuning`` callbacks (which thaw by code). The
    rest were frozen by the user (a peft model's base weights, frozen embeddings) and keep their values:
    an anchor or a copy of them would cost memory for nothing. A callback that keeps per-parameter state
    for the movable ones only checks the others with :func:`check_still_frozen` at every step.
    """
    if any(isinstance(cb, BaseFinetuning) for cb in trainer.callbacks):  # Lightning's own unfreezing schedules:
        return list(named), []  # which parameters they thaw is in their code, not in their state
    scheduled: set[str] = set()
    for cb in trainer.callbacks:
        if isinstance(cb, FreezeSchedule):
            scheduled |= cb.may_train_names()
    movable = [(n, p) for n, p in named if p.requires_grad or n in scheduled]
    ids = {id(p) for _, p in movable}
    return movable, [(n, p) for n, p in named if id(p) not in ids]


def check_still_frozen(fixed: Sequence[tuple[str, torch.nn.Parameter]], owner: str, state: str, last_way: str) -> None:
    """Refuse parameters of ``fixed`` (frozen at fit start, outside any FreezeSchedule) that require grad now.

    ``owner`` keeps ``state`` (e.g. "the pre-trained anchor w0") only for the parameters that could move when
    fit started: one thawed by hand later would train without it. ``last_way``: the owner's own way out.
    """
    thawed = [n for n, p in fixed if p.requires_grad]
    if thawed:
        raise RuntimeError(
            f"{owner}: {len(thawed)} parameter(s) were frozen when fit started and require grad now (thawed by "
            f"hand?), e.g. {thawed[:5]}; {owner} keeps {state} only for parameters that could move at fit start, "
            "so these would train without it. Thaw them before fit, let a FreezeSchedule in the same Trainer "
            f"freeze and thaw them, {last_way}."
        )


def local_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """This rank's ``.grad`` of every parameter (its local shard under FSDP2), created as zeros where missing."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [local(p.grad) for p in params]


def add_to_grads(params: Sequence[Tensor], contributions: Sequence[Tensor], scale: Tensor | None = None) -> None:
    """``p.grad += scale·r`` for every pair, with one fused kernel per device/dtype group.

    ``r`` has the shape of this rank's part of ``p`` (its local shard when ``p`` is an FSDP2 DTensor).
    ``scale``: the factor the gradients still carry (:func:`carried_grad_scale`); ``None`` for 1.
    """
    existing_p, existing_r = [], []
    for p, r in zip(params, contributions):
        if p.grad is None and not is_sharded(p):
            p.grad = (r.clone() if scale is None else r * scale).to(p.dtype)
        else:
            g = local_grads([p])[0]
            existing_p.append(g)
            existing_r.append(r if r.dtype == g.dtype else r.to(g.dtype))
    if not existing_p:
        return
    if scale is None:
        torch._foreach_add_(existing_p, existing_r)
    else:
        torch._foreach_addcmul_(existing_p, existing_r, [scale] * len(existing_p))


def carried_grad_scale(trainer: Trainer, optimizer: Optimizer | None = None) -> Tensor | None:
    """The factor that ``.grad`` still carries in ``on_before_optimizer_step`` of ``optimizer``; ``None`` for 1.

    Lightning's 16-bit ``MixedPrecision`` unscales the gradients (``GradScaler.unscale_``) before that hook,
    except for an optimizer that unscales inside its own step (``fused=True`` Adam, AdamW, SGD: torch's
    ``_step_supports_amp_scaling``). There ``.grad`` is still multiplied by the scaler's current scale
    ``S``, the fused step divides everything in ``.grad`` by ``S``, and so whatever a callback adds to
    ``.grad`` must be multiplied by ``S`` too, or it is divided away. Returns ``S`` as the scaler's own
    0-d tensor (no host synchronization; read it before the step, which updates it in place), or ``None``
    when the gradients are unscaled (no scaler, bf16, or an optimizer that does not unscale itself).

    Args:
        trainer: The Trainer whose precision plugin holds the scaler.
        optimizer: The optimizer about to step (torch or ``LightningOptimizer``); ``None``: the Trainer's
            optimizers, which must then agree.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    optimizers = list(trainer.optimizers) if optimizer is None else [optimizer]
    unscale_themselves = {bool(getattr(getattr(o, "_optimizer", o), "_step_supports_amp_scaling", False))
                          for o in optimizers}
    if len(unscale_themselves) > 1:
        raise ValueError("Some optimizers unscale AMP gradients in their own step (fused=True) and others do not: "
                         "pass the optimizer about to step to tell which factor its gradients carry.")
    if unscale_themselves != {True}:
        return None
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
    return scale if scale is not None else torch.tensor(float(scaler.get_scale()))


def loss_factor(trainer: Trainer) -> float | Tensor:
    """What Lightning multiplies the loss by before backward: a GradScaler's scale ``S`` (a tensor, read without a
    host synchronization) over ``k = accumulate_grad_batches`` (automatic optimization only). A penalty whose
    gradient a hook adds inside the main backward (DELTA, BSS, Co-Tuning) is scaled by it, as in the loss."""
    k = trainer.accumulate_grad_batches if trainer.lightning_module.automatic_optimization else 1
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = scaler._scale if scaler is not None and scaler.is_enabled() else None
    return 1.0 / k if scale is None else scale / k


def is_logging_step(trainer: Trainer) -> bool:
    """Whether a value logged in this training step reaches the loggers (Lightning writes every
    ``log_every_n_steps``), or it is the first step (so that short runs have it in ``callback_metrics``):
    values that cost a pass over the parameters are computed on those steps only."""
    connector = getattr(trainer, "_logger_connector", None)
    written = bool(connector.should_update_logs) if connector is not None else False
    return written or trainer.global_step % max(1, trainer.log_every_n_steps) == 0


_PARAM_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def optimizer_param_ids(optimizer: Optimizer) -> set[int]:
    """``id`` of every parameter held by ``optimizer`` (a torch optimizer or a ``LightningOptimizer``).

    Cached per optimizer; the cache is rebuilt when the param groups change (``add_param_group``, a
    group's list replaced or resized), so it costs one pass over the groups per call, not over tensors.
    """
    key = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps the torch optimizer
    groups = optimizer.param_groups
    signature = tuple((id(g["params"]), len(g["params"])) for g in groups)
    cached = _PARAM_IDS.get(key)
    if cached is None or cached[0] != signature:
        cached = (signature, {id(p) for g in groups for p in g["params"]})
        _PARAM_IDS[key] = cached
    return cached[1]


def check_one_optimizer_per_parameter(
    optimizers: Iterable[Optimizer], named_params: Iterable[tuple[str, Tensor]], owner: str
) -> None:
    """Refuse a parameter held by two optimizers: its regularizer gradient would be applied twice."""
    optimizers = list(optimizers)
    if len(optimizers) < 2:
        return
    held = [optimizer_param_ids(opt) for opt in optimizers]
    shared = [n for n, p in named_params if sum(id(p) in ids for ids in held) > 1]
    if shared:
        raise ValueError(
            f"{owner}: parameter(s) {shared[:5]} are held by more than one optimizer, so each of their steps "
            f"would apply {owner}'s gradient more than once. Give every parameter to exactly one optimizer in "
            "configure_optimizers."
        )


class GradientRegularizer(Callback):
    """Base of callbacks that contribute a gradient ``r`` to each optimizer step.

    By default the callback adds ``r`` to ``.grad`` itself in ``on_before_optimizer_step``, which
    Lightning calls after gradient accumulation, AMP unscaling and the DDP all-reduce, and before
    gradient clipping and the optimizer. An optimizer that unscales inside its step (``fused=True``
    under a 16-bit GradScaler) gets ``S·r`` (see :func:`carried_grad_scale`), so its step applies ``r``.
    A :class:`~lightning_transfer.DTNH` callback takes the contribution over with :meth:`defer`: the
    regularizer then does nothing in its own hook and DTNH asks it for ``r`` with
    :meth:`regularizer_gradients`, so the order of callbacks does not matter.
    """

    def __init__(self) -> None:
        self._deferred_to: int | None = None
        self._backwards = 0  # backward passes since the last optimizer step (see window_scale)

    def defer(self, trainer: Trainer) -> None:
        """Hand ``r`` to another callback instead of adding it to ``.grad``, for fits of ``trainer``.

        Tied to the Trainer, so an instance reused with another Trainer (a notebook, a sweep) without
        DTNH adds its gradient again instead of silently doing nothing.
        """
        self._deferred_to = id(trainer)

    def is_deferred(self, trainer: Trainer) -> bool:
        return self._deferred_to == id(trainer)

    @property
    def contributes_gradient(self) -> bool:
        """Whether this regularizer acts through the gradient (``False`` e.g. for a decoupled pull)."""
        return True

    def regularizer_gradients(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``(params, r)`` for the current step of ``optimizer``: only parameters it holds (all when ``None``).

        Lightning calls ``on_before_optimizer_step`` once per optimizer (manual optimization with several
        optimizers), so restricting to the optimizer's parameters applies each ``r`` exactly once.
        """
        raise NotImplementedError

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._backwards += 1

    def unclaimed_states(self, trainer: Trainer, checkpoint: dict[str, Any], field: str) -> dict[str, dict] | None:
        """On a resume whose checkpoint holds no state under this instance's ``state_key`` (its arguments
        changed), the states of this class that no other instance in the Trainer claims and that hold
        ``field``: the candidates whose pre-trained anchors / reference this instance may adopt. ``None``
        when Lightning restores this instance's own state, or outside fitting."""
        states = checkpoint.get("callbacks") or {}
        if trainer.state.fn != TrainerFn.FITTING or self.state_key in states:
            return None
        prefix = type(self).__qualname__ + "{"
        claimed = {cb.state_key for cb in trainer.callbacks if type(cb) is type(self) and cb is not self}
        return {k: v for k, v in states.items() if isinstance(k, str) and k.startswith(prefix) and k not in claimed
                and isinstance(v, dict) and field in v}

    def window_scale(self, trainer: Trainer) -> float:
        """``m/k`` for an analytic ``r``, where ``m`` backward passes ran since the last step; resets ``m``.

        Lightning divides every micro-batch loss by ``k = accumulate_grad_batches``, so the task gradient
        of a window of ``m < k`` micro-batches (the last, partial window of an epoch) is scaled ``m/k``; a
        penalty in the loss would be too. Scaling ``r`` the same keeps "equals putting the penalty in the
        loss" exact. Manual optimization does not divide: 1.
        """
        m, self._backwards = self._backwards, 0
        k = trainer.accumulate_grad_batches
        if not trainer.lightning_module.automatic_optimization or k <= 1 or m <= 0 or m >= k:
            return 1.0
        return m / k

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self.is_deferred(trainer) or not self.contributes_gradient:
            return
        params, contributions = self.regularizer_gradients(trainer, pl_module, optimizer)
        add_to_grads(params, contributions, carried_grad_scale(trainer, optimizer))


def warn_weight_decay_on(trainer: Trainer, params: Sequence[Tensor], who: str) -> None:
    """Warn when the optimizer also decays parameters that ``who`` anchors (it moves the anchor)."""
    ids = {id(p) for p in params}
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            wd = group.get("weight_decay", 0.0)
            if wd and any(id(p) in ids for p in group["params"]):
                rank_zero_warn(
                    f"{who}: the optimizer applies weight_decay={wd} to anchored parameters (group "
                    f"{group.get('name', '?')!r}). Decay pulls them toward 0 while {who} pulls toward w0, "
                    f"which moves the effective anchor to α·w0/(α+λ). Set weight_decay=0 for those "
                    "parameters (e.g. TransferClassifier(weight_decay=0)) unless that is intended."
                )
                return
