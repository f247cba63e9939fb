"""peft LoRA models (issue #23): the anatomy sees through peft's wrappers, L2SP anchors only what can move,
WiSE-FT interpolates the LoRA update. Tiny random models built from config objects: nothing downloads."""

from __future__ import annotations

import copy

import peft  # in the test extra: a missing peft fails here, never skips
import pytest
import torch
import torch.nn.functional as F
import transformers
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import BaseFinetuning
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer import L2SP, FreezeSchedule, WiSEFT, greedy_soup
from lightning_transfer.anatomy import find_head, list_blocks, lora_factors
from lightning_transfer.functional.interpolation import interpolate, uniform_soup
from tests.helpers import quiet_trainer

PREFIX = "base_model.model."


def bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                   vocab_size=100, num_labels=3, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)


def gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, num_labels=3,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)


def lora_bert(init: bool | str = True, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                             modules_to_save=["classifier"], init_lora_weights=init, **kwargs)
    return peft.get_peft_model(transformers.BertForSequenceClassification(bert_config()), config)


def lora_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["score"], fan_in_fan_out=True)
    return peft.get_peft_model(transformers.GPT2ForSequenceClassification(gpt2_config()), config)


def tokens(n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 100, (n, 6), generator=g)
    return TensorDataset(x, x[:, 0] % 3)


class LoraModule(LightningModule):
    """A peft model on token ids; AdamW over every parameter (frozen ones get no update)."""

    def __init__(self, net: torch.nn.Module, lr: float = 0.05):
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(input_ids=x).logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)

    def train_dataloader(self):
        return DataLoader(tokens(), batch_size=4)

    def val_dataloader(self):
        return DataLoader(tokens(8, seed=1), batch_size=4)


def _prefixed(name: str, prefix: str) -> str:
    return "|".join(prefix + part for part in name.split("|"))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_blocks_are_the_wrapped_networks_blocks_under_real_names(family):
    plain = (transformers.BertForSequenceClassification(bert_config()) if family == "bert"
             else transformers.GPT2ForSequenceClassification(gpt2_config()))
    model = lora_bert() if family == "bert" else lora_gpt2()
    head = "classifier" if family == "bert" else "score"
    expected = [_prefixed(n, PREFIX) for n, _ in list_blocks(plain)[:-1]] + [f"{PREFIX}{head}.modules_to_save.default"]
    blocks = list_blocks(model)
    assert [n for n, _ in blocks] == expected
    for name, module in blocks:  # real dotted names of the wrapped model
        if "|" not in name:
            assert model.get_submodule(name) is module
    # the head is the trained copy, never peft's frozen original_module (also when the wrapper is named)
    wrapper = model.get_submodule(PREFIX + head)
    assert find_head(model) == (expected[-1], wrapper.modules_to_save["default"])
    assert find_head(model, PREFIX + head) == (expected[-1], wrapper.modules_to_save["default"])
    # every trainable parameter in exactly one block; the original_module in none
    owners = [id(p) for _, b in blocks for p in b.parameters()]
    assert len(owners) == len(set(owners))
    assert {id(p) for p in model.parameters() if p.requires_grad} <= set(owners)
    assert not {id(p) for p in wrapper.original_module.parameters()} & set(owners)
    # names round-trip as explicit blocks
    again = list_blocks(model, blocks=expected[:-1])
    assert [n for n, _ in again] == expected
    assert [sorted(id(p) for p in b.parameters()) for _, b in again] == [
        sorted(id(p) for p in b.parameters()) for _, b in blocks]
    # a LoRA-injected network without the PeftModel wrapper, and a LightningModule holding the PeftModel
    unwrapped = [_prefixed(n, "") for n, _ in list_blocks(plain)[:-1]] + [f"{head}.modules_to_save.default"]
    assert [n for n, _ in list_blocks(model.get_base_model())] == unwrapped
    assert [n for n, _ in list_blocks(LoraModule(model))] == [_prefixed(n, "net.") for n in expected]


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def _lora_names(module: torch.nn.Module, layer: int) -> set[str]:
    return {n for n, _ in module.named_parameters() if f"layer.{layer}." in n and "lora_" in n}


@pytest.mark.parametrize("depth", [1, 2])
def test_freeze_schedule_freezes_bert_blocks_of_a_lora_model(depth):
    module = LoraModule(lora_bert())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    quiet_trainer(max_steps=3, callbacks=[FreezeSchedule(depth=depth)]).fit(module)
    head = {n for n, _ in module.named_parameters() if "modules_to_save.default" in n}
    # block 0 = embeddings (frozen by peft); block 1 = encoder layer 0, whose LoRA trains only at depth 1
    trained = _lora_names(module, 1) | head | (_lora_names(module, 0) if depth == 1 else set())
    assert _changed(before, module) == trained
    assert all(not p.requires_grad for n, p in module.named_parameters() if n in _lora_names(module, 0)) == (depth == 2)


def _trainable_transferred(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad and "modules_to_save" not in n}


def test_l2sp_anchors_only_parameters_that_can_move():
    module = LoraModule(lora_bert())
    l2sp = L2SP(alpha=0.1)
    quiet_trainer(max_steps=2, callbacks=[l2sp]).fit(module)
    lora = _trainable_transferred(module)
    assert lora and all("lora_" in n for n in lora)
    assert set(l2sp.anchors) == lora  # the frozen base (and peft's original_module) holds no anchor
    held = sum(a.numel() * a.element_size() for a in l2sp.anchors.values())
    assert held == 4 * sum(p.numel() for n, p in module.named_parameters() if n in lora)
    assert held < 0.2 * 4 * sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("order", ["freeze_first", "l2sp_first"])
def test_l2sp_anchors_what_a_freeze_schedule_will_thaw(order):
    # LP-FT: everything but the head frozen in epoch 0, thawed in epoch 1; FreezeSchedule(depth=2) next to it
    module = LoraModule(lora_bert())
    l2sp, schedule = L2SP(alpha=0.1), FreezeSchedule.lp_ft(probe_epochs=1)
    callbacks = [schedule, l2sp] if order == "freeze_first" else [l2sp, schedule]
    quiet_trainer(max_epochs=2, limit_train_batches=2, callbacks=callbacks).fit(module)
    assert set(l2sp.anchors) == _lora_names(module, 0) | _lora_names(module, 1)
    module = LoraModule(lora_bert())
    l2sp = L2SP(alpha=0.1)
    quiet_trainer(max_steps=2, callbacks=[FreezeSchedule(depth=2), l2sp]).fit(module)
    assert set(l2sp.anchors) == _lora_names(module, 1)  # layer 0's LoRA is frozen for the whole run


class ThawAt(Callback):
    """Thaw a frozen parameter by hand at the start of batch ``at``."""

    def __init__(self, name: str, at: int):
        self.name, self.at = name, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            pl_module.get_parameter(self.name).requires_grad_(True)


@pytest.mark.parametrize("owner", ["L2SP", "WiSEFT"])
def test_a_parameter_thawed_by_hand_is_an_error_at_its_first_step(owner):
    module = LoraModule(lora_bert())
    name = f"net.{PREFIX}bert.pooler.dense.weight"  # frozen by peft
    callback = L2SP(alpha=0.1) if owner == "L2SP" else WiSEFT(alphas=[0.5])
    trainer = quiet_trainer(max_steps=4, limit_val_batches=None, callbacks=[ThawAt(name, 1), callback])
    with pytest.raises(RuntimeError, match=rf"{owner}: 1 parameter\(s\) were frozen when fit started.*pooler"):
        trainer.fit(module)
    assert trainer.global_step == 1


class UnfreezePooler(BaseFinetuning):
    """Lightning's own unfreezing schedule: the (peft-frozen) pooler thawed at step 2 by code."""

    def freeze_before_training(self, pl_module):
        pass

    def finetune_function(self, pl_module, epoch, optimizer):
        pass

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            pl_module.get_submodule(f"net.{PREFIX}bert.pooler").requires_grad_(True)


def test_lightnings_base_finetuning_keeps_every_anchor():
    """A BaseFinetuning callback thaws by code: L2SP anchors everything and regularizes what it thaws."""
    module = LoraModule(lora_bert())
    name = f"net.{PREFIX}bert.pooler.dense.weight"
    l2sp = L2SP(alpha=0.1)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=None, callbacks=[UnfreezePooler(), l2sp])
    trainer.fit(module)
    assert name in l2sp.anchors and trainer.global_step == 4


class Snapshot(Callback):
    """A copy of the fine-tuned model when training ends (listed before WiSEFT: before it acts)."""

    def on_train_end(self, trainer, pl_module):
        self.net = copy.deepcopy(pl_module.net)


def _merged(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in copy.deepcopy(net).merge_and_unload().state_dict().items()}


def test_wise_ft_interpolates_the_lora_update():
    a = 0.3
    module = LoraModule(lora_bert())
    w0 = _merged(module.net)  # B0 = 0: W0 itself
    factors0 = {n: p.detach().clone() for n, p in module.net.named_parameters() if "lora_" in n}
    snapshot = Snapshot()
    quiet_trainer(max_steps=4, limit_val_batches=None, callbacks=[snapshot, WiSEFT(alphas=[a])]).fit(module)
    ft, got = _merged(snapshot.net), _merged(module.net)
    assert got.keys() == ft.keys() == w0.keys()
    moved = [n for n in w0 if not torch.equal(w0[n], ft[n])]
    assert any("query" in n for n in moved) and any("value" in n for n in moved)
    for n in w0:  # independent reference: peft's merge of the pre-trained and fine-tuned adapters
        expected = ft[n] if n.startswith("classifier.") else w0[n] + a * (ft[n] - w0[n])  # the head stays fine-tuned
        torch.testing.assert_close(got[n], expected, atol=1e-5, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    # interpolating A and B apart (what WiSEFT did before) misses the interpolated update by far more
    naive = copy.deepcopy(snapshot.net)
    with torch.no_grad():
        for n, p in naive.named_parameters():
            if "lora_" in n:
                p.copy_(torch.lerp(factors0[n], p, a))
    wrong = _merged(naive)
    assert max(float((wrong[n] - got[n]).abs().max()) for n in moved) > 1e-3


@pytest.mark.parametrize("kind", ["random_init", "dora"])
def test_lora_that_wise_ft_cannot_interpolate_is_refused_before_the_first_step(kind):
    net = lora_bert(init=False) if kind == "random_init" else lora_bert(use_dora=True)
    module = LoraModule(net)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = quiet_trainer(max_steps=2, limit_val_batches=None, callbacks=[WiSEFT(alphas=[0.5])])
    match = "non-zero update B0@A0.*init_lora_weights=True.*merge" if kind == "random_init" else "DoRA.*Merge"
    with pytest.raises(ValueError, match=match):
        trainer.fit(module)
    assert trainer.global_step == 0 and not _changed(before, module)


def test_functional_interpolation_and_soups_of_lora_states():
    model = lora_bert()
    pairs = lora_factors(model)
    assert len(pairs) == 4 and all("lora_A" in a and "lora_B" in b for a, b in pairs)
    start = {n: t.clone() for n, t in model.state_dict().items()}
    tuned = {n: t + 0.1 * torch.randn_like(t) if "lora_" in n else t.clone() for n, t in start.items()}
    out = interpolate(start, tuned, 0.25, low_rank=pairs)
    for a_name, b_name in pairs:
        assert torch.equal(out[a_name], tuned[a_name]) and torch.allclose(out[b_name], 0.25 * tuned[b_name])
    with pytest.raises(ValueError, match="non-zero update B0@A0"):
        interpolate(tuned, start, 0.5, low_rank=pairs)  # a start whose B0@A0 is not zero
    # soups: averaging B is exact only under one shared A; different A's are refused, also by greedy_soup
    shared_a = {n: t + 0.1 if "lora_B" in n else t.clone() for n, t in start.items()}
    assert torch.allclose(uniform_soup([start, shared_a], pairs)[pairs[0][1]], start[pairs[0][1]] + 0.05)
    with pytest.raises(ValueError, match="differs between states.*merge_and_unload"):
        uniform_soup([start, tuned], pairs)
    loader = DataLoader(tokens(4), batch_size=4)
    with pytest.raises(ValueError, match="differs between states"):
        greedy_soup([start, tuned], model, loader)
