"""Feature-map regularization (DELTA-style): keep chosen activations close to the pre-trained model's."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightning_transfer.anatomy import resolve_module
from lightning_transfer.callbacks.base import GradientRegularizer
from lightning_transfer.functional.feature_maps import channel_attention, feature_map_penalty

__all__ = ["FeatureMapRegularization"]


class FeatureMapRegularization(GradientRegularizer):
    """Penalize ``α/2·Σ_layers mean_batch ‖FM(w, x) − FM(w0, x)‖²`` on named layers (Li et al., DELTA).

    ``FM(w0, ·)`` comes from a frozen copy of the model taken when fit starts (in eval mode: fixed
    BatchNorm statistics, no dropout), run on the same inputs as the live model. Nothing in the user's
    ``training_step`` changes: forward hooks capture the live features, and the penalty's gradient ``r``
    is computed by its own autograd pass right after the forward (before the main backward frees the
    graph). ``r`` is accumulated over micro-batches exactly as Lightning scales the loss, averaged
    across DDP ranks, and added in ``on_before_optimizer_step`` (or handed to DTNH). Under 16-bit AMP
    the pass uses the GradScaler's scale and unscales ``r``; a non-finite ``r`` is dropped and counted
    in ``delta/nonfinite``.

    Channel attention (DELTA's "with attention" variant, ``attention=True``): at the start of epoch
    ``attention_epoch``, each channel ``c`` of each layer is weighted by ``C·softmax(Δ_c/T)``, where
    ``Δ_c`` is the increase of the mean cross-entropy on ``attention_examples`` training examples when that
    channel's output is zeroed (eval mode, no gradient). Channels that matter for the target task are
    held closer to the pre-trained ones. Weights average to 1 (so ``alpha`` keeps its meaning), are
    averaged across DDP ranks and saved in checkpoints; before ``attention_epoch`` all weights are 1.
    Set ``attention_epoch`` after a linear-probing phase (e.g. ``FreezeSchedule.lp_ft``) so that the
    head is trained when the losses are measured, as DELTA does. Attention assumes batches
    ``(x, y)`` and a ``forward(x)`` that returns class logits; it costs one forward per channel.

    Args:
        layers: Dotted module names whose outputs are regularized (unknown names list candidates).
        alpha: Strength.
        root: Module whose forward receives the inputs (default: the top-level child of the
            LightningModule containing all layers, e.g. ``backbone``; the LightningModule itself when
            the layers live at different top-level children).
        attention: Weight channels by DELTA's attention.
        attention_epoch: Epoch at whose start the attention is measured.
        attention_examples: Training examples (from the first batches) used to measure it.
        attention_temperature: Softmax temperature ``T``.

    Example::

        trainer = Trainer(callbacks=[FeatureMapRegularization(["backbone.layer3", "backbone.layer4"], alpha=0.01)])
    """

    def __init__(
        self,
        layers: list[str],
        alpha: float = 0.01,
        root: str | None = None,
        attention: bool = False,
        attention_epoch: int = 0,
        attention_examples: int = 64,
        attention_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("FeatureMapRegularization needs at least one layer name in `layers`.")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        if attention and (attention_epoch < 0 or attention_examples < 1 or attention_temperature <= 0):
            raise ValueError("attention needs attention_epoch >= 0, attention_examples >= 1 and attention_temperature > 0.")
        self.layers, self.alpha, self.root = list(layers), alpha, root
        self.attention, self.attention_epoch = attention, attention_epoch
        self.attention_examples, self.attention_temperature = attention_examples, attention_temperature
        self.channel_weights: list[Tensor] | None = None
        self._reference: nn.Module | None = None
        self._loaded: dict[str, Tensor] | None = None
        self._handles: list[Any] = []
        self._live: dict[str, Tensor] = {}
        self._ref: dict[str, Tensor] = {}
        self._params: list[nn.Parameter] = []
        self._accum: list[Tensor] | None = None
        self._micro_batches = 0
        self._nonfinite = 0
        self._pl_module: LightningModule | None = None
        self._trainer: Trainer | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, alpha=self.alpha, attention=self.attention)

    def _root_name(self) -> str:
        if self.root is not None:
            return self.root
        heads = {name.split(".")[0] for name in self.layers}
        return heads.pop() if len(heads) == 1 and all("." in n for n in self.layers) else ""

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.channel_weights, self._loaded = None, None  # a new fit (a resume restores them after setup)
        for name in self.layers:
            resolve_module(pl_module, name, "layer")
        root = self._root_name()
        if root:
            resolve_module(pl_module, root, "root")
            outside = [n for n in self.layers if not n.startswith(root + ".")]
            if outside:
                raise ValueError(f"layers {outside} are not inside root {root!r}; choose a root that contains all layers.")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer, self._pl_module = trainer, pl_module
        root_name = self._root_name()
        root = pl_module.get_submodule(root_name) if root_name else pl_module
        self._reference = copy.deepcopy(root).eval().requires_grad_(False)
        if self._loaded is not None:  # resume: the reference is the model as it was when fit first started
            self._reference.load_state_dict(self._loaded)
            self._loaded = None
        prefix = root_name + "." if root_name else ""
        local = [n[len(prefix):] for n in self.layers]
        self._params = [p for p in root.parameters() if p.requires_grad]
        self._handles = [
            root.register_forward_pre_hook(self._on_root_input, with_kwargs=True),
            root.register_forward_hook(self._on_root_output),
        ]
        for full, name in zip(self.layers, local):
            self._handles.append(root.get_submodule(name).register_forward_hook(self._store(self._live, full)))
            self._handles.append(self._reference.get_submodule(name).register_forward_hook(self._store(self._ref, full)))
        self._capturing = False
        self._inputs: tuple[tuple, dict] | None = None

    @staticmethod
    def _store(into: dict[str, Tensor], name: str):
        def hook(module, args, output):
            into[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _on_root_input(self, module, args, kwargs):
        self._capturing = module.training and torch.is_grad_enabled() and self.alpha > 0
        if self._capturing:
            self._live.clear()
            self._inputs = (args, kwargs)

    def _on_root_output(self, module, args, output):
        if not self._capturing:
            return
        self._capturing = False
        with torch.no_grad():
            self._ref.clear()
            ref_args, ref_kwargs = self._inputs
            self._reference(*ref_args, **ref_kwargs)
        self._inputs = None
        weights = [w.to(self._live[n].device) for w, n in zip(self.channel_weights, self.layers)] if self.channel_weights else None
        penalty = feature_map_penalty([self._live[n] for n in self.layers], [self._ref[n] for n in self.layers], self.alpha, weights)
        self._live.clear()
        self._ref.clear()
        scaler = getattr(self._trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        params = [p for p in self._params if p.requires_grad]
        grads = torch.autograd.grad(penalty * scale, params, retain_graph=True, allow_unused=True)
        factor = 1.0 / (scale * self._trainer.accumulate_grad_batches)
        kept = [(p, g.detach() * factor) for p, g in zip(params, grads) if g is not None]
        params, grads = [p for p, _ in kept], [g for _, g in kept]
        if not all(torch.isfinite(g).all() for g in grads):
            self._nonfinite += 1
            return
        if self._accum is None or len(self._accum) != len(grads):
            self._accum, self._accum_params = grads, params
        else:
            torch._foreach_add_(self._accum, grads)
        self._micro_batches += 1
        self._pl_module.log("delta/penalty", penalty.detach(), on_step=True, on_epoch=False)

    @override
    def regularizer_gradients(self, trainer: Trainer, pl_module: LightningModule) -> tuple[list[Tensor], list[Tensor]]:
        if self._micro_batches == 0 and self._nonfinite == 0 and self.alpha > 0:
            raise RuntimeError(
                f"FeatureMapRegularization captured no features in this step: root "
                f"{self._root_name() or type(pl_module).__name__!r} was never called in training mode. Pass "
                "root='<module your training_step calls>'."
            )
        pl_module.log("delta/nonfinite", float(self._nonfinite), on_step=True, on_epoch=False)
        if self._accum is None:
            return [], []
        params, grads = self._accum_params, self._accum
        if trainer.world_size > 1:  # g is already averaged across ranks: r must be too
            flat = torch.cat([g.flatten() for g in grads])
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
            grads = list(flat.split([g.numel() for g in grads]))
            grads = [g.view_as(p) for g, p in zip(grads, params)]
        self._accum, self._micro_batches, self._nonfinite = None, 0, 0
        return params, grads

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.attention and self.channel_weights is None and trainer.current_epoch >= self.attention_epoch:
            self.channel_weights = self._measure_attention(trainer, pl_module)

    @torch.no_grad()
    def _measure_attention(self, trainer: Trainer, pl_module: LightningModule) -> list[Tensor]:
        was_training = pl_module.training
        pl_module.eval()
        xs, ys, count = [], [], 0
        for batch in trainer.train_dataloader:
            x, y = trainer.strategy.batch_to_device(batch)[:2]
            xs.append(x)
            ys.append(y)
            count += len(x)
            if count >= self.attention_examples:
                break
        x_all, y_all = torch.cat(xs)[: self.attention_examples], torch.cat(ys)[: self.attention_examples]

        def loss() -> Tensor:
            return F.cross_entropy(pl_module(x_all).float(), y_all)

        channels: dict[str, int] = {}
        probes = [pl_module.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: channels.__setitem__(n, o.shape[1])) for n in self.layers]
        base = loss()
        for h in probes:
            h.remove()
        weights = []
        for name in self.layers:
            layer, increases = pl_module.get_submodule(name), []
            for c in range(channels[name]):
                def zero_channel(module, args, output, c=c):
                    output = output.clone()
                    output[:, c] = 0
                    return output

                handle = layer.register_forward_hook(zero_channel)
                increases.append(loss() - base)
                handle.remove()
            weights.append(channel_attention(torch.stack(increases), self.attention_temperature))
        if trainer.world_size > 1:
            weights = [trainer.strategy.reduce(w, reduce_op="mean") for w in weights]
        pl_module.train(was_training)
        return [w.detach().cpu() for w in weights]

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)  # never leave hooks on the user's model

    @override
    def state_dict(self) -> dict[str, Any]:
        weights = self.channel_weights
        if self._reference is None:
            return {"reference": self._loaded or {}, "channel_weights": weights}
        return {"reference": {k: v.detach().cpu() for k, v in self._reference.state_dict().items()},
                "channel_weights": weights}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict["reference"]) or None
        self.channel_weights = state_dict.get("channel_weights")
