"""FreezeSchedule and layer-wise LR decay: depth semantics, BatchNorm, schedules, schedulers, bad input."""

import pytest
import torch
import torchvision
from lightning.pytorch import Callback, LightningModule

from lightning_transfer import AnatomyError, FreezeSchedule, TransferClassifier, list_blocks
from lightning_transfer.freezing import depth_at, gradual_milestones
from lightning_transfer.model import build_backbone
from lightning_transfer.optim import build_param_groups
from tests.contract.test_contract import StopAfter
from tests.helpers import (
    ImageModule,
    TinyClassifier,
    assert_params_close,
    launch_env,
    params_of,
    quiet_trainer,
)

NETS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=3),
    "efficientnet_lite0": lambda: build_backbone("efficientnet_lite0", 3, pretrained=False)[0],
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=3),
}


class Record(Callback):
    """Per epoch (after FreezeSchedule acted): which blocks train, and BN modes, at the first batch."""

    def __init__(self, blocks_of):
        self.blocks_of, self.trainable, self.bn_training = blocks_of, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            blocks = self.blocks_of(pl_module)
            self.trainable[trainer.current_epoch] = [all(p.requires_grad for p in b.parameters()) for _, b in blocks]
            self.bn_training[trainer.current_epoch] = [
                any(m.training for m in b.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)) for _, b in blocks
            ]


@pytest.mark.parametrize(
    "net,depth",
    [("resnet18", 0), ("resnet18", 2), ("resnet18", "all"), ("efficientnet_lite0", 3), ("efficientnet_lite0", "all"),
     ("mobilenet_v3_small", 5)],
)
def test_depth_freezes_the_first_blocks_and_keeps_their_bn_stats(net, depth):
    module = ImageModule(NETS[net]())
    blocks = list_blocks(module)
    k = len(blocks) - 1 if depth == "all" else depth
    start = params_of(module)
    stats = {n: b.clone() for n, b in module.named_buffers() if "running_mean" in n}
    rec = Record(list_blocks)
    quiet_trainer(max_epochs=1, callbacks=[FreezeSchedule(depth=depth), rec]).fit(module)  # after model.train()
    assert rec.trainable[0] == [i >= k for i in range(len(blocks))]
    assert rec.bn_training[0][:k] == [False] * k
    frozen_ids = {id(p) for _, b in blocks[:k] for p in b.parameters()}
    frozen_buffers = {id(t) for _, b in blocks[:k] for t in b.buffers()}
    end = params_of(module)
    moved = {n for n in start if not torch.equal(start[n], end[n])}
    assert not {n for n, p in module.named_parameters() if id(p) in frozen_ids} & moved, "a frozen tensor moved"
    assert {n for n, _ in module.named_parameters() if n.startswith(blocks[-1][0])} & moved, "the head did not train"
    for n, b in module.named_buffers():
        if n in stats and id(b) in frozen_buffers:
            assert torch.equal(stats[n], b), f"running stats of frozen {n} changed"


def test_bn_train_option_keeps_updating_statistics():
    module = ImageModule(NETS["resnet18"]())
    before = module.net.bn1.running_mean.clone()
    quiet_trainer(max_epochs=1, callbacks=[FreezeSchedule(depth=2, bn="train")]).fit(module)
    assert not torch.equal(before, module.net.bn1.running_mean)
    assert all(not p.requires_grad for p in module.net.bn1.parameters())


def test_frozen_parameters_not_moved_by_momentum_or_weight_decay():
    model = TinyClassifier(weight_decay=0.1)  # SGD momentum 0.9 + decay
    start = params_of(model)
    quiet_trainer(max_epochs=3, callbacks=[FreezeSchedule(depth=1)]).fit(model)
    end = params_of(model)
    assert torch.equal(start["backbone.0.0.weight"], end["backbone.0.0.weight"])
    assert not torch.equal(start["backbone.1.0.weight"], end["backbone.1.0.weight"])


def test_lp_ft_and_gradual_transitions():
    blocks_of = list_blocks
    rec = Record(blocks_of)
    trainer = quiet_trainer(max_epochs=4, callbacks=[FreezeSchedule.lp_ft(probe_epochs=2, bn="eval"), rec])
    trainer.fit(TinyClassifier())
    assert float(trainer.callback_metrics["freeze/depth"]) == 0.0
    assert float(trainer.callback_metrics["freeze/trainable_params"]) == sum(p.numel() for p in TinyClassifier().parameters())
    assert [rec.trainable[e] for e in range(4)] == [[False, False, True]] * 2 + [[True, True, True]] * 2
    # frozen BatchNorm in eval mode during the probe, back in train mode once its block trains again
    assert [rec.bn_training[e][0] for e in range(4)] == [False, False, True, True]
    rec = Record(blocks_of)
    quiet_trainer(max_epochs=4, callbacks=[FreezeSchedule.gradual(every=1), rec]).fit(TinyClassifier())
    assert [rec.trainable[e] for e in range(4)] == [
        [False, False, True], [False, True, True], [True, True, True], [True, True, True]
    ]


def test_schedule_helpers():
    assert gradual_milestones(3, every=2) == {0: 3, 2: 2, 4: 1, 6: 0}
    assert depth_at(5, {0: "all", 3: 1}, 4) == 1 and depth_at(2, {0: "all", 3: 1}, 4) == 4
    assert depth_at(0, {2: 1}, 4) == 0


class StateSpy(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            opt = trainer.optimizers[0]
            self.state_at_unfreeze = [p in opt.state for p in pl_module.backbone[0].parameters()]
            self.lr = opt.param_groups[0]["lr"]


@pytest.mark.parametrize("scheduler", ["onecycle", "lambda"])
def test_unfrozen_block_follows_the_lr_scheduler_with_fresh_state(scheduler):
    class Scheduled(TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            if scheduler == "onecycle":
                sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=16)
            else:
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    model = Scheduled()
    spy = StateSpy()
    start = params_of(model)
    # trained at epoch 0 (momentum builds up), frozen at epoch 1, unfrozen at epoch 2: momentum must be gone
    quiet_trainer(max_epochs=4, callbacks=[FreezeSchedule(milestones={0: 0, 1: 2, 2: 0}), spy]).fit(model)
    assert spy.state_at_unfreeze == [False, False, False]
    expected = (0.1 / (1 + 8)) if scheduler == "lambda" else None
    if expected is not None:
        assert spy.lr == pytest.approx(expected)
    assert not torch.equal(start["backbone.0.0.weight"], model.backbone[0][0].weight)


def test_parameters_outside_the_optimizer_are_an_error():
    class HeadOnly(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="in no optimizer param group"):
        quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule.lp_ft(1)]).fit(HeadOnly())


def test_bad_input():
    with pytest.raises(ValueError, match="exactly one of"):
        FreezeSchedule()
    with pytest.raises(ValueError, match="exactly one of"):
        FreezeSchedule(depth=1, milestones={0: 1})
    with pytest.raises(ValueError, match="bn must be"):
        FreezeSchedule(depth=1, bn="frozen")
    model = TinyClassifier()
    with pytest.raises(ValueError, match=r"depth 5 is out of range.*2 blocks"):
        quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule(depth=5)]).fit(model)
    with pytest.raises(ValueError, match="past max_epochs"):
        quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule(milestones={0: 1, 5: 0})]).fit(model)
    with pytest.raises(AnatomyError, match="Candidates"):
        quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule(depth=1, blocks=["backbone.7"])]).fit(model)
    assert model.global_step == 0


def test_layer_decay_groups():
    net = torchvision.models.resnet18(weights=None)
    groups = build_param_groups(net, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["fc"]["lr"] == 1.0 and by_name["layer4"]["lr"] == 0.5 and by_name["conv1|bn1"]["lr"] == 0.5**5
    assert by_name["layer4.no_decay"]["weight_decay"] == 0.0 and by_name["layer4"]["weight_decay"] == 0.1
    assert all(p.ndim > 1 for p in by_name["layer4"]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="layer_decay"):
        build_param_groups(net, 1.0, 0.0, layer_decay=1.5)


def test_transfer_classifier_uses_layer_decay():
    model = TransferClassifier("efficientnet_lite0", num_classes=3, pretrained=False, layer_decay=0.8, scheduler="constant")
    opt = model.configure_optimizers()
    names = [g["name"] for g in opt.param_groups]
    assert names[0].startswith("_conv_stem|_bn0") and names[-1].startswith("_fc")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.8**9)


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_resume_at_each_transition_equals_uninterrupted(stop, tmp_path):
    def schedule():
        return [FreezeSchedule(milestones={0: "all", 1: 1, 2: 0})]

    full = TinyClassifier()
    quiet_trainer(max_epochs=4, callbacks=schedule()).fit(full)
    first = TinyClassifier()
    t = quiet_trainer(max_epochs=4, callbacks=[*schedule(), StopAfter(stop)], enable_checkpointing=True,
                      default_root_dir=tmp_path)
    t.fit(first)
    resumed = TinyClassifier(seed=5)
    rec = Record(list_blocks)
    quiet_trainer(max_epochs=4, callbacks=[*schedule(), rec]).fit(resumed, ckpt_path=t.checkpoint_callback.best_model_path)
    assert_params_close(params_of(resumed), params_of(full), rtol=1e-6, atol=1e-7)
    assert rec.trainable[stop] == [i >= {1: 1, 2: 0, 3: 0}[stop] for i in range(3)]


def test_sharded_strategies_are_rejected_with_a_clear_error():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    fake_trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(ValueError, match="FSDP"):
        FreezeSchedule(depth=1).setup(fake_trainer, TinyClassifier(), "fit")


@pytest.mark.slow
def test_ddp_unfreeze_mid_training_keeps_ranks_identical_and_frozen_blocks_untouched(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "contract" / "ddp_run.py"
    # registry entry "FreezeSchedule": block 0 frozen throughout, block 1 unfrozen at epoch 2 (after the wrap)
    proc = subprocess.run([sys.executable, str(script), "FreezeSchedule", str(tmp_path)], capture_output=True, text=True, timeout=300, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert_params_close(ranks[0], ranks[1], rtol=0, atol=0)
    start = params_of(TinyClassifier(batch_size=8))
    for name in ("backbone.0.0.weight", "backbone.0.1.weight", "backbone.0.1.bias"):
        assert torch.equal(ranks[0][name], start[name]), f"frozen {name} moved"
    assert not torch.equal(ranks[0]["backbone.1.0.weight"], start["backbone.1.0.weight"]), "the unfrozen block did not train"


# --- the user's own frozen parameters (issue 14, defect 7) ---------------------------------------


class ManualProbe(Callback):
    """Reference without FreezeSchedule: ``backbone[index]`` frozen (and in eval mode) before ``until``."""

    def __init__(self, index, until):
        self.index, self.until = index, until

    def on_train_epoch_start(self, trainer, pl_module):
        frozen = trainer.current_epoch < self.until
        pl_module.backbone[self.index].requires_grad_(not frozen)
        pl_module.backbone[self.index].train(not frozen)


def tiny_with_user_frozen(index, seed=0):
    model = TinyClassifier(seed=seed)
    model.backbone[index].requires_grad_(False)
    return model


def state_of(module):
    return {n: t.detach().clone() for n, t in [*module.named_parameters(), *module.named_buffers()]}


@pytest.mark.parametrize("schedule,user,other,until", [("lp_ft", 1, 0, 1), ("lp_ft", 0, 1, 1), ("gradual", 1, 0, 2)])
def test_user_frozen_block_is_never_thawed_and_the_rest_trains_as_without_it(schedule, user, other, until):
    # block `user` frozen by the user (block 0 holds a BatchNorm: its mode stays the user's, i.e. train);
    # FreezeSchedule freezes block `other` until epoch `until` and must never touch block `user`
    callback = FreezeSchedule.lp_ft(probe_epochs=1, bn="eval") if schedule == "lp_ft" else FreezeSchedule.gradual(every=1)
    model = tiny_with_user_frozen(user)
    start = params_of(model)
    rec = Record(list_blocks)
    quiet_trainer(max_epochs=3, callbacks=[callback, rec]).fit(model)
    assert all(rec.trainable[e][user] is False for e in range(3)), rec.trainable
    assert all(not p.requires_grad for p in model.backbone[user].parameters())
    for n, p in model.backbone[user].named_parameters():
        assert torch.equal(p, start[f"backbone.{user}.{n}"]), f"user-frozen backbone.{user}.{n} moved"
    reference = tiny_with_user_frozen(user)
    quiet_trainer(max_epochs=3, callbacks=[ManualProbe(other, until)]).fit(reference)
    assert_params_close(state_of(model), state_of(reference), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stop", [1, 3])
def test_user_frozen_block_stays_frozen_after_a_resume(stop, tmp_path):
    def schedule():
        return [FreezeSchedule(milestones={0: "all", 2: 0})]

    full = tiny_with_user_frozen(1)
    start = params_of(full)
    quiet_trainer(max_epochs=4, callbacks=schedule()).fit(full)
    first = tiny_with_user_frozen(1)
    t = quiet_trainer(max_epochs=4, callbacks=[*schedule(), StopAfter(stop)], enable_checkpointing=True,
                      default_root_dir=tmp_path)
    t.fit(first)
    resumed = tiny_with_user_frozen(1, seed=5)  # built afresh; the user's code freezes backbone.1 again
    rec = Record(list_blocks)
    quiet_trainer(max_epochs=4, callbacks=[*schedule(), rec]).fit(resumed, ckpt_path=t.checkpoint_callback.best_model_path)
    assert all(rec.trainable[e][1] is False for e in rec.trainable)
    assert not any(p.requires_grad for p in resumed.backbone[1].parameters())
    assert_params_close(params_of(resumed), params_of(full), rtol=1e-6, atol=1e-7)
    for name in ("backbone.1.0.weight", "backbone.1.0.bias"):
        assert torch.equal(params_of(resumed)[name], start[name]), f"user-frozen {name} moved"
    if stop == 1:  # a resume that forgets to freeze what the checkpointed run froze is pointed out
        with pytest.warns(UserWarning, match="frozen by you before fit"):
            quiet_trainer(max_epochs=4, callbacks=schedule()).fit(TinyClassifier(), ckpt_path=t.checkpoint_callback.best_model_path)


def test_a_later_schedule_on_the_same_model_still_unfreezes_what_an_earlier_one_froze():
    model = TinyClassifier()
    quiet_trainer(max_epochs=1, callbacks=[FreezeSchedule(depth="all")]).fit(model)
    frozen = params_of(model)["backbone.0.0.weight"]
    assert not model.backbone[0][0].weight.requires_grad
    quiet_trainer(max_epochs=1, callbacks=[FreezeSchedule(depth=0)]).fit(model)  # not the user's: thawed
    assert model.backbone[0][0].weight.requires_grad
    assert not torch.equal(model.backbone[0][0].weight, frozen)


@pytest.mark.parametrize("optimize", ["all", "trainable"])
def test_user_frozen_bert_embeddings_stay_frozen_under_lp_ft(optimize):
    from torch.utils.data import DataLoader
    from transformers import BertConfig, BertForSequenceClassification

    from lightning_transfer.batches import batch_inputs

    class Bert(LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, num_labels=3)
            self.model = BertForSequenceClassification(config)
            self.model.bert.embeddings.requires_grad_(False)  # the user's choice

        def training_step(self, batch, batch_idx):
            out = self.model(**batch_inputs(batch), labels=batch["labels"])  # a ModelOutput
            return out.loss

        def configure_optimizers(self):  # "trainable": the user's frozen embeddings are not in the optimizer
            params = [p for n, p in self.named_parameters() if optimize == "all" or ".embeddings." not in n]
            return torch.optim.AdamW(params, lr=1e-2)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 50, (16, 8), generator=g)
            rows = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": torch.tensor(i % 3)}
                    for i in range(16)]
            return DataLoader(rows, batch_size=8)

    module = Bert()
    start = params_of(module)
    blocks = ["model.bert.embeddings", "model.bert.encoder.layer.0", "model.bert.encoder.layer.1", "model.bert.pooler"]
    callback = FreezeSchedule.lp_ft(probe_epochs=1, blocks=blocks, head="model.classifier")
    rec = Record(lambda m: list_blocks(m, blocks, "model.classifier"))
    quiet_trainer(max_epochs=2, callbacks=[callback, rec]).fit(module)
    assert [rec.trainable[e] for e in range(2)] == [[False] * 4 + [True], [False] + [True] * 4]
    end = params_of(module)
    for name in start:
        if ".embeddings." in name:
            assert torch.equal(start[name], end[name]) and not dict(module.named_parameters())[name].requires_grad, name
    assert not torch.equal(start["model.bert.encoder.layer.0.attention.self.query.weight"],
                           end["model.bert.encoder.layer.0.attention.self.query.weight"]), "the encoder did not train"


# --- schedules that cannot finish (defect 10) ------------------------------------------------------


def test_gradual_that_cannot_finish_within_max_epochs_warns_at_setup():
    # 2 blocks, one unfrozen every 2 epochs: depth 0 only at epoch 4, but the run ends at epoch 2 with depth 1
    with pytest.warns(UserWarning, match=r"ends at epoch 2 \(max_epochs=3\) with depth 1 .*every \(unfreeze_every\) <= 1"
                                         r", or max_epochs >= 5, or a start depth <= 1"):
        quiet_trainer(max_epochs=3, callbacks=[FreezeSchedule.gradual(every=2)]).fit(TinyClassifier())


def test_schedule_cut_short_by_max_steps_warns_before_the_first_step():
    model = TinyClassifier()  # 4 batches per epoch: max_steps=4 is one epoch, depth stays 2
    with pytest.warns(UserWarning, match=r"ends at epoch 0 \(max_steps=4 .*with depth 2"):
        quiet_trainer(max_epochs=-1, max_steps=4, callbacks=[FreezeSchedule.gradual(every=1)]).fit(model)
    with pytest.warns(UserWarning, match=r"milestones.*ends at epoch 0 \(max_steps=4"):
        quiet_trainer(max_epochs=5, max_steps=4, callbacks=[FreezeSchedule.lp_ft(probe_epochs=2)]).fit(TinyClassifier())


def test_a_schedule_that_finishes_does_not_warn(recwarn):
    quiet_trainer(max_epochs=3, callbacks=[FreezeSchedule.gradual(every=1)]).fit(TinyClassifier())
    quiet_trainer(max_epochs=-1, max_steps=12, callbacks=[FreezeSchedule.gradual(every=1)]).fit(TinyClassifier())
    assert not [w for w in recwarn if "FreezeSchedule" in str(w.message)]


# --- sharded strategies (defect 15) and argument validation (defect 14) ----------------------------


def test_sharded_strategies_get_a_true_message():
    """Issue 14 #15: the old error claimed FSDP flattens parameters, untrue for FSDP2. FSDP2 is now supported
    (tests/contract/test_sharded.py); FSDP1 and DeepSpeed are refused with what they really lack."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_transfer.validation import check_strategy

    check_strategy(SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)),
                   "FreezeSchedule", sharded=True)  # accepted
    with pytest.raises(ValueError, match="FreezeSchedule does not support FSDPStrategy: FSDP1") as err:
        FreezeSchedule(depth=1).setup(SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy)), TinyClassifier(), "fit")
    assert "flatten" not in str(err.value) and "ModelParallelStrategy" in str(err.value)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make,argument", [
    *[(lambda v=v: FreezeSchedule(depth=v), "depth") for v in (-1, 1.0, True, NAN, INF, "some", [1])],
    *[(lambda v=v: FreezeSchedule(milestones=v), "milestones") for v in (
        {-1: 0}, {0: -1}, {0: 1.5}, {0.5: 1}, {True: 0}, {"a": 1}, {0: True}, {0: "none"}, {0: NAN}, {INF: 0}, {},
        [(0, 1)])],
    *[(lambda v=v: FreezeSchedule(unfreeze_every=v), "unfreeze_every") for v in (0, -1, 1.5, True, NAN, INF, "2")],
    (lambda: FreezeSchedule(depth=1, bn="frozen"), "bn"),
    (lambda: FreezeSchedule(depth=1, bn=None), "bn"),
    *[(lambda v=v: FreezeSchedule(depth=1, blocks=v), "blocks") for v in ("backbone.0", [1], [])],
    (lambda: FreezeSchedule(depth=1, head=3), "head"),
    *[(lambda v=v: FreezeSchedule.lp_ft(v), "probe_epochs") for v in (0, -1, 1.5, True, NAN, INF)],
    *[(lambda v=v: FreezeSchedule.gradual(v), "every") for v in (0, -1, 1.5, True, NAN, INF)],
    *[(lambda v=v: FreezeSchedule.gradual(1, start=v), "start") for v in (-1, 1.5, True, NAN, "none")],
])
def test_invalid_arguments_are_rejected_in_init_naming_the_argument(make, argument):
    with pytest.raises((TypeError, ValueError), match=argument):
        make()


# --- LP-FT and BatchNorm: the probe must survive the unfreeze (issue #17) ------------------------------

class CheckSwitchAccuracy(Callback):
    """At the first step of the unfreeze epoch (after FreezeSchedule set the modes), the accuracy of the
    batch with the probe's BatchNorm modes and with the fine-tuning modes, computed independently on
    copies of the model; compared with what FreezeSchedule logged for that step."""

    def __init__(self, epoch):
        self.epoch, self.expected, self.logged = epoch, None, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch != self.epoch or batch_idx != 0:
            return
        x, y = batch
        import copy

        after = copy.deepcopy(pl_module)
        before = copy.deepcopy(pl_module)
        before.backbone[0][1].eval()  # the probe's mode of the only BatchNorm (block 0)
        with torch.no_grad():
            self.expected = tuple(float((m(x).argmax(1) == y).float().mean()) for m in (before, after))


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_lp_ft_logs_the_accuracy_just_before_and_after_the_unfreeze(bn, tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    check = CheckSwitchAccuracy(epoch=2)
    model = TinyClassifier(batch_size=32)  # 2 steps per epoch: the switch is step 4
    quiet_trainer(max_epochs=4, callbacks=[FreezeSchedule.lp_ft(probe_epochs=2, bn=bn), check],
                  logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1).fit(model)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("freeze/acc_before_unfreeze")]
    # logged at the first step after the switch (Lightning repeats a step value until the epoch ends)
    assert min(int(r["step"]) for r in rows) == 4 and {int(r["epoch"]) for r in rows} == {2}
    before, after = float(rows[0]["freeze/acc_before_unfreeze"]), float(rows[0]["freeze/acc_after_unfreeze"])
    if bn == "eval":
        assert (before, after) == pytest.approx(check.expected)
    else:  # the probe already trained on batch statistics: nothing changes at the switch
        assert before == after == pytest.approx(check.expected[1])


def test_lp_ft_warns_when_bn_eval_would_throw_the_probe_away(recwarn):
    with pytest.warns(UserWarning, match=r"LP-FT\) with bn='eval' on a network with BatchNorm.*Use bn='train'"):
        quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule.lp_ft(1, bn="eval")]).fit(TinyClassifier())
    recwarn.clear()
    quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule.lp_ft(1)]).fit(TinyClassifier())  # default: bn="train"
    quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule.lp_ft(1, bn="eval")]).fit(TinyClassifier(norm=False))
    quiet_trainer(max_epochs=2, callbacks=[FreezeSchedule(depth="all", bn="eval")]).fit(TinyClassifier())
    assert not [w for w in recwarn if "LP-FT" in str(w.message)]
    assert FreezeSchedule.lp_ft(1).bn == "train"
