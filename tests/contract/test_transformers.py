"""The contract on transformers (issues #16, #23): every callback of SINGLE, and layer decay, on seven families.

Each family (tests/contract/transformer_models.py: Hugging Face BERT on padded token dicts, a Hugging Face
Llama decoder on left-padded token dicts, peft LoRA on that BERT and on that Llama, Hugging Face ViT, timm ViT, torchvision
Swin) trains inside the library's ``TransferClassifier``. Columns: (1) the callback's visible effect and
a finite, changed model whose frozen parameters (peft's base) never moved; (2) resume equals uninterrupted;
(3) accumulation (8x2) equals the full batch (16); (4) bf16-mixed keeps the update; (5) state_dict round
trip. The callback combinations run on BERT, the multi-process columns on BERT, Llama and both LoRA families
(test_transformer_combinations.py).
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from lightning.pytorch import Callback

from lightning_transfer import (
    RIFLE,
    FeatureMapRegularization,
    FreezeSchedule,
    MaxEntropyHeadInit,
    RepresentationSimilarity,
)
from lightning_transfer.anatomy import final_linear, list_blocks
from tests.contract.registry import REGISTRY, SINGLE, Entry
from tests.contract.transformer_models import FAMILIES, BSSReference, FamilyData, build, lr_for
from tests.helpers import StopAfter, assert_params_close, params_of, quiet_trainer

ENTRIES: dict[str, Entry] = {**{n: REGISTRY[n] for n in SINGLE},
                             "layer_decay": Entry(make=lambda m: [], yaml=[], module={"layer_decay": 0.5})}
# (family, entry) pairs that cannot be supported, with the clear error each gets before the first step.
UNSUPPORTED: dict[tuple[str, str], str] = {
    # Co-Tuning feeds the new head's input to the source head: Llama's score layer runs on every token, and
    # which token's logits the model pools is the model's own affair
    ("hf_llama", "CoTuning"): r"CoTuning needs \(batch, features\) head inputs",
    # BSS's matrix is one feature vector per example: Llama's per-token score inputs would count padding
    ("hf_llama", "BSS"): r"BSS needs one feature vector per example .*per-token head",
    # the same for the LoRA-wrapped Llama: its score head (the modules_to_save copy) runs on every token too
    ("peft_lora_llama", "CoTuning"): r"CoTuning needs \(batch, features\) head inputs",
    ("peft_lora_llama", "BSS"): r"BSS needs one feature vector per example .*per-token head",
}
PEFT = ("peft_lora_bert", "peft_lora_llama")  # the families whose base weights are frozen before fit
CASES = [(f, n) for f in FAMILIES for n in ENTRIES if (f, n) not in UNSUPPORTED]


class Watch(Callback):
    """Records what the behaviour column checks: parameters at train start and at epoch boundaries, and
    every parameter that changed during a step in which it did not require grad."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.epoch_start: dict[int, dict[str, torch.Tensor]] = {}
        self.epoch_end: dict[int, dict[str, torch.Tensor]] = {}
        self.frozen_steps, self.thawed = 0, []
        self._frozen: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.start = params_of(pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start[trainer.current_epoch] = params_of(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_end[trainer.current_epoch] = params_of(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._frozen = {n: p.detach().clone() for n, p in pl_module.named_parameters() if not p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.frozen_steps += bool(self._frozen)
        named = dict(pl_module.named_parameters())
        self.thawed += [n for n, v in self._frozen.items() if not torch.equal(named[n].detach(), v)]


def _module(family: str, name: str, seed: int = 0):
    return build(family, seed=seed, lr=lr_for(ENTRIES[name]), **ENTRIES[name].module)


def _trainer(family: str, name: str, callbacks=(), **kw):
    entry = ENTRIES[name]
    return quiet_trainer(max_epochs=entry.max_epochs, callbacks=[*entry.make(FAMILIES[family].model), *callbacks],
                         log_every_n_steps=1, **{**entry.trainer, **kw})


@functools.cache
def _uninterrupted(family: str, name: str):
    """The reference run of a case (2 steps an epoch), watched: shared by columns 1, 2 and 5."""
    model, watch = _module(family, name), Watch()
    trainer = _trainer(family, name, [watch])
    trainer.fit(model, datamodule=FamilyData(family))
    return trainer, model, watch


@functools.cache
def _update(family: str, name: str, batch_size: int = 16, precision: str = "32-true") -> dict[str, torch.Tensor]:
    """Parameter change over the entry's epochs, one global batch of 16 an epoch (batch 8: two micro-batches)."""
    model = _module(family, name)
    start = params_of(model)
    acc = 16 // batch_size
    _trainer(family, name, limit_train_batches=acc, accumulate_grad_batches=acc, precision=precision).fit(
        model, datamodule=FamilyData(family, batch_size=batch_size))
    end = params_of(model)
    return {k: end[k] - start[k] for k in start}


def _callback(trainer, cls):
    return next(cb for cb in trainer.callbacks if isinstance(cb, cls))


@pytest.mark.parametrize("family,name", list(UNSUPPORTED))
def test_unsupported_family_is_refused_before_the_first_step(family, name):
    model = _module(family, name)
    with pytest.raises(ValueError, match=UNSUPPORTED[(family, name)]):
        _trainer(family, name).fit(model, datamodule=FamilyData(family))
    assert model.global_step == 0


@pytest.mark.parametrize("family,name", CASES)
def test_behaviour(family, name):
    """A short fit trains, stays finite, and shows the callback's own effect on this family."""
    trainer, model, watch = _uninterrupted(family, name)
    end, info = params_of(model), FAMILIES[family].model
    assert all(torch.isfinite(v).all() for v in end.values())
    assert any(not torch.equal(watch.start[k], end[k]) for k in end)
    assert not watch.thawed, f"parameters changed while frozen: {sorted(set(watch.thawed))[:5]}"
    # what the model holds frozen before fit (peft's base weights and its original_module head) never moves:
    # not in a step, nor by a callback acting at epoch or fit boundaries (RIFLE, MEI, WiSE-FT, FreezeSchedule)
    held = {n for n, p in _module(family, name).named_parameters() if not p.requires_grad}
    assert bool(held) == (family in PEFT)
    assert all(torch.equal(watch.start[n], end[n]) for n in held), sorted(n for n in held if not torch.equal(
        watch.start[n], end[n]))[:5]
    if family in PEFT:  # and the adapter trains: its lora_B factors (zero at the start) moved
        assert any(not torch.equal(watch.start[n], end[n]) for n in end if ".lora_B." in n)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    callbacks = {type(cb) for cb in trainer.callbacks}
    if MaxEntropyHeadInit in callbacks:  # the head's last Linear is zero when training starts
        weight = final_linear(model.get_submodule(info.head)).weight
        assert not watch.start[next(n for n, p in model.named_parameters() if p is weight)].any()
    if FreezeSchedule in callbacks:  # blocks were frozen for some steps (and did not move: `thawed` above)
        assert watch.frozen_steps > 0
        first = {id(p) for p in list_blocks(model)[0][1].parameters()}
        frozen_throughout = [n for n, p in model.named_parameters() if id(p) in first]
        if name == "FreezeSchedule":  # milestones {0: 2, 2: 1}: block 0 never trains, block 1 from epoch 2
            assert all(torch.equal(watch.start[n], end[n]) for n in frozen_throughout)
    if RIFLE in callbacks:  # at epoch 3 the head alone is re-initialized: new weights, nothing else touched
        before, after = watch.epoch_end[2], watch.epoch_start[3]
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        head = {f"{info.head}.{n}" for n, _ in model.get_submodule(info.head).named_parameters()}
        assert changed == head and f"{info.head}.weight" in head  # Llama's score Linear has no bias
    if FeatureMapRegularization in callbacks:
        cb = _callback(trainer, FeatureMapRegularization)
        assert metrics["delta/penalty"] > 0
        if cb.attention:  # channels = the hidden (last) dim of (batch, tokens, hidden) / (batch, H, W, C)
            sizes = [len(w) for w in cb.channel_weights]
            assert sizes == list(FAMILIES[family].channels)
            for layer, dim in cb._channel_dims.items():
                assert dim == (3 if family == "tv_swin" else 2), (layer, dim)
    if "L2SP" in name:
        assert metrics["l2sp/penalty"] > 0
    if RepresentationSimilarity in callbacks:
        blocks = [n for n, _ in list_blocks(model)][:-1]
        for measure in ("cka", "overlap"):
            assert {f"{measure}/{b}" for b in blocks} <= metrics.keys(), sorted(metrics)
    if name == "layer_decay":  # one group per block, LR decaying by 0.5 per block from the head down
        lrs, lr = [g["lr"] for g in trainer.optimizers[0].param_groups], model.hparams.lr
        depth = len(list_blocks(model.backbone, fine=True)) - 1  # timm: its fine groups; a head norm shares the head's
        assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(lr)
        assert any(lrs[0] == pytest.approx(lr * 0.5**d) for d in (depth, depth - 1)), (lrs, depth)


@pytest.mark.parametrize("family,name", CASES)
def test_resume_equals_uninterrupted(family, name, tmp_path):
    _, full, _ = _uninterrupted(family, name)
    epochs = ENTRIES[name].max_epochs
    t1 = _trainer(family, name, [StopAfter(epochs // 2)], default_root_dir=tmp_path, enable_checkpointing=True)
    t1.fit(_module(family, name), datamodule=FamilyData(family))
    resumed = _module(family, name, seed=123)  # another init: everything must come from the checkpoint
    _trainer(family, name).fit(resumed, datamodule=FamilyData(family), ckpt_path=t1.checkpoint_callback.best_model_path)
    assert_params_close(params_of(resumed), params_of(full), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,name", CASES)
def test_accumulation_equals_full_batch(family, name):
    if ENTRIES[name].batch_dependent:  # BSS: each micro-batch's penalty, as the penalty in the loss accumulated alike
        (cb,) = ENTRIES[name].make(FAMILIES[family].model)
        reference = build(family, lr=lr_for(ENTRIES[name]), cls=BSSReference, head=FAMILIES[family].model.head,
                          eta=cb.eta, k=cb.k)
        start = params_of(reference)
        quiet_trainer(max_epochs=ENTRIES[name].max_epochs, limit_train_batches=2, accumulate_grad_batches=2).fit(
            reference, datamodule=FamilyData(family, batch_size=8))
        expected = {k: v - start[k] for k, v in params_of(reference).items()}
        assert_params_close(_update(family, name, 8), expected, rtol=1e-4, atol=1e-6)
        return
    assert_params_close(_update(family, name, 8), _update(family, name, 16), rtol=1e-4, atol=1e-6)


def _relative_error(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    return num / max(sum(float(b[k].norm() ** 2) for k in b) ** 0.5, 1e-12)


# A measured gap: on Swin, DTNH's global projection of DELTA's gradient moves the bf16-mixed update by 18% of
# the update (DELTA's gradient, from bf16-rounded F - F0 on a map whose penalty grows fast, is projected
# against the task gradient; see the report of issue #16). Every other case is held to 5%.
BF16_BOUND = {("tv_swin", "DTNH+FeatureMapRegularization"): 0.25}


@pytest.mark.parametrize("family,name", CASES)
def test_bf16_mixed_keeps_the_math(family, name):
    error = _relative_error(_update(family, name, precision="bf16-mixed"), _update(family, name))
    assert error < BF16_BOUND.get((family, name), 0.05)


def _states_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("family,name", CASES)
def test_state_dict_round_trip(family, name):
    trainer, _, _ = _uninterrupted(family, name)
    ours = [cb for cb in trainer.callbacks if type(cb).__module__.startswith("lightning_transfer")]
    for i, cb in enumerate(ours):
        state, buffer = cb.state_dict(), io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        fresh = copy.deepcopy(ENTRIES[name].make(FAMILIES[family].model)[i])
        fresh.load_state_dict(torch.load(buffer, weights_only=False))
        assert _states_equal(fresh.state_dict(), state)
        if ENTRIES[name].stateful and type(cb).__name__ != "DTNH":
            assert state, f"{type(cb).__name__} saves no state"


def test_call_model_hands_a_dict_to_a_forward_that_takes_it_whole():
    """Callbacks call the LightningModule with a batch's inputs: TransferClassifier.forward(x) takes the
    dict itself, a Hugging Face model takes its keys (before the fix, DELTA's attention and
    RepresentationSimilarity on TransferClassifier failed with "unexpected keyword argument 'input_ids'")."""
    from lightning_transfer.batches import batch_inputs, call_model, logits_of

    model = build("hf_bert").eval()
    inputs = batch_inputs(next(iter(FamilyData("hf_bert").train_dataloader())))
    with torch.no_grad():
        expected = logits_of(model.backbone(**inputs))
        torch.testing.assert_close(call_model(model, inputs), expected)
        torch.testing.assert_close(logits_of(call_model(model.backbone, inputs)), expected)
