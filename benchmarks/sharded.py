"""Per-rank memory of every callback under sharded training (FSDP2 through ModelParallelStrategy) on 2 CPU ranks.

One launch trains the same MLP (``--depth`` × Linear(width, width) + a linear head, ``fully_shard`` per Linear
and at the root) with each callback the library supports under FSDP2, and plain, and reports per rank:

* parameters, gradients and optimizer state (SGD momentum): the local shards' bytes (``numel × element_size``),
  after fit;
* what the callback itself holds: the storage bytes of every tensor reachable from the callback object (its
  attributes walked recursively through dicts, lists, tuples, sets, ``nn.Module`` s and the library's own
  objects; a DTensor counted as its ``.to_local()``; deduplicated by storage pointer), excluding tensors
  that ARE the live model's parameters, gradients, buffers or optimizer state (a callback that only
  references the model holds nothing). The Trainer, the live LightningModule and its submodules,
  optimizers, loaders, hooks and functions are not entered. Measured twice: at a mid-training step
  (``on_train_batch_end`` of batch ``--warmup``) and after fit; the larger one enters the ratio;
* the same callback-held bytes in one unsharded process (same model, same callbacks, devices=1), which
  says whether the sharded run holds 1/N of it (a shard) or all of it (a full copy on every rank);
* rank 1's numbers, gathered with ``all_gather_object``, compared with rank 0's.

Step time (noisy: 2 CPU cores shared with other work) is the median wall time between
``on_train_batch_start`` and ``on_train_batch_end`` on rank 0 after ``--warmup`` steps; variants are shuffled
in each round and each round's median is divided by that round's plain median.

    python benchmarks/sharded.py                                  # a few minutes on 2 shared cores
    python benchmarks/sharded.py --quick --out /tmp/sharded.md    # smoke run (tiny model)
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
import types
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.hooks import RemovableHandle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_transfer import (  # noqa: E402
    BSS,
    DTNH,
    L2SP,
    RIFLE,
    SPD,
    CoTuning,
    FeatureMapRegularization,
    FreezeSchedule,
    LiNeS,
    MaxEntropyHeadInit,
    RepresentationSimilarity,
    WiSEFT,
)
from lightning_transfer.anatomy import find_head, list_blocks  # noqa: E402
from lightning_transfer.functional.sharding import fully_shard_linears, local  # noqa: E402

MiB = 2**20
SOURCE_CLASSES = 1000  # CoTuning's source head: nn.Linear(width, 1000), an ImageNet-sized classifier


def _variants(args) -> dict[str, object]:
    """name -> (model -> callbacks), or a string saying why the variant does not apply to this model."""
    probe = MLP(8, args.depth)  # names only
    blocks = [n for n, _ in list_blocks(probe)]
    head = find_head(probe)[0]
    layers = [n for n in blocks if n != head]  # DELTA's feature maps: every backbone block (root: backbone)
    mid = args.warmup + args.steps // 2
    return {
        "plain": lambda: [],
        "L2SP": lambda: [L2SP(alpha=0.01, beta=0.01)],
        "L2SP+DTNH": lambda: [L2SP(alpha=0.01, beta=0.01), DTNH()],
        "SPD": lambda: [SPD(lam=1.0)],
        "FeatureMapRegularization (DELTA)": lambda: [FeatureMapRegularization(layers, alpha=0.01)],
        "RepresentationSimilarity": lambda: [RepresentationSimilarity(probe_size=args.probe)],
        "WiSEFT": lambda: [WiSEFT(alphas=[0.0, 0.5, 1.0])],
        "LiNeS": lambda: [LiNeS(alphas=[0.0, 0.5, 1.0], beta=0.5)],
        "FreezeSchedule (depth 1)": lambda: [FreezeSchedule(depth=1)],
        "RIFLE": lambda: [RIFLE(points=[mid], interval="step", min_epochs_after=1, min_steps_after_last=1, seed=0)],
        "MaxEntropyHeadInit": lambda: [MaxEntropyHeadInit()],
        "BSS": lambda: [BSS(eta=0.001, k=1)],
        "CoTuning": lambda: [CoTuning(_source_head(args.width), alpha=2.3)],
        "StochNorm": "n/a (no BatchNorm)",
    }


def _source_head(width: int) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(width, SOURCE_CLASSES)


class MLP(LightningModule):
    """An MLP backbone and a linear head, ``fully_shard``-ed per Linear and at the root (when sharded)."""

    def __init__(self, width: int, depth: int, classes: int = 10, n: int = 512, n_val: int = 128,
                 batch_size: int = 32):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)
        self.width, self.classes, self.n, self.n_val, self.batch_size = width, classes, n, n_val, batch_size

    def configure_model(self):
        if self.device_mesh is not None:
            fully_shard_linears(self, self.device_mesh["data_parallel"])

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def _data(self, n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(n, self.width, generator=g), torch.randint(0, self.classes, (n,), generator=g))

    def train_dataloader(self):
        return DataLoader(self._data(self.n, 0), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self._data(self.n_val, 1), batch_size=64)


class StepTimer(Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


# ------------------------------------------------------------------ what a callback holds

_OPAQUE = (Trainer, LightningModule, torch.optim.Optimizer, DataLoader, weakref.ref, RemovableHandle,
           types.FunctionType, types.MethodType, types.BuiltinFunctionType, type, types.ModuleType)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(pointer, bytes) of the storage holding this rank's part of ``t`` (its local shard for a DTensor)."""
    t = local(t)
    if t.device.type == "meta":
        return 0, 0
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _live_storages(trainer: Trainer, model: LightningModule) -> set[int]:
    """Storage pointers of the live model's parameters, gradients, buffers and optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for opt in trainer.optimizers:
        tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {ptr for ptr in (_storage(t)[0] for t in tensors) if ptr}


def _fsdp_unsharded(module: nn.Module) -> list[torch.Tensor]:
    """The gathered (unsharded) parameters an FSDP2 unit keeps allocated, if any (they are not module attributes)."""
    try:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(module, FSDPModule):
            return []
        group = module._get_fsdp_state()._fsdp_param_group
        params = group.fsdp_params if group is not None else []
        return [t for fp in params for t in [getattr(fp, "_unsharded_param", None)] if isinstance(t, torch.Tensor)]
    except Exception:  # private FSDP2 internals: best effort
        return []


def held_bytes(callbacks: list[Callback], trainer: Trainer, model: LightningModule) -> dict[str, int]:
    """Storage bytes of the tensors reachable from ``callbacks`` that are not the live model's own tensors, by
    the callback attribute they were first reached from (``Class.attribute``; callbacks walked in order)."""
    live = _live_storages(trainer, model)
    skip = {id(trainer), id(model)} | {id(m) for m in model.modules()}
    seen: set[int] = set()
    storages: set[int] = set()
    held: dict[str, int] = {}
    for cb in callbacks:
        seen.add(id(cb))
        for attr, value in vars(cb).items():
            where = f"{type(cb).__name__}.{attr}"
            stack: list = [value]
            while stack:
                o = stack.pop()
                if o is None or isinstance(o, (str, bytes, int, float, bool, complex)) or id(o) in seen or id(o) in skip:
                    continue
                seen.add(id(o))
                if isinstance(o, torch.Tensor):
                    ptr, size = _storage(o)
                    if ptr and ptr not in live and ptr not in storages:
                        storages.add(ptr)
                        held[where] = held.get(where, 0) + size
                elif isinstance(o, _OPAQUE):
                    continue
                elif isinstance(o, dict):
                    stack += [*o.keys(), *o.values()]
                elif isinstance(o, (list, tuple, set, frozenset)):
                    stack += list(o)
                elif isinstance(o, nn.Module):
                    stack += [*o._parameters.values(), *o._buffers.values(), *o._modules.values(), *_fsdp_unsharded(o)]
                    stack += [v for k, v in vars(o).items() if k not in ("_parameters", "_buffers", "_modules")]
                elif hasattr(o, "__dict__") and (isinstance(o, Callback)
                                                 or type(o).__module__.startswith("lightning_transfer")):
                    stack += list(vars(o).values())
    return held


class HeldProbe(Callback):
    """Measures what the other callbacks hold at the end of one training batch (mid-training)."""

    def __init__(self, callbacks: list[Callback], at: int):
        self.callbacks, self.at, self.held = callbacks, at, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.held = held_bytes(self.callbacks, trainer, pl_module)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_variant(make, args, sharded: bool = True) -> dict:
    timer = StepTimer(args.warmup)
    callbacks = make()
    probe = HeldProbe(callbacks, args.warmup)
    model = MLP(args.width, args.depth)
    strategy = dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)) \
        if sharded else dict(devices=1)
    trainer = Trainer(accelerator="cpu", **strategy, max_steps=args.warmup + args.steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=2, callbacks=[*callbacks, timer, probe])
    trainer.fit(model)
    end = held_bytes(callbacks, trainer, model)
    opt = [v for o in trainer.optimizers for s in o.state.values() for v in s.values()
           if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "params": _bytes(local(p) for p in model.parameters()),
        "grads": _bytes(local(p.grad) for p in model.parameters() if p.grad is not None),
        "optim": _bytes(local(v) for v in opt),
        "held_mid": sum(probe.held.values()),
        "held_end": sum(end.values()),
        "by": probe.held if sum(probe.held.values()) >= sum(end.values()) else end,
        "step": statistics.median(timer.times),
        "full": _bytes(p for p in model.parameters()),  # a DTensor's numel is the full tensor's
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--probe", type=int, default=128, help="RepresentationSimilarity's probe_size")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round, 4 steps: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sharded_cpu.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.rounds, args.steps, args.warmup, args.probe = 64, 2, 1, 4, 2, 16
    started = time.perf_counter()
    variants = _variants(args)
    runnable = [n for n, v in variants.items() if callable(v)]
    # the unsharded reference: one process, before the 2-rank launch (the launched rank 1 skips it)
    unsharded: dict[str, int] = {}
    if "LOCAL_RANK" not in os.environ:
        for name in runnable:
            r = run_variant(variants[name], args, sharded=False)
            unsharded[name] = max(r["held_mid"], r["held_end"])
    random.seed(0)
    results: dict[str, dict] = {}
    steps: dict[str, list[float]] = {n: [] for n in runnable}
    ratios: dict[str, list[float]] = {n: [] for n in runnable}
    for _ in range(args.rounds):
        order = list(runnable)
        random.shuffle(order)
        times = {}
        for name in order:
            results[name] = run_variant(variants[name], args)
            times[name] = results[name]["step"]
        for name in runnable:
            steps[name].append(times[name])
            ratios[name].append(times[name] / times["plain"])
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() != 0:
        return
    elapsed = time.perf_counter() - started
    other = gathered[1]
    keys = ("params", "grads", "optim", "held_mid", "held_end")
    disagree = [f"{n}: {k} {results[n][k]} vs {other[n][k]}" for n in runnable for k in keys
                if results[n][k] != other[n][k]]
    plain = results["plain"]
    base = plain["params"] + plain["grads"] + plain["optim"]
    full = plain["full"]
    lines = [
        "# Sharded training (FSDP2, ModelParallelStrategy) on 2 CPU ranks: per-rank memory of every callback",
        "",
        f"Reproduce: `python benchmarks/sharded.py --width {args.width} --depth {args.depth} --rounds {args.rounds} "
        f"--steps {args.steps} --warmup {args.warmup} --probe {args.probe} --out {args.out}` "
        f"(this run: {elapsed / 60:.1f} min on rank 0, including the unsharded reference runs)",
        "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads per rank; torch {torch.__version__}; "
        f"gloo. Model: MLP {args.depth}×Linear({args.width}, {args.width}) + head (10 classes), fully_shard per "
        f"Linear and at the root, fp32, SGD momentum, per-rank batch 32; validation 128 examples. "
        f"{args.warmup + args.steps} steps per fit; {args.rounds} rounds, variants shuffled each round.",
        "",
        f"Full model: {full / MiB:.2f} MiB of parameters. Memory per rank (rank 0), in MiB; rank 1 "
        + ("agrees in every memory column." if not disagree else "differs: " + "; ".join(disagree) + "."),
        "",
        "| variant | params | grads | optimizer state | callback-held, mid-training | callback-held, after fit "
        "| callback-held unsharded (1 process) | held per rank / unsharded | held / full model "
        "| memory ratio to plain | held by (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    timing = ["| variant | step (ms, median) | step time ratio to plain (median, min-max) |", "|---|---|---|"]
    for name, make in variants.items():
        if not callable(make):
            lines.append(f"| {name} | {make} |" + " |" * 9)
            continue
        m = results[name]
        held = max(m["held_mid"], m["held_end"])
        total = m["params"] + m["grads"] + m["optim"] + held
        single = unsharded.get(name, 0)
        per = f"{held / single:.3f}" if single else "—"
        by = ", ".join(f"`{k}` {v / MiB:.3f}" for k, v in sorted(m["by"].items(), key=lambda kv: -kv[1])) or "—"
        lines.append(
            f"| {name} | {m['params'] / MiB:.2f} | {m['grads'] / MiB:.2f} | {m['optim'] / MiB:.2f} | "
            f"{m['held_mid'] / MiB:.3f} | {m['held_end'] / MiB:.3f} | {single / MiB:.3f} | {per} | "
            f"{held / full:.3f} | {total / base:.2f} | {by} |"
        )
        r = ratios[name]
        timing.append(f"| {name} | {statistics.median(steps[name]) * 1e3:.1f} | "
                      f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f}) |")
    lines += [
        "",
        "Memory ratio: (params + grads + optimizer state + callback-held) / (params + grads + optimizer state) of "
        "plain sharded training, per rank; callback-held is the larger of the mid-training and after-fit "
        "measurements. \"Callback-held\" counts the storage of tensors reachable from the callback object that "
        "are not the live model's parameters, gradients, buffers or optimizer state (see the script's "
        "docstring); transient tensors created and dropped inside a hook are not seen. "
        "\"Held per rank / unsharded\": ~0.5 is a shard (1/N on 2 ranks), ~1.0 a full copy on every rank.",
        "",
        f"Step time per variant, {args.rounds} rounds × {args.steps} measured steps:",
        "",
        *timing,
        "",
        "Step time: 2 CPU cores shared with other work, few steps and rounds: the spread (min-max over rounds) "
        "is as large as most callbacks' cost, so ratios near 1 mean \"within noise\". Memory is exact; time is not.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
