"""RepresentationSimilarity: per-block similarity to the pre-trained model, logged at each validation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device, rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from lightning_transfer.anatomy import block_output_module, list_blocks
from lightning_transfer.batches import (
    batch_inputs,
    batch_size_of,
    call_model,
    hidden_states_of,
    slice_inputs,
    val_loader_of,
)
from lightning_transfer.compilation import eager, reference_copy
from lightning_transfer.functional.similarity import block_features, linear_cka, neighbourhood_overlap
from lightning_transfer.validation import (
    check_choice,
    check_int,
    check_optional_str,
    check_strategy,
    check_strings,
)

__all__ = ["RepresentationSimilarity", "save_heatmap"]

_OWNER = "RepresentationSimilarity"


class RepresentationSimilarity(Callback):
    """Linear CKA (and optionally neighbourhood overlap) of each block's output with the pre-trained model.

    At fit start a frozen copy of the model and a fixed probe (the first ``probe_size`` inputs of the
    validation loader that fit uses: loaders passed to ``trainer.fit``, the DataModule's or the module's
    ``val_dataloader``; the first one when there are several) are kept. At every validation epoch end
    both models run on the probe, batch by batch, and one value per block is logged as ``cka/<block>``
    (``overlap/<block>``). The history is kept and, with ``heatmap``, saved as a blocks × epochs PNG when
    fit ends (needs matplotlib).

    Batches may be ``(x, y)`` tuples or dicts (Hugging Face: the model gets the inputs without the
    labels, as ``model(**inputs)`` or, when its ``forward`` takes the dict whole, ``model(inputs)``); blocks may return tensors, tuples or ModelOutputs (the first tensor: hidden
    states). Block outputs become ``(n, d)`` features by
    :func:`~lightning_transfer.functional.similarity.block_features`: ``(batch, tokens, hidden)`` outputs
    are **mean-pooled over tokens** (padding excluded through the batch's ``attention_mask``), since
    padded tokens carry nothing and batches padded to other lengths must compare; convolutional maps
    ``(batch, C, H, W)`` are flattened.

    Args:
        blocks: Explicit blocks (see :func:`~lightning_transfer.list_blocks`); default: every block.
        probe_size: Number of validation inputs in the probe (at least 2).
        measures: ``["cka"]``, ``["overlap"]`` or both.
        k: Neighbours for the overlap (``1 <= k < probe_size``).
        heatmap: Path of the PNG to write at the end of fit, or ``None``.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> cka = RepresentationSimilarity(probe_size=8)  # heatmap="cka.png" also draws the heat map
        >>> trainer = Trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[cka],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data, data)
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("cka/"))
        ['cka/backbone.0', 'cka/backbone.2']
        >>> 0.0 < float(trainer.callback_metrics["cka/backbone.0"]) <= 1.0
        True
    """

    def __init__(
        self,
        blocks: list[str] | None = None,
        probe_size: int = 128,
        measures: list[Literal["cka", "overlap"]] | None = None,
        k: int = 10,
        heatmap: str | None = None,
    ) -> None:
        if blocks is not None:
            blocks = check_strings(_OWNER, "blocks", blocks, allow_empty=False)
        probe_size = check_int(_OWNER, "probe_size", probe_size, minimum=2)
        measures = ["cka"] if measures is None else check_strings(_OWNER, "measures", measures, allow_empty=False)
        for measure in measures:
            check_choice(_OWNER, "measures", measure, ("cka", "overlap"))
        k = check_int(_OWNER, "k", k, minimum=1)
        if "overlap" in measures and k >= probe_size:
            raise ValueError(f"{_OWNER}: k must be < probe_size, got k={k}, probe_size={probe_size}.")
        self.blocks, self.probe_size, self.measures, self.k = blocks, probe_size, list(dict.fromkeys(measures)), k
        self.heatmap = check_optional_str(_OWNER, "heatmap", heatmap)
        self.history: dict[str, list[float]] = {}
        self.epochs: list[int] = []
        self._reference: nn.Module | None = None
        self._probe: list[Any] = []
        self._names: list[str] = []
        self._outputs: dict[str, str] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _OWNER, reason="it keeps a full, unsharded reference copy of the model to compare "
                       "representations with, and a sharded reference is not implemented")
        self.history, self.epochs = {}, []  # a new fit (a resume restores them after setup)
        blocks = list_blocks(pl_module, self.blocks)
        self._names = [n for n, _ in blocks]
        # the reference copy is found by these module names (its own heads are frozen: no detection there)
        where = {id(m): n for n, m in pl_module.named_modules()}
        self._outputs = {n: where[id(block_output_module(b))] for n, b in blocks}
        if self.heatmap is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ImportError("RepresentationSimilarity(heatmap=...) needs matplotlib: pip install matplotlib") from None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the loaders of fit are attached before setup; the loops build theirs only after on_fit_start
        loader = val_loader_of(trainer)  # the raw loader: the same probe on every DDP rank
        if loader is None:
            raise ValueError(f"{_OWNER} takes its probe from the validation data of fit, and this fit has none: "
                             "pass val_dataloaders to trainer.fit(...), or define val_dataloader() in the "
                             "LightningModule or the DataModule.")
        self._probe, count = [], 0
        for batch in loader:
            inputs = batch_inputs(batch)
            take = min(batch_size_of(inputs), self.probe_size - count)
            self._probe.append(move_data_to_device(slice_inputs(inputs, take), pl_module.device))
            count += take
            if count >= self.probe_size:
                break
        needed = self.k + 1 if "overlap" in self.measures else 2
        if count < needed:
            raise ValueError(f"{_OWNER} needs at least {needed} validation inputs for its probe, and the validation "
                             f"loader holds {count}. Use more validation data, or lower k.")
        self._reference = reference_copy(pl_module).eval().requires_grad_(False)

    def _features(self, model: nn.Module) -> dict[str, Tensor]:
        """Each block's ``(probe_size, d)`` features (see :func:`block_features`)."""
        parts: dict[str, list[Tensor]] = {name: [] for name in self._names}
        last: dict[str, Tensor] = {}
        handles = [
            model.get_submodule(self._outputs[name]).register_forward_hook(
                lambda m, i, o, name=name: last.__setitem__(name, hidden_states_of(o, name).detach())
            )
            for name in self._names
        ]
        try:
            with torch.no_grad():
                for inputs in self._probe:
                    last.clear()
                    call_model(model, inputs)
                    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
                    for name in self._names:
                        if name not in last:
                            raise ValueError(f"{_OWNER}: block {name!r} produced no output on the probe (its "
                                             "module is not called by forward); pass blocks= that forward runs.")
                        parts[name].append(block_features(last[name], mask).float())
        finally:
            for h in handles:
                h.remove()
        return {name: torch.cat(p) for name, p in parts.items()}

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self._reference is None:
            return
        modes = [(m, m.training) for m in pl_module.modules()]  # restored module by module (frozen BN stays eval)
        pl_module.eval()
        try:
            with eager():  # the probe's hooks live for one pass: compiled graphs would skip them
                live, ref = self._features(pl_module), self._features(self._reference)
        finally:
            for module, mode in modes:
                module.training = mode
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
