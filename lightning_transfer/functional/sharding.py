"""Small helpers for parameters that are DTensors sharded by FSDP2 (``fully_shard``), and plain tensors alike.

Every function accepts plain tensors too (then it is the identity, or no communication), so callers
write one code path for single-device, DDP and FSDP2 training. Supported layouts: placements that are
``Shard(0)`` or ``Replicate()`` on the parameter's device mesh (what ``fully_shard`` produces, also
HSDP); partial sums over ``Shard`` mesh dimensions are summed across those ranks, never over
``Replicate`` ones (which would count them twice).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "fully_shard_blocks", "fully_shard_linears", "fully_shard_like",
    "ShardingError", "check_shardable", "full_tensor", "is_sharded", "local", "reduce_partial_sums",
    "shard_like", "copy_full_", "plain_parameters",
]


class ShardingError(ValueError):
    """A parameter layout the sharded code paths do not support (e.g. tensor parallelism)."""


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed support
        return None
    return DTensor


def is_sharded(t: Tensor | None) -> bool:
    """Whether ``t`` is a DTensor (a parameter or gradient of an FSDP2 module)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` as a plain tensor sharing its storage (``t`` itself when not a DTensor).

    In-place changes of the result change ``t`` (e.g. ``local(p.grad).add_(r)``).
    """
    if is_sharded(t):
        with torch.no_grad():
            return t.to_local()
    return t


def check_shardable(named: Sequence[tuple[str, Tensor]], owner: str) -> None:
    """Refuse layouts other than ``Shard(0)``/``Replicate`` (FSDP2's), and DTensors mixed with plain tensors.

    Group-lasso rows and the reductions here assume dim-0 shards on one mesh; tensor parallelism shards
    other dims (or strides them) and is not supported.
    """
    from torch.distributed.tensor import Replicate, Shard

    sharded = [(n, p) for n, p in named if is_sharded(p)]
    if not sharded:
        return
    plain = [n for n, p in named if not is_sharded(p)]
    if plain:
        raise ShardingError(
            f"{owner}: parameters {plain[:3]} are plain tensors while others are sharded DTensors. Apply "
            "fully_shard to the root module too (after the submodules) in configure_model, so that every "
            "parameter is sharded."
        )
    layouts: set = set()
    for n, p in sharded:
        bad = [pl for pl in p.placements if not (pl == Shard(0) or isinstance(pl, Replicate))]
        if bad:
            raise ShardingError(
                f"{owner}: parameter {n!r} is sharded as {p.placements}; only dim-0 sharding from fully_shard "
                "(FSDP2, also HSDP) is supported, not tensor parallelism. Use "
                "ModelParallelStrategy(tensor_parallel_size=1) with fully_shard, or DDP."
            )
        layouts.add((p.device_mesh, tuple(p.placements)))  # meshes compare by ranks and dim names
    if len(layouts) > 1:
        raise ShardingError(f"{owner}: the parameters are sharded on different meshes or placements; "
                            "apply fully_shard with one mesh to every module.")


def reduce_partial_sums(values: Tensor, like: Sequence[Tensor]) -> Tensor:
    """Sum ``values`` (a tensor of per-rank partial sums) over the ranks that hold shards of ``like``.

    One ``all_reduce`` per sharded mesh dimension (one in total for FSDP2); the identity when ``like``
    holds no DTensor. Every rank must call it (a collective).
    """
    first = next((p for p in like if is_sharded(p)), None)
    if first is None:
        return values
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = first.device_mesh
    for dim, placement in enumerate(first.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(values, group=mesh.get_group(dim))
    return values


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """The shard of the full tensor ``full`` that this rank holds of ``like`` (a plain tensor; no communication).

    ``full`` must be the same on every rank. ``full`` itself when ``like`` is not a DTensor.
    """
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(like.device_mesh.device_type)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def full_tensor(shard: Tensor, like: Tensor) -> Tensor:
    """The full tensor whose shards (sharded like ``like``) ``shard`` is this rank's (an all-gather).

    ``shard`` itself when ``like`` is not a DTensor; a DTensor ``shard`` is gathered as it is. Every
    rank must call it.
    """
    if is_sharded(shard):
        return shard.full_tensor()
    if not is_sharded(like):
        return shard
    from torch.distributed.tensor import DTensor

    gathered = DTensor.from_local(shard, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return gathered.full_tensor()


@torch.no_grad()
def copy_full_(target: Tensor, full: Tensor) -> None:
    """``target.copy_(full)`` where ``target`` may be a DTensor: each rank copies its own shard."""
    if is_sharded(target):
        local(target).copy_(shard_like(full.to(target.dtype), target))
    else:
        target.copy_(full.to(target.dtype))


@contextmanager
def plain_parameters(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s DTensor parameters are plain full-size tensors; on exit each rank
    copies its shard of them back.

    For code that must see the whole tensor as a single-process run does, e.g. a seeded
    ``reset_parameters()``: the draw is then the same full tensor as without sharding. Nothing happens
    for a module without DTensor parameters.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and is_sharded(p):
                plain = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                m._parameters[name] = plain
                swapped.append((m, name, p, plain))
    try:
        yield
    finally:
        for m, name, original, plain in swapped:
            m._parameters[name] = original
            copy_full_(original, plain.detach())


def fully_shard_blocks(module: nn.Module, blocks: Sequence[nn.Module], mesh: DeviceMesh) -> nn.Module:
    """FSDP2 per block: ``fully_shard`` each block of ``module`` over ``mesh``, then ``module`` itself (the root).

    Each block becomes one FSDP2 unit, whose parameters are all-gathered just before it runs and freed
    after it ran (only a block or two hold full parameters at a time, besides the root). A block that is not a
    submodule of ``module`` (a group of references such as :class:`~lightning_transfer.anatomy.BlockGroup`)
    is sharded as its outermost modules that are: a unit must be a module that runs in the forward, and
    a group runs only through its members. The parameters of no unit (a group's loose parameters, e.g. a
    class token of the network's root; whatever lies outside the blocks) belong to the root's unit.
    Units are sharded innermost first, as FSDP2 requires (a unit takes every parameter of its module that
    no inner unit holds); blocks without parameters and modules already sharded are left as they are.

    Call it in ``LightningModule.configure_model`` under ``ModelParallelStrategy`` with
    ``self.device_mesh["data_parallel"]``. Idempotent: when ``module`` is already an FSDP2 module (Lightning
    may call ``configure_model`` again) nothing happens.

    Args:
        module: The root to shard last (the LightningModule, so that every parameter it holds is sharded).
        blocks: Modules of ``module``, or groups of them, each to become a unit (e.g. the modules of
            :func:`~lightning_transfer.list_blocks`).
        mesh: The 1-D data-parallel device mesh.

    Returns:
        ``module``, sharded in place (now also an instance of ``torch.distributed.fsdp.FSDPModule``).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module, FSDPModule):
        return module
    position = {id(m): i for i, m in enumerate(module.modules())}  # pre-order: an ancestor comes first

    def units(block: nn.Module) -> list[nn.Module]:
        if id(block) in position:
            return [block]
        return [u for child in block.children() for u in units(child)]

    found = {id(u): u for block in blocks for u in units(block)}
    for unit in sorted(found.values(), key=lambda u: -position[id(u)]):  # innermost first
        if not isinstance(unit, FSDPModule) and any(True for _ in unit.parameters()):
            fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def fully_shard_linears(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 as the library's contract tests and benchmarks use it: each ``nn.Linear`` a unit, then the root.

    :func:`fully_shard_blocks` with every ``nn.Linear`` of ``module`` as a block (idempotent too).
    """
    return fully_shard_blocks(module, [m for m in module.modules() if isinstance(m, nn.Linear)], mesh)


def fully_shard_like(copy: nn.Module, live: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard ``copy`` (an unsharded copy of ``live`` taken before ``live`` was sharded) as ``live`` is.

    Every FSDP2 unit of ``live`` (a ``torch.distributed.fsdp.FSDPModule`` among its modules) becomes a
    unit of ``copy`` at the same name, innermost first, then ``copy`` itself (:func:`fully_shard_blocks`),
    on the mesh of ``live``'s sharded parameters (``mesh`` when it holds none). A forward of
    ``copy`` then gathers one unit's parameters at a time, as the live forward does, and each rank holds
    the same shards of ``copy`` as of ``live``.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [(name, m) for name, m in live.named_modules() if name and isinstance(m, FSDPModule)]
    meshes = [p.device_mesh for _, m in units for p in m.parameters() if is_sharded(p)]
    meshes += [p.device_mesh for p in live.parameters() if is_sharded(p)]
    mesh = meshes[0] if meshes else mesh
    if mesh is None:
        raise ShardingError("fully_shard_like: the live module holds no sharded parameter and no mesh was given.")
    return fully_shard_blocks(copy, [copy.get_submodule(name) for name, _ in units], mesh)
