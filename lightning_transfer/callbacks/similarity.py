"""RepresentationSimilarity: per-block similarity to the pre-trained model, logged at each validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from lightning_transfer.anatomy import BlockGroup, list_blocks
from lightning_transfer.functional.similarity import linear_cka, neighbourhood_overlap

__all__ = ["RepresentationSimilarity", "save_heatmap"]


def _output_module(block: nn.Module) -> nn.Module:
    """The module whose output is the block's output (the last member of a group)."""
    return block.members[-1] if isinstance(block, BlockGroup) and len(block.members) else block


class RepresentationSimilarity(Callback):
    """Linear CKA (and optionally neighbourhood overlap) of each block's output with the pre-trained model.

    At fit start a frozen copy of the model and a fixed probe batch (the first ``probe_size`` validation
    inputs) are kept. At every validation epoch end both models run on the probe, and one value per block
    is logged as ``cka/<block>`` (``overlap/<block>``). The history is kept and, with ``heatmap``, saved
    as a blocks × epochs PNG when fit ends (needs matplotlib).

    Args:
        blocks: Explicit blocks (see :func:`~lightning_transfer.list_blocks`); default: every block.
        probe_size: Number of validation inputs in the probe.
        measures: ``["cka"]``, ``["overlap"]`` or both.
        k: Neighbours for the overlap.
        heatmap: Path of the PNG to write at the end of fit, or ``None``.

    Example::

        trainer = Trainer(callbacks=[RepresentationSimilarity(heatmap="cka.png")])
    """

    def __init__(
        self,
        blocks: list[str] | None = None,
        probe_size: int = 128,
        measures: list[Literal["cka", "overlap"]] | None = None,
        k: int = 10,
        heatmap: str | None = None,
    ) -> None:
        measures = list(measures or ["cka"])
        if not measures or any(m not in ("cka", "overlap") for m in measures):
            raise ValueError(f"measures must be a non-empty subset of ['cka', 'overlap'], got {measures}.")
        if probe_size < 2:
            raise ValueError(f"probe_size must be at least 2, got {probe_size}.")
        if "overlap" in measures and not 1 <= k < probe_size:
            raise ValueError(f"k must be in [1, probe_size - 1], got k={k}, probe_size={probe_size}.")
        self.blocks, self.probe_size, self.measures, self.k, self.heatmap = blocks, probe_size, measures, k, heatmap
        self.history: dict[str, list[float]] = {}
        self.epochs: list[int] = []
        self._reference: nn.Module | None = None
        self._probe: Tensor | None = None
        self._names: list[str] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.history, self.epochs = {}, []  # a new fit (a resume restores them after setup)
        self._names = [n for n, _ in list_blocks(pl_module, self.blocks)]
        if self.heatmap is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ImportError("RepresentationSimilarity(heatmap=...) needs matplotlib: pip install matplotlib") from None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reference = copy.deepcopy(pl_module).eval().requires_grad_(False)
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        inputs, count = [], 0
        for batch in source.val_dataloader():  # the raw loader: the same probe on every DDP rank
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            inputs.append(x)
            count += len(x)
            if count >= self.probe_size:
                break
        if not inputs:
            raise ValueError("RepresentationSimilarity needs validation data for its probe batch.")
        self._probe = torch.cat(inputs)[: self.probe_size].to(pl_module.device)

    def _activations(self, model: nn.Module) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        blocks = dict(list_blocks(model, self.blocks))
        handles = [
            _output_module(blocks[name]).register_forward_hook(
                lambda m, i, o, name=name: out.__setitem__(name, (o[0] if isinstance(o, (tuple, list)) else o).detach())
            )
            for name in self._names
        ]
        try:
            with torch.no_grad():
                model(self._probe)
        finally:
            for h in handles:
                h.remove()
        return out

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._reference is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        live, ref = self._activations(pl_module), self._activations(self._reference)
        pl_module.train(was_training)
        self.epochs.append(trainer.current_epoch)
        for name in self._names:
            for measure in self.measures:
                fn = linear_cka if measure == "cka" else (lambda a, b: neighbourhood_overlap(a, b, self.k))
                value = float(fn(live[name], ref[name]))
                self.history.setdefault(f"{measure}/{name}", []).append(value)
                pl_module.log(f"{measure}/{name}", value, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.heatmap is not None and self.history:
            save_heatmap(self.history, self.epochs, self.heatmap)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "epochs": self.epochs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history, self.epochs = dict(state_dict["history"]), list(state_dict["epochs"])


@rank_zero_only
def save_heatmap(history: dict[str, list[float]], epochs: list[int], path: str | Path, measure: str = "cka") -> None:
    """A blocks × epochs heat map of one measure's history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k.split("/", 1)[1], v) for k, v in history.items() if k.startswith(measure + "/")]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(epochs) + 2), max(3, 0.35 * len(rows) + 1.5)))
    image = ax.imshow([v for _, v in rows], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows])
    ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
    ax.set_xlabel("epoch")
    ax.set_title(f"{measure.upper()} with the pre-trained model, per block")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
