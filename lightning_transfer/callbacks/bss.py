"""Batch Spectral Shrinkage: shrink the smallest singular values of the head's input features."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightning_transfer.anatomy import find_head
from lightning_transfer.callbacks.base import loss_factor
from lightning_transfer.compilation import recompile
from lightning_transfer.functional.bss import bss_penalty_grad
from lightning_transfer.functional.feature_maps import add_gradient_hooks
from lightning_transfer.validation import check_number, check_strategy

__all__ = ["BSS"]


class BSS(Callback):
    """Batch Spectral Shrinkage (Chen, Wang, Fu, Long & Wang, NeurIPS 2019, "Catastrophic Forgetting Meets
    Negative Transfer").

    Adds ``η·Σ_{i≤k} σ_i²`` to the loss of every training batch, the ``k`` smallest singular values of the
    ``B × D`` matrix of the features entering the head (flattened per example). The paper finds that
    spectral components with small singular values carry the pre-trained knowledge that does not transfer
    (negative transfer) and that shrinking them helps most with little target data.

    One forward pre-hook on the head keeps its input; its penalty gradient (one thin SVD of the small
    matrix, float32) is added by a gradient hook on that input, so it joins the main backward, scaled as
    Lightning scales the loss (``1/accumulate_grad_batches``, a GradScaler's scale): the result equals the
    penalty in the loss of every micro-batch, without a second backward. Under DDP each rank penalizes its
    own batch, as the penalty in each rank's loss would; under FSDP2 the features are plain activations.
    A head that runs on every token (``(batch, tokens, hidden)`` inputs: decoder LMs' ``score`` layer, whose
    logits the model pools at the last real token afterwards) is refused at the first forward: the
    method's matrix is one feature vector per example, and flattening tokens would count padding.

    Args:
        eta: Strength ``η`` (the paper and tllib: 0.001).
        k: How many of the smallest singular values to shrink (paper: 1).
        head: Dotted name of the head module; auto-detected by default.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> trainer = Trainer(max_epochs=1, callbacks=[BSS(eta=0.001)], log_every_n_steps=1,
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data)
        >>> float(trainer.callback_metrics["bss/penalty"]) >= 0
        True
    """

    def __init__(self, eta: float = 0.001, k: int = 1, head: str | None = None) -> None:
        super().__init__()
        self.eta = check_number("BSS", "eta", eta, minimum=0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"BSS: k must be an int >= 1 (how many smallest singular values), got {k!r}.")
        if head is not None and not isinstance(head, str):
            raise TypeError(f"BSS: head must be a string or None, got {head!r} ({type(head).__name__}).")
        self.k, self.head = k, head
        self._handles: list[Any] = []
        self._trainer: Trainer | None = None
        self._module: LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(eta=self.eta, k=self.k, head=self.head)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, "BSS", sharded=True)
            find_head(pl_module, self.head)  # an unknown head fails here, before any step

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove()
        self._trainer, self._module = trainer, pl_module
        _, head = find_head(pl_module, self.head)
        self._handles = [head.register_forward_pre_hook(self._on_head_input)]
        recompile(pl_module)  # a compiled model's cached graphs run without hooks added after them

    def _on_head_input(self, module: nn.Module, args: tuple) -> None:
        if not (module.training and torch.is_grad_enabled() and self.eta > 0 and args):
            return
        f = args[0]
        if not isinstance(f, Tensor) or f.ndim < 2 or not f.requires_grad:  # frozen backbone: nothing to shrink
            return
        if f.ndim == 3:
            raise ValueError(f"BSS needs one feature vector per example at the head, but the head gets shape "
                             f"{tuple(f.shape)} (batch, tokens, hidden): a per-token head, such as a decoder LM's "
                             "score layer, whose logits the model pools afterwards. Pass head= a module that runs "
                             "on pooled features, or use another regularizer (L2SP, DELTA) on this model.")
        value, grad = bss_penalty_grad(f.detach(), self.eta, self.k)
        self._module.log("bss/penalty", value, on_step=True, on_epoch=False)
        add_gradient_hooks([f], [grad], lambda: loss_factor(self._trainer), lambda: None)

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"eta": self.eta, "k": self.k}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # stateless: the arguments of this run apply
