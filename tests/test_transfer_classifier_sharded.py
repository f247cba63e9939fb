"""``TransferClassifier`` shards itself with FSDP2 under ``ModelParallelStrategy`` (``configure_model``).

The slow tests run both families, a CNN of the user's and a tiny Hugging Face BERT, in one 2-rank CPU
launch (tests/transfer_classifier_sharded_run.py, gloo) and compare with a single-process run on the same
global batches, here; the fast ones check the sharding itself in one process (a world of one rank).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_transfer import TransferClassifier, list_blocks
from lightning_transfer.anatomy import BlockGroup
from lightning_transfer.functional.sharding import (
    ShardingError,
    fully_shard_blocks,
    fully_shard_linears,
    is_sharded,
)
from tests.helpers import assert_params_close, launch_env, quiet_trainer
from tests.transfer_classifier_sharded_run import (
    EPOCHS,
    SmallConvNet,
    SplitData,
    build_model,
    dataset,
    reference,
)

SCRIPT = Path(__file__).with_name("transfer_classifier_sharded_run.py")
FAMILIES = ["cnn", "bert"]


def expected_units(model: TransferClassifier) -> list[str]:
    """The modules that must be FSDP2 units: the root, each block of the backbone (the members of a group)."""
    names = {n for n, _ in model.named_modules()}
    units = [""]
    for name, block in list_blocks(model.backbone):
        parts = name.split("|") if isinstance(block, BlockGroup) else [name]
        units += [f"backbone.{p}" for p in parts if f"backbone.{p}" in names]  # a group's loose parameters: the root's
    return units

# one worker runs this module under `-n 2` (pyproject: --dist loadgroup): its module-scoped 2-rank launch runs
# once, not once per worker that receives some of its tests
pytestmark = pytest.mark.xdist_group("transfer_classifier_fsdp2_launch")

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """One 2-rank launch of both families (uninterrupted, then stopped halfway and resumed): rank 0's results."""
    out = tmp_path_factory.mktemp("sharded_classifier")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *FAMILIES], capture_output=True, text=True,
                          timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {f: torch.load(out / f"{f}.pt") for f in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_equals_single_process(family, sharded):
    result = sharded[family]
    assert_params_close(result["params"], reference(family), rtol=1e-5, atol=1e-6)
    start = dict(build_model(family).named_parameters())
    head = next(n for n in start if n.startswith(f"backbone.{list_blocks(build_model(family).backbone)[-1][0]}."))
    first = next(iter(start))  # the first block's (the CNN's gain, BERT's word embeddings)
    for name in (head, first):  # it trained, head and first block alike
        assert not torch.equal(start[name].detach(), result["params"][name]), name


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_resume_from_distributed_checkpoint_equals_uninterrupted(family, sharded):
    result = sharded[family]
    assert result["checkpoint_is_dir"]  # Lightning's sharded checkpoint: a folder of per-rank shards
    assert result["resumed_step"] == EPOCHS * 2
    assert_params_close(result["resumed"], result["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_units_are_the_blocks_and_every_parameter_is_sharded(family, sharded):
    result = sharded[family]
    assert sorted(result["units"]) == sorted(expected_units(build_model(family)))
    local, full = result["numel"]  # every parameter a DTensor (to_local() worked), each rank holds about half
    assert full / 2 <= local < 0.55 * full


@pytest.mark.slow
def test_the_cli_with_the_fsdp2_config_trains_sharded(tmp_path):
    """`lightning-transfer fit --config configs/quickstart.yaml --config configs/fsdp2.yaml`, one tiny step: two
    processes, and the checkpoint is Lightning's distributed one, each rank's file holding half the state."""
    root = Path(__file__).resolve().parents[1]
    args = ["fit", "--config", "configs/quickstart.yaml", "--config", "configs/fsdp2.yaml",
            "--model.init_args.pretrained=false", "--trainer.logger=false", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.per_class=2", "--data.init_args.batch_size=4", "--data.init_args.image_size=32"]
    proc = subprocess.run([sys.executable, "-m", "lightning_transfer.cli", *args], cwd=root, capture_output=True,
                          text=True, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    sizes = [f.stat().st_size for f in sorted(checkpoint.glob("*.distcp"))]
    assert checkpoint.is_dir() and len(sizes) == 2 and min(sizes) > 0.4 * sum(sizes)


# ------------------------------------------------------------------ one process (no launch)


@pytest.fixture
def mesh(tmp_path):
    """A one-rank gloo group and its 2-D mesh, as ModelParallelStrategy(1, 1) builds it; destroyed after."""
    from torch.distributed.device_mesh import init_device_mesh

    # a group left by an earlier test in this worker would be a leak of its own: fail, do not skip
    assert not dist.is_initialized(), "a process group is already initialized in this process (an earlier test leaked it)"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()


def _tiny_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=lambda c: nn.GroupNorm(1, c))  # blocks: conv1|bn1, layer1..4, fc


def test_configure_model_shards_per_block_once(mesh):
    from torch.distributed.fsdp import FSDPModule

    model = TransferClassifier(_tiny_resnet(), num_classes=3)
    x = torch.rand(2, 3, 32, 32)
    expected = model(x).detach()
    model._device_mesh = mesh  # what ModelParallelStrategy sets before configure_model
    model.configure_model()
    units = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    assert units == ["", "backbone.conv1", "backbone.bn1", *[f"backbone.layer{i}" for i in range(1, 5)], "backbone.fc"]
    assert all(is_sharded(p) for p in model.parameters())
    assert type(model.backbone).__name__ == "ResNet"  # not wrapped: the anatomy still knows the family
    params, states = list(model.parameters()), [m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)]
    model.configure_model()  # Lightning may call it again: nothing changes
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert [m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)] == states
    torch.testing.assert_close(model(x), expected)  # the sharded model computes what the plain one did


def test_sharding_functions_twice_do_not_reshard(mesh):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fully_shard_linears(net, mesh["data_parallel"])
    params = list(net.parameters())
    fully_shard_linears(net, mesh["data_parallel"])
    fully_shard_blocks(net, list(net), mesh["data_parallel"])
    assert all(a is b for a, b in zip(params, net.parameters())) and all(is_sharded(p) for p in params)


def test_configure_model_does_nothing_outside_model_parallel():
    from torch.distributed.fsdp import FSDPModule

    torch.manual_seed(0)
    model = TransferClassifier(SmallConvNet(), num_classes=3, scheduler="constant")
    quiet_trainer(max_steps=1, accelerator="cpu").fit(model, datamodule=SplitData(dataset("cnn"), 16))
    assert not any(isinstance(m, FSDPModule) for m in model.modules())
    assert not any(is_sharded(p) for p in model.parameters())


class _Mesh:
    """A stand-in for ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)'s mesh."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __getitem__(self, name: str):
        return type("Sub", (), {"size": lambda _: 2 if name == "tensor_parallel" else 1})()


def test_tensor_parallelism_is_refused_with_the_way_out():
    model = TransferClassifier(SmallConvNet(), num_classes=3)
    model._device_mesh = _Mesh()
    with pytest.raises(ShardingError, match=r"tensor_parallel_size=2\).*tensor_parallel_size=1"):
        model.configure_model()
