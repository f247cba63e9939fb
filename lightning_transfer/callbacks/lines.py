"""LiNeS: scale each block's fine-tuning update by its depth, the first coefficient chosen on validation data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_transfer.anatomy import list_blocks
from lightning_transfer.callbacks.weight_space import WeightSpaceSelection
from lightning_transfer.functional.interpolation import lines
from lightning_transfer.validation import check_number, check_strings

__all__ = ["LiNeS"]


class LiNeS(WeightSpaceSelection):
    """Layer-increasing network scaling (Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting
    and Enhances Model Merging", ICLR 2025).

    When training ends, each transferred parameter in block ``l`` of the ``L`` blocks of
    :func:`~lightning_transfer.list_blocks` (forward order, counted from 0, the head left out) becomes
    ``w0 + (a + b·l/(L − 1))·(w_ft − w0)``: shallow blocks stay near the pre-trained weights, deep ones keep
    their update. ``a`` is chosen among ``alphas`` on validation accuracy; ``b`` is ``beta``, or ``1 − a`` by
    default (``beta=None``), so the last block keeps its whole update, the paper's single-task setting. With one
    block, LiNeS is WiSE-FT (coefficient ``a``). Blocks come from the model's anatomy (stem, stages or
    transformer blocks; ``blocks`` lists them explicitly), never from matching parameter names.

    The head keeps its whole fine-tuned value: it has no pre-trained value to scale toward (a new head), and the
    paper leaves the task head and the last layers at their full update (the scale reaches ``a + b = 1`` at the
    last block by default, and the head comes after it).

    Everything else is :class:`~lightning_transfer.WiSEFT`'s, shared code rather than a copy: ``w0`` taken at fit
    start (or L2SP's anchors, one copy), each candidate evaluated on the whole validation loader with BatchNorm
    statistics re-estimated on the training loader, ties to the larger ``a``, ``select="finetuned"`` to only
    measure, weight averaging (the curve scales the average's update), DDP and FSDP2, and the checkpoint layout
    (``w0`` saved, restored on resume). The curve is in :attr:`curve`, :attr:`best_alpha` and logged as
    ``lines/val_acc_a0.50``, ..., ``lines/best_alpha``.

    Args:
        alphas: Candidates for ``a`` (the first block's coefficient) in ``[0, 1]``; default ``0, 0.1, ..., 1``.
        beta: The depth slope ``b`` (``>= 0``), or ``None`` for ``1 − a``.
        select: ``"best"`` (leave the model at the best ``a``) or ``"finetuned"`` (only measure).
        every_validation: Also evaluate the curve at each validation epoch end.
        blocks: Explicit blocks (see :func:`~lightning_transfer.list_blocks`); detected by default.
        head: Dotted name of the new head; auto-detected by default.
        bn_batches: At most this many training batches per BatchNorm re-estimation (``None``: all).
        val_batches: At most this many validation batches per evaluation (``None``: all).

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
        ...                           torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> lines_cb = LiNeS(alphas=[0.0, 0.5, 1.0])
        >>> trainer = Trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[lines_cb],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data, data)  # the model ends at the best a
        >>> sorted(lines_cb.curve), lines_cb.best_alpha in lines_cb.curve
        ([0.0, 0.5, 1.0], True)
    """

    owner = "LiNeS"
    prefix = "lines"

    def __init__(
        self,
        alphas: list[float] | None = None,
        beta: float | None = None,
        select: Literal["best", "finetuned"] = "best",
        every_validation: bool = False,
        blocks: list[str] | None = None,
        head: str | None = None,
        bn_batches: int | None = None,
        val_batches: int | None = None,
    ) -> None:
        super().__init__(alphas, select, every_validation, head, False, bn_batches, val_batches)
        self.beta = None if beta is None else check_number(self.owner, "beta", beta, minimum=0)
        self.blocks = None if blocks is None else check_strings(self.owner, "blocks", blocks, allow_empty=False)
        self.depths: dict[str, int] = {}  # parameter name -> block index
        self.num_blocks = 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._find_depths(pl_module)  # unknown blocks fail here

    def _find_depths(self, pl_module: LightningModule) -> None:
        found = list_blocks(pl_module, self.blocks, self.head)[:-1]  # the head (last) keeps its update
        index = {id(p): i for i, (_, block) in enumerate(found) for p in block.parameters()}
        self.depths = {n: index[id(p)] for n, p in pl_module.named_parameters() if id(p) in index}
        self.num_blocks = len(found)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._find_depths(pl_module)  # the parameters as fit sees them (after configure_model)
        super().on_fit_start(trainer, pl_module)
        outside = [n for n in self._params if n not in self.depths]  # fail now, not when training ends
        if outside:
            raise ValueError(f"LiNeS: {outside[:5]} belong to no block, so their depth is unknown: list a block "
                             "that covers them in blocks=, or leave blocks unset to use the detected ones.")

    def _candidate(self, w0: Mapping[str, Tensor], w_ft: Mapping[str, Tensor], a: float) -> dict[str, Tensor]:
        return lines(w0, w_ft, self.depths, self.num_blocks, a, self.beta, low_rank=self._low_rank)
