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
from lightning_transfer.compilation import eager
from lightning_transfer.functional.similarity import (
    block_features,
    centred_gram,
    linear_cka_of_grams,
    nearest_neighbours,
    overlap_of_neighbours,
)
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

    At fit start a fixed probe is taken (the first ``probe_size`` inputs of the validation loader that fit
    uses: loaders passed to ``trainer.fit``, the DataModule's or the module's ``val_dataloader``; the first
    one when there are several), the model runs on it once in eval mode, and what each measure needs of
    the pre-trained side is kept: per block, the ``probe_size`` × ``probe_size`` centred Gram matrix (CKA)
    and the ``k`` nearest neighbours of each input (overlap). No copy of the model is kept, so the cost
    does not grow with the model, and under FSDP2 (``ModelParallelStrategy``) the probe runs through the
    sharded model itself (every rank on the same probe). These summaries are saved in the checkpoint: a
    resumed fit compares with the pre-trained model, not with the weights it resumed from. At every
    validation epoch end the model runs on the probe again, batch by batch, and one value per block is
    logged as ``cka/<block>`` (``overlap/<block>``). The history is kept and, with ``heatmap``, saved as a blocks × epochs PNG when
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
        self._reference: dict[str, dict[str, Tensor]] = {}  # measure -> block -> Gram (cka) / neighbours (overlap)
        self._probe: list[Any] = []
        self._names: list[str] = []
        self._outputs: dict[str, str] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, _OWNER, sharded=True)
        self.history, self.epochs, self._reference = {}, [], {}  # a new fit (a resume restores them)
        blocks = list_blocks(pl_module, self.blocks)
        self._names = [n for n, _ in blocks]
        # the probe's hooks find each block's output module by name (FSDP2's configure_model keeps the names)
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
        if not self._reference:  # a resume restored it already (under FSDP2 it is restored after this hook)
            self._reference = self._summaries(self._features_in_eval(pl_module))

    def _summaries(self, features: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """What each measure needs of one side: centred Grams (CKA), neighbour indices (overlap)."""
        summaries: dict[str, dict[str, Tensor]] = {}
        for measure in self.measures:
            fn = centred_gram if measure == "cka" else (lambda f: nearest_neighbours(f, self.k))
            summaries[measure] = {name: fn(features[name]) for name in self._names}
        return summaries

    def _features_in_eval(self, pl_module: LightningModule) -> dict[str, Tensor]:
        modes = [(m, m.training) for m in pl_module.modules()]  # restored module by module (frozen BN stays eval)
        pl_module.eval()
        try:
            with eager():  # the probe's hooks live for one pass: compiled graphs would skip them
                return self._features(pl_module)
        finally:
            for module, mode in modes:
                module.training = mode

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
        if trainer.sanity_checking or not self._reference:
            return
        live = self._summaries(self._features_in_eval(pl_module))
        self.epochs.append(trainer.current_epoch)
        for name in self._names:
            for measure in self.measures:
                fn = linear_cka_of_grams if measure == "cka" else overlap_of_neighbours
                value = float(fn(live[measure][name], self._reference[measure][name].to(live[measure][name].device)))
                self.history.setdefault(f"{measure}/{name}", []).append(value)
                pl_module.log(f"{measure}/{name}", value, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.heatmap is not None and self.history:
            save_heatmap(self.history, self.epochs, self.heatmap)

    @override
    def state_dict(self) -> dict[str, Any]:
        reference = {m: {n: t.cpu() for n, t in blocks.items()} for m, blocks in self._reference.items()}
        return {"history": self.history, "epochs": self.epochs, "reference": reference}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history, self.epochs = dict(state_dict["history"]), list(state_dict["epochs"])
        if "reference" not in state_dict:
            raise ValueError(f"{_OWNER}: this checkpoint was written by an earlier version, which kept no summary of "
                             "the pre-trained model, and the resumed weights are not pre-trained any more. Resume "
                             f"without {_OWNER} (add it to a new fit from the pre-trained weights to measure).")
        reference = state_dict["reference"]
        missing = [f"{m}/{n}" for m in self.measures for n in self._names if n not in reference.get(m, {})]
        if missing:
            raise ValueError(f"{_OWNER}: the checkpoint has no pre-trained summary for {missing[:4]}: it was written "
                             "with other blocks= or measures=. Resume with the same arguments.")
        self._reference = {m: dict(blocks) for m, blocks in reference.items()}


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
