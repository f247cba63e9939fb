"""Feature-map regularization (DELTA-style): keep chosen activations close to the pre-trained model's."""

from __future__ import annotations

import ast
import copy
import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.optim import Optimizer
from typing_extensions import override

from lightning_transfer import batches
from lightning_transfer.anatomy import AnatomyError, find_head, relative_name, resolve_module
from lightning_transfer.callbacks.base import GradientRegularizer, loss_factor, optimizer_param_ids
from lightning_transfer.compilation import eager, recompile, reference_copy
from lightning_transfer.functional.feature_maps import (
    add_gradient_hooks,
    channel_attention,
    feature_map_penalty,
    feature_map_penalty_grad,
    gradient_reaches,
    resolve_channel_dim,
)
from lightning_transfer.functional.sharding import copy_full_, full_tensor, fully_shard_like
from lightning_transfer.validation import check_int, check_number, check_strategy, check_strings

__all__ = ["FeatureMapRegularization"]

OWNER = "FeatureMapRegularization"
_STOCHASTIC_DEPTH = ("DropPath", "StochasticDepth")  # timm's and torchvision's: dropout of a residual branch


def _check_layer_kind(pl_module: nn.Module, name: str, layer: nn.Module) -> None:
    """Refuse a layer whose output is no feature map to keep close to the pre-trained one; warn on the
    head."""
    if isinstance(layer, nn.modules.loss._Loss):
        raise AnatomyError(f"{OWNER}: layers entry {name!r} is a loss ({type(layer).__name__}), not a feature "
                           "layer: its output is a loss value. Name backbone layers instead.")
    if isinstance(layer, nn.modules.dropout._DropoutNd) or type(layer).__name__ in _STOCHASTIC_DEPTH:
        raise AnatomyError(
            f"{OWNER}: layers entry {name!r} is a {type(layer).__name__}: its output is randomly masked in "
            "training but not in the reference (eval mode), so the penalty would add the dropout noise to "
            "the feature distance. Name the layer before it (the same features without the noise)."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            head_name, head = find_head(pl_module)
        except AnatomyError:
            return
    if layer is head or any(m is layer for m in head.modules()):
        rank_zero_warn(
            f"{OWNER}: layers entry {name!r} is the model's head {head_name!r}: its reference output is the "
            "head's output when fit starts, a random initialization for a new head, which the penalty would "
            "pull the logits toward. DELTA regularizes backbone layers; keep the head only if it was already "
            "trained (e.g. a fit after linear probing)."
        )


def _is_fsdp2(trainer: Trainer) -> bool:
    return "ModelParallelStrategy" in [cls.__name__ for cls in type(trainer.strategy).__mro__]


def _unsharded_reference(root: nn.Module, pl_module: nn.Module) -> nn.Module:
    """Under FSDP2: a copy of ``root`` taken at setup, before ``configure_model`` shards the model (a module
    sharded with ``fully_shard`` cannot be copied: "FSDP does not support deepcopy")."""
    if any(isinstance(m, FSDPModule) for m in pl_module.modules()):
        raise ValueError(f"{OWNER}: the model is already sharded with fully_shard at setup, so no pre-trained "
                         "reference can be copied from it. Shard it in LightningModule.configure_model instead.")
    if any(t.is_meta for t in [*root.parameters(), *root.buffers()]):
        raise ValueError(f"{OWNER}: the model has parameters on the meta device at setup (built in configure_model), "
                         "so no pre-trained reference can be copied from it. Build the pre-trained model in "
                         "__init__ and shard it in configure_model.")
    return reference_copy(root)


class FeatureMapRegularization(GradientRegularizer):
    """Penalize ``α/2·Σ_layers mean_batch ‖FM(w, x) − FM(w0, x)‖²`` on named layers (Li et al., DELTA).

    ``FM(w0, ·)`` comes from a frozen copy of the model taken when fit starts (in eval mode: fixed
    BatchNorm statistics, no dropout), run on the same inputs as the live model. Nothing in the user's
    ``training_step`` changes: forward hooks capture the live features ``F``. The penalty depends on the
    parameters only through ``F``, so its gradient enters the main backward: a gradient hook on each ``F``
    adds ``S·∂P/∂F/k`` (``∂P/∂F = α·(F − F0)/B``, masked and channel-weighted like the penalty; ``S`` the
    GradScaler's scale, ``k`` Lightning's loss division under accumulation), which the backward carries
    to every trainable parameter upstream at no extra pass: exactly the penalty in the loss, also for
    blocks a :class:`FreezeSchedule` unfreezes later, over partial accumulation windows, under DDP and
    with any number of optimizers. The first capture checks that the loss's graph reaches every ``F``
    (not so for an output the loss does not use, or one used only inside a compiled graph); where it
    does not, and with DTNH (which needs ``r`` apart from the task gradient), ``r`` comes from its own
    autograd pass over the parameters of ``root`` that require grad at that forward, accumulated per
    parameter as Lightning scales the loss, averaged across DDP ranks, and added in
    ``on_before_optimizer_step`` to the parameters of the optimizer being stepped or handed to DTNH; a
    non-finite ``r`` of that pass is dropped and counted in ``delta/nonfinite`` (in the one-backward
    path it makes the step non-finite, as the penalty in the loss would). A micro-batch with no trainable
    parameter upstream of the layers is skipped and counted in ``delta/skipped``. A resume with changed
    ``alpha``/``attention`` keeps the checkpoint's reference.

    FSDP2 (``ModelParallelStrategy``): the reference is copied at setup, before ``configure_model`` shards
    the model, and ``fully_shard``-ed at fit start at the live root's FSDP units (1/N of it per rank; its
    forward gathers unit by unit); the penalty's gradient enters the main backward only, so DTNH over it
    is refused, and a model already sharded or on the meta device at setup is refused.

    Token models: when root receives an ``attention_mask`` (a keyword argument, an entry of a dict
    input, or the argument of that name), a ``(B, T, C)`` layer output counts the real tokens only:
    ``‖F − F0‖²`` is summed over the real tokens of each example, then averaged over the batch, so
    padding (left or right, of any length) changes neither the penalty nor its gradient.

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
        layers: Dotted module names whose outputs are regularized (unknown names list candidates). A
            dropout or stochastic-depth layer (noised in training only) and a loss module are refused;
            the head is accepted with a warning (its reference output is that of its initialization).
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

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning.pytorch import Trainer
        >>> from lightning_transfer import TransferClassifier
        >>> net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> model = TransferClassifier(net, num_classes=3, weight_decay=0.0)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,))), batch_size=4)
        >>> delta = FeatureMapRegularization(["backbone.1"], alpha=0.01)  # the hidden ReLU's output
        >>> trainer = Trainer(max_epochs=1, callbacks=[delta],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(model, data)
        >>> float(trainer.callback_metrics["delta/penalty"]) > 0
        True
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
        self._sharded = False  # under ModelParallelStrategy (FSDP2): the reference is sharded as root is
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
        self._one_backward: bool | None = None  # r enters the main backward (decided at the first capture)
        self._pending: list[Tensor] = []  # live maps of a capture whose reachability from the loss is checked
        self._unfired = 0  # gradient hooks registered and not yet run
        self._backward_ran = False  # in this batch
        self._passes = 0  # separate autograd passes run in this fit
        self._passes_at: dict[int | None, int] = {}  # ... when each optimizer last stepped
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
        check_strategy(trainer, OWNER, sharded=True)
        self.channel_weights, self._loaded = None, None  # a new fit (a resume restores them after setup)
        self._reference, self._sharded = None, _is_fsdp2(trainer)
        for name in self.layers:
            _check_layer_kind(pl_module, name, resolve_module(pl_module, name, "layer"))
        root = self._root_name()
        if root:
            resolve_module(pl_module, root, "root")
            outside = [n for n in self.layers if not relative_name(n, root)]
            if outside:
                raise ValueError(f"layers {outside} are not inside root {root!r}; choose a root that contains all layers.")
        if self._sharded and any(type(cb).__name__ == "DTNH" for cb in trainer.callbacks):
            raise ValueError(
                f"{OWNER} with DTNH does not support sharded training (ModelParallelStrategy / FSDP2): DTNH needs "
                "DELTA's gradient apart from the task gradient, from a second autograd pass through the model, and "
                "FSDP2's backward hooks reduce-scatter every backward into .grad (only the one-backward path is "
                "sharded). Use FeatureMapRegularization alone under FSDP2, or DTNH with it on a single device or DDP.")
        if self._sharded:  # Lightning calls setup before configure_model: copy root while it is whole
            self._reference = _unsharded_reference(pl_module.get_submodule(root) if root else pl_module, pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer, self._pl_module = trainer, pl_module
        root_name = self._root_name()
        root = pl_module.get_submodule(root_name) if root_name else pl_module
        if self._sharded:  # the copy taken at setup, sharded as root is: its forward gathers unit by unit
            mesh = trainer.strategy.device_mesh["data_parallel"]
            self._reference = fully_shard_like(self._reference, root, mesh).eval().requires_grad_(False)
        else:
            self._reference = reference_copy(root).eval().requires_grad_(False)
        if self._loaded is not None:  # resume: the reference is the model as it was when fit first started
            self._restore_reference()
        # all of root's parameters: those that require grad are taken at each forward (FreezeSchedule)
        self._root_params = list(root.parameters())
        self._accum, self._captures, self._captures_at, self._nonfinite, self._skipped = {}, 0, {}, 0, 0
        self._one_backward, self._pending, self._unfired, self._passes, self._passes_at = None, [], 0, 0, {}
        if self._sharded:  # a separate autograd pass would run FSDP2's backward hooks: the one-backward path only
            self._one_backward = True
        self._channel_dims = {}
        self._handles = [
            root.register_forward_pre_hook(self._on_root_input, with_kwargs=True),
            root.register_forward_hook(self._on_root_output),
        ]
        for full in self.layers:
            name = relative_name(full, root_name)
            self._handles.append(root.get_submodule(name).register_forward_hook(self._capture(full)))
            self._handles.append(self._reference.get_submodule(name).register_forward_hook(self._store(self._ref, full)))
        recompile(pl_module)  # a compiled model's cached graphs run without hooks added after them
        self._capturing = False
        self._inputs: tuple[tuple, dict] | None = None

    def _capture(self, name: str):
        """The live layer's hook: keeps its output during a capturing forward of root only, so a forward that
        activation checkpointing re-runs inside backward (the hooks fire again) is not counted again."""
        def hook(module, args, output):
            if not self._capturing:
                return
            if not torch.is_grad_enabled():  # root runs with autograd on, this layer without: reentrant checkpointing
                raise RuntimeError(
                    f"{OWNER}: layer {name!r} ran without autograd inside a forward of root that has it, as inside "
                    "torch.utils.checkpoint(..., use_reentrant=True): its output carries no graph, so the penalty "
                    "would silently have no gradient there. Use use_reentrant=False (Hugging Face: "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), "
                    "its default), or leave the regularized layers outside the checkpointed blocks.")
            self._live[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    @staticmethod
    def _store(into: dict[str, Tensor], name: str):
        def hook(module, args, output):
            into[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _dim_of(self, pl_module: nn.Module, name: str, shape: tuple[int, ...]) -> int:
        if name not in self._channel_dims:
            self._channel_dims[name] = resolve_channel_dim(pl_module.get_submodule(name), shape, self.channel_dim, name)
        return self._channel_dims[name]

    @staticmethod
    def _token_mask(module: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
        """The ``(B, T)`` ``attention_mask`` among root's forward inputs: a keyword, a dict input's entry, or
        the positional argument that ``forward``'s signature names so; ``None`` when there is none."""
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = next((a["attention_mask"] for a in args if isinstance(a, Mapping) and "attention_mask" in a), None)
        if mask is None and args:
            try:
                mask = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except (TypeError, ValueError):  # no readable signature, or arguments it does not bind
                mask = None
        return mask if isinstance(mask, Tensor) and mask.ndim == 2 else None

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
            if self._sharded:  # FSDP2 keeps the root unit's parameters gathered after its forward
                self._reference.reshard()
        live, ref = [self._live[n] for n in self.layers], [self._ref[n] for n in self.layers]
        self._live.clear()
        self._ref.clear()
        weights, dims = None, [1] * len(live)
        if self.channel_weights is not None:
            weights = [w.to(f.device) for w, f in zip(self.channel_weights, live)]
            dims = [self._dim_of(self._pl_module, n, tuple(f.shape)) for n, f in zip(self.layers, live)]
        # padding tokens are not features: (B, T, C) outputs count the real tokens of the batch's attention_mask
        mask = self._token_mask(module, ref_args, ref_kwargs)
        if self._one_backward and not self.is_deferred(self._trainer):
            self._hook_gradient(live, ref, weights, dims, mask)
        else:
            self._separate_pass(live, ref, weights, dims, mask, params)

    def _hook_gradient(self, live: list[Tensor], ref: list[Tensor], weights: list[Tensor] | None, dims: list[int],
                       mask: Tensor | None) -> None:
        """One backward: a gradient hook on each live map adds ``S·∂P/∂F/k`` to the gradient flowing into it,
        which the main backward carries to every trainable parameter upstream: the penalty in the loss."""
        value, grads = feature_map_penalty_grad(live, ref, self.alpha, weights, dims, mask)
        # under FSDP2 each rank sees its part of the global batch: the batch mean is the mean over ranks
        self._pl_module.log("delta/penalty", value, on_step=True, on_epoch=False, sync_dist=self._sharded)
        pairs = [(f, g) for f, g in zip(live, grads) if f.requires_grad]
        if not pairs:  # no trainable parameter upstream of the layers
            self._skipped += 1
            return
        self._unfired += len(pairs)
        add_gradient_hooks([f for f, _ in pairs], [g for _, g in pairs], lambda: loss_factor(self._trainer), self._on_hook)

    def _on_hook(self) -> None:
        self._unfired -= 1

    def _separate_pass(self, live: list[Tensor], ref: list[Tensor], weights: list[Tensor] | None, dims: list[int],
                       mask: Tensor | None, params: list[nn.Parameter]) -> None:
        """``r`` apart from the task gradient (DTNH needs it so): its own autograd pass over the graph kept
        for the main backward, accumulated per parameter as Lightning scales the loss."""
        penalty = feature_map_penalty(live, ref, self.alpha, weights, dims, mask)
        self._pl_module.log("delta/penalty", penalty.detach(), on_step=True, on_epoch=False)
        if not penalty.requires_grad:  # no trainable parameter upstream of the layers
            self._skipped += 1
            return
        if self._one_backward is None and not self.is_deferred(self._trainer):
            self._pending = [f for f in live if f.requires_grad]  # on_before_backward decides the next captures' path
        self._passes += 1
        scaler = getattr(self._trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        grads = torch.autograd.grad(penalty * scale, params, retain_graph=True, allow_unused=True)
        kept = [(p, g) for p, g in zip(params, grads) if g is not None]
        if not kept:
            return
        factor, rs = 1.0 / (scale * self._trainer.accumulate_grad_batches), [g for _, g in kept]
        if len({g.data_ptr() for g in rs}) == len(rs):  # autograd's own tensors: scaled in place
            torch._foreach_mul_(rs, factor)
        else:  # one gradient tensor handed to several parameters (e.g. biases added to the same sum)
            kept = list(zip([p for p, _ in kept], torch._foreach_mul(rs, factor)))
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm([g for _, g in kept])).sum())):
            self._nonfinite += 1
            return
        for p, g in kept:  # keyed by parameter: the trainable set may change inside a window
            if id(p) in self._accum:
                self._accum[id(p)][1].add_(g)
            else:
                self._accum[id(p)] = (p, g)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """At the first capture with a gradient: the hook path is taken from then on when the loss's graph
        reaches every live map (not so for a map used only inside a compiled graph: its hook sees no gradient)."""
        pending, self._pending, self._backward_ran = self._pending, [], True
        if pending and isinstance(loss, Tensor) and loss.requires_grad:
            self._one_backward = all(gradient_reaches(loss, pending))

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._unfired and self._backward_ran and self._sharded:
            raise RuntimeError(f"{OWNER}: no gradient reached a regularized layer's output in the backward (does the "
                               "loss use it?); under FSDP2 the penalty's gradient can only enter the main backward. "
                               "Regularize layers whose outputs the loss uses.")
        if self._unfired and self._backward_ran:  # a live map got no gradient in the backward: its hook added no r
            self._one_backward = False
            rank_zero_warn(f"{OWNER}: no gradient reached a regularized layer's output in the backward (does the loss "
                           "use it?), so this batch lacked the penalty's gradient; the following batches compute it in "
                           "a separate autograd pass.")
        # hooks on the graph of a batch without backward (training_step returned None) are dead
        self._unfired, self._backward_ran = 0, False

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
        passes, self._passes_at[key] = self._passes - self._passes_at.get(key, 0), self._passes
        pl_module.log("delta/nonfinite", float(self._nonfinite), on_step=True, on_epoch=False)
        pl_module.log("delta/skipped", float(self._skipped), on_step=True, on_epoch=False)
        self._nonfinite = self._skipped = 0
        ids = None if optimizer is None else optimizer_param_ids(optimizer)
        mine = [k for k in self._accum if ids is None or k in ids]
        entries = [self._accum.pop(k) for k in mine]
        # a parameter frozen since its r was accumulated must get no .grad (the optimizer would move it)
        entries = [(p, r) for p, r in entries if p.requires_grad]
        if trainer.world_size > 1 and self.alpha > 0 and passes:  # g is averaged across ranks: r must be too
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
            with eager():  # its per-channel hooks live for one pass: compiled graphs would skip them
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
        if self._reference is None or (self._sharded and not isinstance(self._reference, FSDPModule)):
            return {"reference": self._loaded or {}, "channel_weights": weights}
        # full tensors (an all-gather per sharded tensor: every rank saves a checkpoint): the sharded checkpoint
        # keeps callback states in rank 0's metadata file, so the reference is written whole, once
        return {"reference": {k: full_tensor(v, v).detach().cpu() for k, v in self._reference.state_dict().items()},
                "channel_weights": weights}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict["reference"]) or None
        self.channel_weights = state_dict.get("channel_weights") if self.attention else None
        if self._loaded is not None and self._sharded and isinstance(self._reference, FSDPModule):
            self._restore_reference()  # FSDP2: Lightning restores the checkpoint after on_fit_start

    def _restore_reference(self) -> None:
        """The checkpoint's (full) reference into ours; under FSDP2 each rank copies its own shards."""
        if self._sharded:
            own = self._reference.state_dict(keep_vars=True)
            missing = sorted(own.keys() - self._loaded.keys()) + sorted(self._loaded.keys() - own.keys())
            if missing:
                raise KeyError(f"{OWNER}: the checkpoint's reference does not match root: keys {missing[:5]} differ.")
            for k, t in own.items():
                copy_full_(t, self._loaded[k])
        else:
            self._reference.load_state_dict(self._loaded)
        self._loaded = None

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
