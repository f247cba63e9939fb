"""FreezeSchedule and layer-wise LR decay: depth semantics, BatchNorm, schedules, schedulers, bad input."""

import pytest
import torch
import torchvision
from lightning.pytorch import Callback

from lightning_transfer import AnatomyError, FreezeSchedule, TransferClassifier, list_blocks
from lightning_transfer.freezing import depth_at, gradual_milestones
from lightning_transfer.model import build_backbone
from lightning_transfer.optim import build_param_groups
from tests.contract.test_contract import StopAfter
from tests.helpers import ImageModule, TinyClassifier, assert_params_close, params_of, quiet_trainer

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
    trainer = quiet_trainer(max_epochs=4, callbacks=[FreezeSchedule.lp_ft(probe_epochs=2), rec])
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
    assert by_name["fc"]["lr"] == 1.0 and by_name["layer4"]["lr"] == 0.5 and by_name["stem"]["lr"] == 0.5**5
    assert by_name["layer4.no_decay"]["weight_decay"] == 0.0 and by_name["layer4"]["weight_decay"] == 0.1
    assert all(p.ndim > 1 for p in by_name["layer4"]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="layer_decay"):
        build_param_groups(net, 1.0, 0.0, layer_decay=1.5)


def test_transfer_classifier_uses_layer_decay():
    model = TransferClassifier("efficientnet_lite0", num_classes=3, pretrained=False, layer_decay=0.8, scheduler="constant")
    opt = model.configure_optimizers()
    names = [g["name"] for g in opt.param_groups]
    assert names[0].startswith("stem") and names[-1].startswith("_fc")
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
    proc = subprocess.run([sys.executable, str(script), "FreezeSchedule", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert_params_close(ranks[0], ranks[1], rtol=0, atol=0)
    start = params_of(TinyClassifier(batch_size=8))
    for name in ("backbone.0.0.weight", "backbone.0.1.weight", "backbone.0.1.bias"):
        assert torch.equal(ranks[0][name], start[name]), f"frozen {name} moved"
    assert not torch.equal(ranks[0]["backbone.1.0.weight"], start["backbone.1.0.weight"]), "the unfrozen block did not train"
