"""Feature-map regularization (DELTA-style): keep chosen activations close to the pre-trained model's."""

from __future__ import annotations

import ast
import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_transfer import batches
from lightning_transfer.anatomy import resolve_module
from lightning_transfer.callbacks.base import GradientRegularizer, optimizer_param_ids
from lightning_transfer.functional.feature_maps import (
    channel_attention,
    feature_map_penalty,
    resolve_channel_dim,
)
from lightning_transfer.validation import check_int, check_number, check_strategy, check_strings

__all__ = ["FeatureMapRegularization"]

OWNER = "FeatureMapRegularization"


class FeatureMapRegularization(GradientRegularizer):
    """Penalize ``α/2·Σ_layers mean_batch ‖FM(w, x) − FM(w0, x)‖²`` on named layers (Li et al., DELTA).

    ``FM(w0, ·)`` comes from a frozen copy of the model taken when fit starts (in eval mode: fixed
    BatchNorm statistics, no dropout), run on the same inputs as the live model. Nothing in the user's
    ``training_step`` changes: forward hooks capture the live features, and the penalty's gradient ``r``
    is computed by its own autograd pass right after the forward (before the main backward frees the
    graph), for the parameters of ``root`` that require grad at that forward (so blocks a
    :class:`FreezeSchedule` unfreezes later are regularized from then on; a micro-batch with no
    trainable parameter upstream of the layers is skipped and counted in ``delta/skipped``). ``r`` is
    accumulated per parameter over micro-batches exactly as Lightning scales the loss, averaged across
    DDP ranks, and added in ``on_before_optimizer_step`` to the parameters of the optimizer being
    stepped (each once, whatever the number of optimizers), or handed to DTNH. Under 16-bit AMP the
    pass uses the GradScaler's scale and unscales ``r``; a non-finite ``r`` is dropped and counted in
    ``delta/nonfinite``. A resume with changed ``alpha``/``attention`` keeps the checkpoint's reference.

    Channel attention (DELTA's "with attention" variant, ``attention=True``): at the start of epoch
    ``attention_epoch``, each channel ``c`` of each layer is weighted by ``C·softmax(Δ_c/T)``, where
    ``Δ_c`` is the increase of the mean cross-entropy on ``attention_examples`` training examples when that
    channel's output is zeroed (eval mode, no gradient). Channels that matter for the target task are
    held closer to the pre-trained ones. Weights average to 1 (so ``alpha`` keeps its meaning), are
    averaged across DDP ranks and saved in checkpoints; before ``attention_epoch`` all weights are 1.
    Set ``attention_epoch`` after a linear-probing phase (e.g. ``FreezeSchedule.lp_ft``) so that the
    head is trained when the losses are measured, as DELTA does. Batches may be ``(x, y)`` or dicts
    with ``labels``; the model may return logits or a ``ModelOutput``. It costs one forward per channel.

    Args:
        layers: Dotted module names whose outputs are regularized (unknown names list candidates).
        alpha: Strength (finite, >= 0).
        root: Module whose forward receives the inputs (default: the top-level child of the
            LightningModule containing all layers, e.g. ``backbone``; the LightningModule itself when
            the layers live at different top-level children).
        attention: Weight channels by DELTA's attention.
        attention_epoch: Epoch at whose start the attention is measured.
        attention_examples: Training examples (from the first batches) used to measure it.
        attention_temperature: Softmax temperature ``T``.
        channel_dim: Dim of the layers' outputs that holds the channels (attention only). ``None``:
            per layer, 1 for ``(B, C)``, the last for ``(B, tokens, C)``, and for 4-D+ outputs what the
            layer's last conv/norm/linear says (an error asks for it when that is unclear).

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
        channel_dim: int | None = None,
    ) -> None:
        super().__init__()
        layers = check_strings(OWNER, "layers", layers)
        if not layers:
            raise ValueError(f"{OWNER} needs at least one layer name in `layers`, e.g. layers=['backbone.layer4'].")
        if root is not None and not isinstance(root, str):
            raise TypeError(f"{OWNER}: root must be a module name (str) or None, got {root!r} ({type(root).__name__}).")
        if not isinstance(attention, bool):
            raise TypeError(f"{OWNER}: attention must be True or False, got {attention!r} ({type(attention).__name__}).")
        if channel_dim is not None:
            channel_dim = check_int(OWNER, "channel_dim", channel_dim)
            if channel_dim == 0:
                raise ValueError(f"{OWNER}: channel_dim=0 is the batch dim; pass 1 (channels first) or -1 (channels last).")
        self.layers, self.alpha, self.root = layers, check_number(OWNER, "alpha", alpha, minimum=0), root
        self.attention, self.attention_epoch = attention, check_int(OWNER, "attention_epoch", attention_epoch, minimum=0)
        self.attention_examples = check_int(OWNER, "attention_examples", attention_examples, minimum=1)
        self.attention_temperature = check_number(OWNER, "attention_temperature", attention_temperature, minimum=0,
                                                  exclusive_minimum=True)
        self.channel_dim = channel_dim
        self.channel_weights: list[Tensor] | None = None
        self._reference: nn.Module | None = None
        self._loaded: dict[str, Tensor] | None = None
        self._handles: list[Any] = []
        self._live: dict[str, Tensor] = {}
        self._ref: dict[str, Tensor] = {}
        self._channel_dims: dict[str, int] = {}
        self._root_params: list[nn.Parameter] = []
        self._accum: dict[int, tuple[nn.Parameter, Tensor]] = {}
        self._captures = 0  # training forwards of root seen in this fit
        self._captures_at: dict[int | None, int] = {}  # ... when each optimizer last stepped
        self._nonfinite = self._skipped = 0
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
        check_strategy(trainer, OWNER, reason="it keeps a full, unsharded reference copy of the model to compute "
                       "the pre-trained feature maps, and a sharded reference is not implemented")
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
        # all of root's parameters: those that require grad are taken at each forward (FreezeSchedule)
        self._root_params = list(root.parameters())
        self._accum, self._captures, self._captures_at, self._nonfinite, self._skipped = {}, 0, {}, 0, 0
        self._channel_dims = {}
        self._handles = [
            root.register_forward_pre_hook(self._on_root_input, with_kwargs=True),
            root.register_forward_hook(self._on_root_output),
        ]
        for full in self.layers:
            name = full[len(prefix):]
            self._handles.append(root.get_submodule(name).register_forward_hook(self._store(self._live, full)))
            self._handles.append(self._reference.get_submodule(name).register_forward_hook(self._store(self._ref, full)))
        self._capturing = False
        self._inputs: tuple[tuple, dict] | None = None

    @staticmethod
    def _store(into: dict[str, Tensor], name: str):
        def hook(module, args, output):
            into[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _dim_of(self, pl_module: nn.Module, name: str, shape: tuple[int, ...]) -> int:
        if name not in self._channel_dims:
            self._channel_dims[name] = resolve_channel_dim(pl_module.get_submodule(name), shape, self.channel_dim, name)
        return self._channel_dims[name]

    def _on_root_input(self, module, args, kwargs):
        self._capturing = module.training and torch.is_grad_enabled() and self.alpha > 0
        if self._capturing:
            self._live.clear()
            self._inputs = (args, kwargs)

    def _on_root_output(self, module, args, output):
        if not self._capturing:
            return
        self._capturing, self._captures = False, self._captures + 1
        (ref_args, ref_kwargs), self._inputs = self._inputs, None
        params = [p for p in self._root_params if p.requires_grad]
        missing = [n for n in self.layers if n not in self._live]
        if missing:
            raise RuntimeError(f"{OWNER}: layers {missing} were not called in the forward of root "
                               f"{self._root_name() or 'the LightningModule'!r}; pass root='<module that calls them>'.")
        if not params:  # everything is frozen (e.g. linear probing): no gradient to compute
            self._live.clear()
            self._skipped += 1
            return
        with torch.no_grad():
            self._ref.clear()
            self._reference(*ref_args, **ref_kwargs)
        live, ref = [self._live[n] for n in self.layers], [self._ref[n] for n in self.layers]
        self._live.clear()
        self._ref.clear()
        weights, dims = None, [1] * len(live)
        if self.channel_weights is not None:
            weights = [w.to(f.device) for w, f in zip(self.channel_weights, live)]
            dims = [self._dim_of(self._pl_module, n, tuple(f.shape)) for n, f in zip(self.layers, live)]
        penalty = feature_map_penalty(live, ref, self.alpha, weights, dims)
        self._pl_module.log("delta/penalty", penalty.detach(), on_step=True, on_epoch=False)
        if not penalty.requires_grad:  # no trainable parameter upstream of the layers
            self._skipped += 1
            return
        scaler = getattr(self._trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        grads = torch.autograd.grad(penalty * scale, params, retain_graph=True, allow_unused=True)
        factor = 1.0 / (scale * self._trainer.accumulate_grad_batches)
        kept = [(p, g.detach() * factor) for p, g in zip(params, grads) if g is not None]
        if not all(torch.isfinite(g).all() for _, g in kept):
            self._nonfinite += 1
            return
        for p, g in kept:  # keyed by parameter: the trainable set may change inside a window
            if id(p) in self._accum:
                self._accum[id(p)][1].add_(g)
            else:
                self._accum[id(p)] = (p, g)

    @override
    def regularizer_gradients(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``(params, r)`` for the parameters of ``optimizer`` (all when ``None``); their entries are cleared."""
        key = None if optimizer is None else id(optimizer)
        if self.alpha > 0 and self._captures == self._captures_at.get(key, 0):
            raise RuntimeError(
                f"{OWNER} captured no features since the last step of this optimizer: root "
                f"{self._root_name() or type(pl_module).__name__!r} was never called in training mode. Pass "
                "root='<module your training_step calls>'."
            )
        self._captures_at[key] = self._captures
        pl_module.log("delta/nonfinite", float(self._nonfinite), on_step=True, on_epoch=False)
        pl_module.log("delta/skipped", float(self._skipped), on_step=True, on_epoch=False)
        self._nonfinite = self._skipped = 0
        ids = None if optimizer is None else optimizer_param_ids(optimizer)
        mine = [k for k in self._accum if ids is None or k in ids]
        entries = [self._accum.pop(k) for k in mine]
        # a parameter frozen since its r was accumulated must get no .grad (the optimizer would move it)
        entries = [(p, r) for p, r in entries if p.requires_grad]
        if trainer.world_size > 1 and self.alpha > 0:  # g is already averaged across ranks: r must be too
            # the same parameters in the same order on every rank: those with a (DDP-synchronized) task gradient
            got = {id(p): r for p, r in entries}
            params = [p for p in self._root_params if p.requires_grad and p.grad is not None and (ids is None or id(p) in ids)]
            if not params:
                return [], []
            flat = torch.cat([got[id(p)].flatten() if id(p) in got else p.new_zeros(p.numel()) for p in params])
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
            return params, [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in params]), params)]
        return [p for p, _ in entries], [r for _, r in entries]

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.attention and self.channel_weights is None and trainer.current_epoch >= self.attention_epoch:
            self.channel_weights = self._measure_attention(trainer, pl_module)

    @torch.no_grad()
    def _measure_attention(self, trainer: Trainer, pl_module: LightningModule) -> list[Tensor]:
        loader = batches.train_loader_of(trainer)
        if loader is None:
            raise RuntimeError(f"{OWNER}: attention needs the training loader, and none was found.")
        modes = {m: m.training for m in pl_module.modules()}  # restored as they were (frozen BatchNorm stays eval)
        pl_module.eval()
        inputs, labels, count = [], [], 0
        for batch in loader:
            batch = trainer.strategy.batch_to_device(batch)
            inputs.append(batches.batch_inputs(batch))
            labels.append(batches.batch_labels(batch))
            count += batches.batch_size_of(inputs[-1])
            if count >= self.attention_examples:
                break
        x_all = batches.slice_inputs(batches.concat_inputs(inputs), self.attention_examples)
        y_all = torch.cat(labels)[: self.attention_examples].to(trainer.strategy.root_device)

        def loss() -> Tensor:
            logits = batches.logits_of(batches.call_model(pl_module, x_all)).float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_all.reshape(-1))

        shapes: dict[str, tuple[int, ...]] = {}
        probes = [pl_module.get_submodule(n).register_forward_hook(self._store(shapes, n)) for n in self.layers]
        base = loss()
        for h in probes:
            h.remove()
        weights = []
        for name in self.layers:
            layer, increases = pl_module.get_submodule(name), []
            dim = self._dim_of(pl_module, name, tuple(shapes[name].shape))
            for c in range(shapes[name].shape[dim]):
                def zero_channel(module, args, output, c=c, dim=dim):
                    first = (output[0] if isinstance(output, (tuple, list)) else output).clone()
                    first.select(dim, c).zero_()
                    return type(output)((first, *output[1:])) if isinstance(output, (tuple, list)) else first

                handle = layer.register_forward_hook(zero_channel)
                increases.append(loss() - base)
                handle.remove()
            weights.append(channel_attention(torch.stack(increases), self.attention_temperature))
        if trainer.world_size > 1:
            weights = [trainer.strategy.reduce(w, reduce_op="mean") for w in weights]
        for m, mode in modes.items():
            m.training = mode
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
        self.channel_weights = state_dict.get("channel_weights") if self.attention else None

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resume with changed ``alpha``/``attention``: adopt the checkpoint's reference for the same layers."""
        candidates = self.unclaimed_states(trainer, checkpoint, "reference")
        if candidates is None:
            return
        prefix, same, others = type(self).__qualname__, [], []
        for key, state in candidates.items():
            try:
                args = ast.literal_eval(key[len(prefix):])
            except (ValueError, SyntaxError):
                args = {}
            (same if isinstance(args, dict) and list(args.get("layers", ())) == self.layers else others).append((key, state))
        if len(same) > 1:
            raise ValueError(f"{self.state_key}: the checkpoint holds {len(same)} {OWNER} states for layers "
                             f"{self.layers} ({[k for k, _ in same]}), so which pre-trained reference to resume is "
                             "ambiguous. Resume with the same arguments as one of them.")
        if not same:
            raise ValueError(f"{self.state_key}: the checkpoint holds no {OWNER} state for layers {self.layers} "
                             f"(found {[k for k, _ in others] or 'none'}), so the pre-trained reference is unknown "
                             "(the resumed weights are fine-tuned). Resume with the callbacks the checkpoint was "
                             "written with, or start a new fit without ckpt_path.")
        rank_zero_info(f"{OWNER}: arguments changed since the checkpoint ({same[0][0]} -> {self.state_key}); "
                       "keeping its pre-trained reference.")
        self.load_state_dict(copy.deepcopy(same[0][1]))
