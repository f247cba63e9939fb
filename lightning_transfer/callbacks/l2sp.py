"""L2-SP and its family: pull transferred weights toward their pre-trained values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_transfer.callbacks.base import GradientRegularizer, select_parameters, warn_weight_decay_on
from lightning_transfer.functional.fisher import load_fisher, match_fisher
from lightning_transfer.functional.penalties import NORMS, add_l2sp_grad_, sp_penalty_and_grad

__all__ = ["L2SP"]

_PREFIX = {"l2": "l2sp", "l1": "l1sp", "group_lasso": "glsp"}


class L2SP(GradientRegularizer):
    """Explicit inductive bias toward the starting point (Li, Grandvalet & Davoine, ICML 2018).

    Adds the gradient of ``Ω(w) = α·P(w_S − w0_S) + β/2·‖w_head‖²`` to every optimizer step, where
    ``P`` is ``½‖·‖²`` (``norm="l2"``), ``‖·‖₁`` (``"l1"``) or the group lasso (``"group_lasso"``),
    optionally weighted by a diagonal Fisher. The gradient is analytic (no extra backward pass) and
    is added in ``on_before_optimizer_step``: after accumulation and AMP unscaling, before clipping.
    The result equals putting ``Ω`` in the loss of every micro-batch.

    ``w0`` is an fp32 detached copy of the transferred parameters taken when fit starts (after weights
    are loaded); it is saved in checkpoints and restored on resume, never re-taken from resumed weights.

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
        decoupled: Pull ``w ← w − lr·α·(w − w0)`` beside the optimizer step (AdamW-style) instead of
            adding the gradient; useful with Adam, whose scaling otherwise distorts the penalty.
        anchor_dtype: ``"float32"`` or ``"bfloat16"`` (halves the memory of ``w0``).
        fused: Apply the default (``"l2"``, coupled, no Fisher) gradient with a ``torch.compile``-d
            kernel at the memory-traffic floor (one read of w, w0, g and one write of g); the first step
            pays the compilation (about 20 s on a 2-core CPU). Falls back to eager with a warning.

    Example::

        trainer = Trainer(callbacks=[L2SP(alpha=0.01, beta=0.01)])
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
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        if anchor_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"anchor_dtype must be 'float32' or 'bfloat16', got {anchor_dtype!r}.")
        if fisher is not None and not Path(fisher).is_file():
            raise FileNotFoundError(f"Fisher file {fisher!r} does not exist. Save one with lightning_transfer.functional.save_fisher.")
        self.alpha, self.beta, self.norm, self.fisher_path = alpha, beta, norm, fisher
        self.head, self.exclude = head, list(exclude or [])
        self.include_norm_and_bias, self.decoupled = include_norm_and_bias, decoupled
        self.anchor_dtype = getattr(torch, anchor_dtype)
        self.fused = fused
        self.prefix = _PREFIX[norm]
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._anchors: list[Tensor] = []
        self._fisher: list[Tensor] | None = None
        self._head_params: list[torch.nn.Parameter] = []
        self._loaded: dict[str, Tensor] | None = None
        self._workspace: dict = {}  # scratch buffer of the fused CPU path

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, beta=self.beta, norm=self.norm, head=self.head,
                                        exclude=self.exclude)

    @property
    def contributes_gradient(self) -> bool:
        return not self.decoupled

    @property
    def anchors(self) -> dict[str, Tensor]:
        """``w0`` by parameter name."""
        return dict(zip(self._names, self._anchors))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # validate names and the Fisher file before any step
            self._loaded = None  # a resume restores it after setup; a new fit takes w0 afresh
            transferred, _, _ = select_parameters(pl_module, self.head, self.exclude, self.include_norm_and_bias)
            if self.fisher_path is not None:
                match_fisher(load_fisher(self.fisher_path), transferred)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        transferred, head_params, _ = select_parameters(pl_module, self.head, self.exclude, self.include_norm_and_bias)
        self._names = [n for n, _ in transferred]
        self._params = [p for _, p in transferred]
        self._head_params = [p for _, p in head_params]
        if self._loaded is not None:  # resume: w0 comes from the checkpoint, never from resumed weights
            missing = [n for n in self._names if n not in self._loaded]
            if missing:
                raise KeyError(f"L2SP state in the checkpoint lacks w0 for {missing[:5]}; was it saved from another model?")
            self._anchors = [self._loaded[n].to(p.device, self.anchor_dtype) for n, p in transferred]
            self._loaded = None
        else:
            self._anchors = [p.detach().to(self.anchor_dtype, copy=True) for p in self._params]
        if self.fisher_path is not None:
            fisher = match_fisher(load_fisher(self.fisher_path), transferred)
            self._fisher = [f.to(p.device, torch.float32) for f, p in zip(fisher, self._params)]
        if not self.decoupled:
            warn_weight_decay_on(trainer, self._params, "L2SP")

    def _active(self) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        idx = [i for i, p in enumerate(self._params) if p.requires_grad]
        if len(idx) == len(self._params):
            return self._params, self._anchors, self._fisher
        fisher = [self._fisher[i] for i in idx] if self._fisher is not None else None
        return [self._params[i] for i in idx], [self._anchors[i] for i in idx], fisher

    def _terms(self, compute_value: bool) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """``(params, r, value)`` of the whole penalty: α·P on transferred tensors, β/2·‖·‖² on the head."""
        params, anchors, fisher = self._active()
        value, grads = sp_penalty_and_grad(params, anchors, self.alpha, self.norm, fisher, compute_value=compute_value)
        params = list(params)
        head = [p for p in self._head_params if p.requires_grad]
        if self.beta > 0 and head:
            head_value, head_grads = sp_penalty_and_grad(head, None, self.beta, "l2", compute_value=compute_value)
            params, grads = params + head, grads + head_grads
            value = value + head_value if compute_value else None
        return params, grads, value

    @override
    def regularizer_gradients(self, trainer: Trainer, pl_module: LightningModule) -> tuple[list[Tensor], list[Tensor]]:
        log_now = self._log_now(trainer)
        params, grads, value = self._terms(compute_value=log_now)
        if log_now:
            pl_module.log(f"{self.prefix}/penalty", value, on_step=True, on_epoch=False)
        return params, grads

    def _log_now(self, trainer: Trainer) -> bool:
        """The penalty value costs a pass over w and w0: compute it on the steps the loggers record."""
        return trainer.global_step % max(1, trainer.log_every_n_steps) == 0

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self.is_deferred(trainer):
            return
        if not self.decoupled and self.norm == "l2" and self._fisher is None:  # fused in-place fast path
            params, anchors, _ = self._active()
            params = list(params)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            log_now = self._log_now(trainer)
            value = add_l2sp_grad_([p.grad for p in params], params, anchors, self.alpha, log_now, self._workspace,
                                   compiled=self.fused)
            head = [p for p in self._head_params if p.requires_grad]
            if self.beta > 0 and head:
                for p in head:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                head_value = add_l2sp_grad_([p.grad for p in head], head, None, self.beta, log_now, self._workspace)
                value = head_value if value is None else value + head_value
            if log_now and value is not None:
                pl_module.log(f"{self.prefix}/penalty", value, on_step=True, on_epoch=False)
            return
        if not self.decoupled:
            return super().on_before_optimizer_step(trainer, pl_module, optimizer)
        with torch.no_grad():
            lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
            params, pulls, value = self._terms(compute_value=True)
            by_lr: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
            for p, r in zip(params, pulls):
                if id(p) in lr_of:
                    ps, rs = by_lr.setdefault(lr_of[id(p)], ([], []))
                    ps.append(p)
                    rs.append(r)
            for lr, (ps, rs) in by_lr.items():
                torch._foreach_add_(ps, rs, alpha=-lr)
        pl_module.log(f"{self.prefix}/penalty", value, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._loaded is not None:  # loaded, not yet applied by a fit
            return {"anchors": dict(self._loaded)}
        return {"anchors": {n: a.detach().cpu() for n, a in zip(self._names, self._anchors)}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict["anchors"])
