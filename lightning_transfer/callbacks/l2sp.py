"""L2-SP and its family: pull transferred weights toward their pre-trained values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_transfer.callbacks.base import (
    GradientRegularizer,
    carried_grad_scale,
    check_one_optimizer_per_parameter,
    check_still_frozen,
    is_logging_step,
    local_grads,
    movable_parameters,
    optimizer_param_ids,
    select_parameters,
    warn_weight_decay_on,
)
from lightning_transfer.functional.fisher import load_fisher, match_fisher
from lightning_transfer.functional.penalties import NORMS, add_l2sp_grad_, sp_penalty_and_grad
from lightning_transfer.functional.sharding import (
    check_shardable,
    full_tensor,
    is_sharded,
    local,
    reduce_partial_sums,
    shard_like,
)
from lightning_transfer.functional.sp_updates import l2sp_grad_into_, l2sp_pull_
from lightning_transfer.validation import check_choice, check_number, check_strategy, check_strings

__all__ = ["L2SP"]

_PREFIX = {"l2": "l2sp", "l1": "l1sp", "group_lasso": "glsp"}


class L2SP(GradientRegularizer):
    """Explicit inductive bias toward the starting point (Li, Grandvalet & Davoine, ICML 2018).

    Adds the gradient of ``Ω(w) = α·P(w_S − w0_S) + β/2·‖w_head‖²`` to every optimizer step, where
    ``P`` is ``½‖·‖²`` (``norm="l2"``), ``‖·‖₁`` (``"l1"``) or the group lasso (``"group_lasso"``),
    optionally weighted by a diagonal Fisher. The gradient is analytic (no extra backward pass) and
    is added in ``on_before_optimizer_step``: after accumulation and AMP unscaling, before clipping (an
    optimizer that unscales in its own step, ``fused=True`` under a 16-bit GradScaler, gets it scaled
    like the gradients it unscales).
    The result equals putting ``Ω`` in the loss of every micro-batch, also on a last accumulation window
    shorter than ``accumulate_grad_batches`` (``r`` is scaled like the task gradient there) and with
    several optimizers (each optimizer's step gets ``r`` of its own parameters only).

    ``w0`` is an fp32 detached copy of the transferred parameters taken when fit starts (after weights
    are loaded), of those that can move only: trainable then, or frozen by a
    :class:`~lightning_transfer.FreezeSchedule` of the Trainer that will train them. Parameters frozen by
    you (a peft LoRA model's base weights, frozen embeddings) never move and get no anchor; one of them
    thawed by hand during the fit is an error at its first step (it would train unregularized). ``w0`` is
    saved in checkpoints and restored on resume, never re-taken from resumed weights, even when the resumed run changes L2SP's arguments (e.g. another ``alpha``). Adding L2SP only on
    resume is an error: the pre-trained anchors are not in the checkpoint.

    Args:
        alpha: Strength on the transferred parameters (the authors used 0.1 and, in their PyTorch
            code, 0.01).
        beta: Plain L2 strength on the new head (authors: 0.01).
        norm: ``"l2"``, ``"l1"`` or ``"group_lasso"`` (one group per output channel/unit).
        fisher: Path of a diagonal Fisher saved by :func:`lightning_transfer.functional.save_fisher`
            (L2-SP-Fisher / GL-SP-Fisher), or ``None``.
        head: Dotted name of the new head; auto-detected by default.
        exclude: Regexes of parameter names left out of the penalty.
        include_norm_and_bias: Also anchor norm-layer and bias tensors (as the authors' PyTorch code).
        decoupled: Pull ``w ← w − lr·α·(w − w0)`` beside the optimizer step (AdamW-style: on the weights
            before the step) instead of adding the gradient; useful with Adam, whose scaling otherwise
            distorts the penalty. For the default norm without Fisher it is one ``_foreach_lerp_`` toward
            ``w0`` (12 bytes per fp32 parameter).
        anchor_dtype: ``"float32"`` or ``"bfloat16"`` (halves the memory of ``w0``).
        fused: Worth it only for long CPU runs whose steps are short next to a pass over the parameters:
            the default eager kernel costs about 1.5 passes more than the floor (1–3 % of a ResNet-18 CPU
            step), and this ``torch.compile``-d kernel reaches the floor (one read of w, w0, g and one write
            of g) after about 20 s of compilation on the first step; it applies to the default norm, coupled,
            without Fisher, and falls back to eager with a warning (also under sharded training).

    Sharded training (FSDP2, ``ModelParallelStrategy`` with ``fully_shard``): every rank keeps the
    anchors (and Fisher) of its own shards only (1/N of the model), the penalty and its gradient are
    computed on local shards (group-lasso rows lie within a dim-0 shard) and the logged value is
    summed over ranks with one all-reduce. Checkpoints hold the full anchors (gathered when saved).

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> trainer = Trainer(max_epochs=1, callbacks=[L2SP(alpha=0.01, beta=0.01)],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data)
        >>> float(trainer.callback_metrics["l2sp/penalty"]) > 0  # the weights moved away from w0
        True
    """

    def __init__(
        self,
        alpha: float = 0.01,
        beta: float = 0.01,
        norm: Literal["l2", "l1", "group_lasso"] = "l2",
        fisher: str | None = None,
        head: str | None = None,
        exclude: list[str] | None = None,
        include_norm_and_bias: bool = True,
        decoupled: bool = False,
        anchor_dtype: Literal["float32", "bfloat16"] = "float32",
        fused: bool = False,
    ) -> None:
        super().__init__()
        alpha = check_number("L2SP", "alpha", alpha, minimum=0)
        beta = check_number("L2SP", "beta", beta, minimum=0)
        check_choice("L2SP", "norm", norm, NORMS)
        check_choice("L2SP", "anchor_dtype", anchor_dtype, ("float32", "bfloat16"))
        for name, flag in (("include_norm_and_bias", include_norm_and_bias), ("decoupled", decoupled), ("fused", fused)):
            if not isinstance(flag, bool):
                raise TypeError(f"L2SP: {name} must be True or False, got {flag!r} ({type(flag).__name__}).")
        for name, text in (("fisher", fisher), ("head", head)):
            if text is not None and not isinstance(text, str):
                raise TypeError(f"L2SP: {name} must be a string or None, got {text!r} ({type(text).__name__}).")
        exclude = check_strings("L2SP", "exclude", exclude) if exclude is not None else []
        if fisher is not None and not Path(fisher).is_file():
            raise FileNotFoundError(f"L2SP: Fisher file {fisher!r} does not exist. Save one with "
                                    "lightning_transfer.functional.save_fisher.")
        self.alpha, self.beta, self.norm, self.fisher_path = alpha, beta, norm, fisher
        self.head, self.exclude = head, exclude
        self.include_norm_and_bias, self.decoupled = include_norm_and_bias, decoupled
        self.anchor_dtype = getattr(torch, anchor_dtype)
        self.fused = fused
        self.prefix = _PREFIX[norm]
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._anchors: list[Tensor] = []
        self._fisher: list[Tensor] | None = None
        self._head_params: list[torch.nn.Parameter] = []
        self._fixed: list[tuple[str, torch.nn.Parameter]] = []  # transferred, frozen by the user: no anchor
        self._loaded: dict[str, Tensor] | None = None
        self._workspace: dict = {}  # scratch buffer of the fused CPU path
        self._r_buffers: dict[int, Tensor] = {}  # r handed to DTNH, by parameter id (kept: no allocation per step)
        self._sharded = False  # parameters are FSDP2 DTensors: anchors hold local shards
        self._started = False  # on_fit_start ran in this fit (sharded strategies restore state after it)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, beta=self.beta, norm=self.norm, head=self.head,
                                        exclude=self.exclude)

    @property
    def contributes_gradient(self) -> bool:
        return not self.decoupled

    @property
    def anchors(self) -> dict[str, Tensor]:
        """``w0`` by parameter name (this rank's shard of it under sharded training)."""
        return dict(zip(self._names, self._anchors))

    def anchored_names(self, pl_module: torch.nn.Module, trainer: Trainer | None = None) -> list[str]:
        """Names of the parameters whose ``w0`` this callback keeps (those ``on_fit_start`` anchors), so that
        another callback (:class:`~lightning_transfer.WiSEFT`) can share :attr:`anchors` instead of copying.

        Call it when fit starts, in either order with this callback's ``on_fit_start``. ``trainer``: the
        Trainer of the fit (by default ``pl_module.trainer``), whose FreezeSchedule tells what may train.
        """
        transferred, _, _ = select_parameters(pl_module, self.head, self.exclude, self.include_norm_and_bias)
        trainer = trainer if trainer is not None else pl_module.trainer
        return [n for n, _ in movable_parameters(trainer, transferred)[0]]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # validate names and the Fisher file before any step
            check_strategy(trainer, type(self).__name__, sharded=True)
            self._started = False
            self._loaded = None  # a resume restores it after setup; a new fit takes w0 afresh
            transferred, _, _ = select_parameters(pl_module, self.head, self.exclude, self.include_norm_and_bias)
            if self.fisher_path is not None:
                match_fisher(load_fisher(self.fisher_path), transferred)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        transferred, head_params, _ = select_parameters(pl_module, self.head, self.exclude, self.include_norm_and_bias)
        transferred, self._fixed = movable_parameters(trainer, transferred)  # no anchor for what never moves
        self._names = [n for n, _ in transferred]
        self._params = [p for _, p in transferred]
        self._head_params = [p for _, p in head_params]
        self._r_buffers = {}
        check_one_optimizer_per_parameter(trainer.optimizers, transferred + head_params, type(self).__name__)
        check_shardable(transferred + head_params, type(self).__name__)
        self._sharded = any(is_sharded(p) for p in self._params + self._head_params)
        if self._sharded and self.fused:
            rank_zero_warn("L2SP(fused=True) runs the eager kernel under sharded training (on local shards).")
        if self._loaded is not None:  # resume: w0 comes from the checkpoint, never from resumed weights
            self._apply_loaded()
        else:  # this rank's shard only under FSDP2
            self._anchors = [local(p).detach().to(self.anchor_dtype, copy=True) for p in self._params]
        if self.fisher_path is not None:
            fisher = match_fisher(load_fisher(self.fisher_path), transferred)
            self._fisher = [shard_like(f.to(torch.float32), p).to(p.device) for f, p in zip(fisher, self._params)]
        if not self.decoupled:
            warn_weight_decay_on(trainer, self._params, type(self).__name__)
        self._started = True

    def _apply_loaded(self) -> None:
        """Anchors from the loaded (full) ``w0``: each rank keeps the shard of its parameters."""
        loaded, self._loaded = self._loaded, None
        missing = [n for n in self._names if n not in loaded]
        if missing:
            raise KeyError(f"{type(self).__name__} state in the checkpoint lacks w0 for {missing[:5]}: it was saved from another "
                           "model, or with fewer anchored parameters (a larger exclude, include_norm_and_bias=False).")
        self._anchors = [shard_like(loaded[n].to(p.device), p).to(self.anchor_dtype, copy=True)
                         for n, p in zip(self._names, self._params)]

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._started = False

    def _active(self, ids: set[int] | None) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None, list[Tensor]]:
        """Trainable (transferred, anchors, Fisher, head) tensors, restricted to the ids of one optimizer."""
        idx = [i for i, p in enumerate(self._params) if p.requires_grad and (ids is None or id(p) in ids)]
        head = [p for p in self._head_params if p.requires_grad and (ids is None or id(p) in ids)]
        if len(idx) == len(self._params):
            return self._params, self._anchors, self._fisher, head
        fisher = [self._fisher[i] for i in idx] if self._fisher is not None else None
        return [self._params[i] for i in idx], [self._anchors[i] for i in idx], fisher, head

    def _terms(
        self, compute_value: bool, ids: set[int] | None = None, scale: float = 1.0
    ) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """``(params, scale·r, value)`` of the penalty α·P on transferred tensors + β/2·‖·‖² on the head."""
        params, anchors, fisher, head = self._active(ids)
        value, grads = sp_penalty_and_grad([local(p) for p in params], anchors, self.alpha * scale, self.norm, fisher,
                                           compute_value=compute_value)
        params = list(params)
        if self.beta > 0 and head:
            head_value, head_grads = sp_penalty_and_grad([local(p) for p in head], None, self.beta * scale, "l2",
                                                         compute_value=compute_value)
            params, grads = params + head, grads + head_grads
            value = value + head_value if compute_value else None
        if compute_value:  # local partial sums under sharding: one all-reduce
            value = reduce_partial_sums(value.float().reshape(1), self._params + self._head_params)[0]
        return params, grads, (value / scale if compute_value else None)

    @staticmethod
    def _subset_ids(trainer: Trainer, optimizer: Optimizer | None) -> set[int] | None:
        """Ids of the parameters of ``optimizer`` when there are several optimizers, else ``None`` (all)."""
        return None if optimizer is None or len(trainer.optimizers) < 2 else optimizer_param_ids(optimizer)

    def _log_penalty(self, pl_module: LightningModule, value: Tensor | None) -> None:
        """Log the penalty; ``None``: one of several optimizers' parts, so compute the whole penalty."""
        if value is None:
            value = self._terms(compute_value=True)[2]
        pl_module.log(f"{self.prefix}/penalty", value, on_step=True, on_epoch=False)

    @override
    def regularizer_gradients(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``(params, r)``; for the default norm without Fisher, ``r`` lies in buffers this callback keeps (no
        allocation per step), valid until its next call."""
        ids = self._subset_ids(trainer, optimizer)
        log_now = self._log_now(trainer)
        if self.norm == "l2" and self._fisher is None:
            params, grads, value = self._buffered_terms(log_now and ids is None, ids, self.window_scale(trainer))
        else:
            params, grads, value = self._terms(log_now and ids is None, ids, self.window_scale(trainer))
        if log_now:
            self._log_penalty(pl_module, value)
        return params, grads

    def _buffered_terms(self, compute_value: bool, ids: set[int] | None, scale: float
                        ) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """:meth:`_terms` of the default norm, with ``r`` written into per-parameter buffers kept across steps."""
        params, anchors, _, head = self._active(ids)
        head = head if self.beta > 0 else []
        out = [self._r_buffers.get(id(p)) for p in [*params, *head]]
        for i, p in enumerate([*params, *head]):
            if out[i] is None:
                out[i] = self._r_buffers[id(p)] = torch.empty_like(local(p))
        n = len(params)
        parts = [l2sp_grad_into_(out[:n], [local(p) for p in params], anchors, self.alpha * scale, compute_value),
                 l2sp_grad_into_(out[n:], [local(p) for p in head], None, self.beta * scale, compute_value)]
        value = None
        if compute_value:  # local partial sums under sharding: one all-reduce
            value = sum((v.float() for v in parts if v is not None), torch.zeros(())).reshape(1)
            value = reduce_partial_sums(value, self._params + self._head_params)[0] / scale
        return [*params, *head], out, value

    def _pull(self, optimizer: Optimizer, compute_value: bool) -> Tensor | None:
        """Decoupled default norm: ``w ← w − lr·α·(w − w0)`` as a ``_foreach_lerp_`` toward ``w0`` per learning
        rate (``w ← (1 − lr·β)·w`` on the head), on this optimizer's parameters; the penalty before the pull."""
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        params, anchors, _, head = self._active(set(lr_of))
        groups: dict[tuple[float, bool], tuple[list[Tensor], list[Tensor]]] = {}
        for p, a in zip(params, anchors):
            ps, w0s = groups.setdefault((lr_of[id(p)], True), ([], []))
            ps.append(local(p))
            w0s.append(a)
        for p in head if self.beta > 0 else []:
            groups.setdefault((lr_of[id(p)], False), ([], []))[0].append(local(p))
        total = torch.zeros(())
        for (lr, anchored), (ps, w0s) in groups.items():
            strength = self.alpha if anchored else self.beta
            part = l2sp_pull_(ps, w0s if anchored else None, lr * strength, compute_value, self._workspace)
            if part is not None:
                total = total + strength * part.float()
        if not compute_value:
            return None
        return reduce_partial_sums(total.reshape(1), self._params + self._head_params)[0]

    def _log_now(self, trainer: Trainer) -> bool:
        """The penalty value costs a pass over w and w0: compute it on the steps the loggers record."""
        return is_logging_step(trainer)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        check_still_frozen(self._fixed, type(self).__name__, "the pre-trained anchor w0",
                           "or pass exclude=[...] to leave them out of L2SP knowingly")
        if self.is_deferred(trainer):
            return
        if not self.decoupled and self.norm == "l2" and self._fisher is None:  # fused in-place fast path
            ids = self._subset_ids(trainer, optimizer)
            params, anchors, _, head = self._active(ids)
            scale = self.window_scale(trainer)
            carried = carried_grad_scale(trainer, optimizer)  # a fused optimizer under a GradScaler: S, else None
            log_now = self._log_now(trainer)
            with_value = log_now and ids is None
            value = None
            for ps, w0, strength in ((list(params), anchors, self.alpha), (head if self.beta > 0 else [], None, self.beta)):
                if not ps:
                    continue
                # the compiled kernel specializes on the strength: a partial window (scale < 1) runs eager
                part = add_l2sp_grad_(local_grads(ps), [local(p) for p in ps], w0, strength * scale, with_value,
                                      self._workspace, compiled=self.fused and scale == 1.0 and not self._sharded,
                                      grad_scale=carried)
                if part is not None:
                    value = part / scale if value is None else value + part / scale
            if value is not None and self._sharded:  # local partial sums: one all-reduce
                value = reduce_partial_sums(value.float().reshape(1), self._params + self._head_params)[0]
            if log_now:
                self._log_penalty(pl_module, value)
            return
        if not self.decoupled:
            return super().on_before_optimizer_step(trainer, pl_module, optimizer)
        single, log_now = len(trainer.optimizers) < 2, self._log_now(trainer)
        if self.norm == "l2" and self._fisher is None:
            value = self._pull(optimizer, log_now and single)
            if log_now:
                self._log_penalty(pl_module, value)
            return
        with torch.no_grad():  # decoupled: restricted to this optimizer's parameters through their lr
            lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
            params, pulls, value = self._terms(compute_value=log_now and single, ids=set(lr_of))
            by_lr: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
            for p, r in zip(params, pulls):
                ps, rs = by_lr.setdefault(lr_of[id(p)], ([], []))
                ps.append(p)
                rs.append(r)
            for lr, (ps, rs) in by_lr.items():
                torch._foreach_add_([local(p) for p in ps], rs, alpha=-lr)
        if log_now:
            self._log_penalty(pl_module, value)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the pre-trained anchors when a resume changes L2SP's arguments (hence its ``state_key``).

        Lightning restores callback state by ``state_key``, which holds ``alpha``, ``head``, ...: without
        this, a resume with another ``alpha`` would find no state and re-anchor on the resumed weights.
        """
        candidates = self.unclaimed_states(trainer, checkpoint, "anchors")
        if candidates is None:
            return  # Lightning hands our own state to load_state_dict
        if len(candidates) == 1:
            (key, state), = candidates.items()
            rank_zero_info(f"{type(self).__name__}: arguments changed since the checkpoint (saved as {key}, now {self.state_key}); "
                           "keeping its pre-trained anchors w0.")
            self.load_state_dict(state)
            return
        if candidates:
            raise ValueError(
                f"{type(self).__name__} {self.state_key} finds no state of its own in the checkpoint, and several L2SP states that "
                f"could be its: {sorted(candidates)}. Resume with the arguments of one of them (they name the "
                "state), or start a new fit without ckpt_path."
            )
        raise ValueError(
            "L2SP was not in the run that saved this checkpoint, so its pre-trained anchors w0 are unknown (the "
            "resumed weights have already moved). Either resume without L2SP, or load the weights you want to "
            "anchor on (e.g. LightningModule.load_from_checkpoint) and start a new fit without ckpt_path: L2SP "
            "anchors on the weights at fit start."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """The full ``w0`` (under sharding gathered from every rank's shard: all ranks call this)."""
        if self._loaded is not None:  # loaded, not yet applied by a fit
            return {"anchors": dict(self._loaded)}
        return {"anchors": {n: full_tensor(a.detach(), p).cpu() for n, a, p in zip(self._names, self._anchors, self._params)}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the loaded ``w0`` for ``on_fit_start``, or apply it now if that already ran.

        Sharded strategies (FSDP2) restore checkpoints after ``on_fit_start``, which has then anchored on
        the weights at fit start: the checkpoint's anchors replace those.
        """
        self._loaded = dict(state_dict["anchors"])
        if self._started:
            self._apply_loaded()
