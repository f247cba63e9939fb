"""Cost of L2SP and L2SP+DTNH under sharded training (FSDP2 through ModelParallelStrategy) on 2 CPU ranks.

Per-rank memory: bytes of this rank's parameter shards, gradient shards and L2SP anchors (what the callback
adds), counted exactly from the tensors. Step time: median wall time of a training step (forward,
backward, reduce-scatter, the callbacks' hooks and the optimizer), measured between
``on_train_batch_start`` and ``on_train_batch_end`` on rank 0. Variants are interleaved in shuffled order,
round after round, in one launch; each round's median is divided by the same round's plain median and
the report gives the median of those ratios and their spread (min-max). Peak RSS is not reported: one
process runs every variant, so its high-water mark says nothing per variant.

    python benchmarks/sharded.py                      # ~5 min on 2 shared cores
    python benchmarks/sharded.py --quick --out /tmp/sharded.md   # smoke run
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_transfer import DTNH, L2SP  # noqa: E402
from lightning_transfer.functional.sharding import fully_shard_linears, local  # noqa: E402

VARIANTS = {
    "plain": lambda: [],
    "L2SP": lambda: [L2SP(alpha=0.01, beta=0.01)],
    "L2SP+DTNH": lambda: [L2SP(alpha=0.01, beta=0.01), DTNH()],
}


class MLP(LightningModule):
    """An MLP backbone and a linear head, ``fully_shard``-ed per Linear and at the root."""

    def __init__(self, width: int, depth: int, classes: int = 10, n: int = 512, batch_size: int = 32):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)
        self.width, self.classes, self.n, self.batch_size = width, classes, n, batch_size

    def configure_model(self):
        fully_shard_linears(self, self.device_mesh["data_parallel"])

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(self.n, self.width, generator=g), torch.randint(0, self.classes, (self.n,), generator=g))
        return DataLoader(data, batch_size=self.batch_size)


class StepTimer(Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_variant(name: str, args) -> tuple[float, dict[str, int], int]:
    timer = StepTimer(args.warmup)
    callbacks = VARIANTS[name]()
    model = MLP(args.width, args.depth)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                      max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[*callbacks, timer])
    trainer.fit(model)
    params = [local(p) for p in model.parameters()]
    anchors = [a for cb in callbacks if isinstance(cb, L2SP) for a in cb._anchors]
    memory = {"params": _bytes(params), "grads": _bytes(local(p.grad) for p in model.parameters() if p.grad is not None),
              "anchors": _bytes(anchors)}
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    return statistics.median(timer.times), memory, full


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round, 2 steps: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sharded_cpu.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.rounds, args.steps, args.warmup = 64, 2, 1, 2, 1
    random.seed(0)
    ratios: dict[str, list[float]] = {n: [] for n in VARIANTS}
    medians: dict[str, list[float]] = {n: [] for n in VARIANTS}
    memory: dict[str, dict[str, int]] = {}
    rank = 0
    for _ in range(args.rounds):
        order = list(VARIANTS)
        random.shuffle(order)
        times = {}
        for name in order:
            times[name], memory[name], full = run_variant(name, args)
        rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
        for name in VARIANTS:
            medians[name].append(times[name])
            ratios[name].append(times[name] / times["plain"])
    if rank != 0:
        return
    plain = memory["plain"]["params"] + memory["plain"]["grads"]
    lines = [
        "# Sharded training (FSDP2, ModelParallelStrategy) on 2 CPU ranks: cost of L2SP and L2SP+DTNH",
        "",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads per rank; torch {torch.__version__}; gloo. "
        f"Model: MLP {args.depth}×Linear({args.width}, {args.width}) + head, fully_shard per Linear, fp32, SGD "
        f"momentum, per-rank batch 32. {args.rounds} rounds × {args.steps} measured steps (after {args.warmup} "
        "warm-up) per variant, variants shuffled each round.",
        "",
        f"Reproduce: `python benchmarks/sharded.py --width {args.width} --depth {args.depth} --rounds {args.rounds} "
        f"--steps {args.steps} --warmup {args.warmup} --out {args.out}`",
        "",
        f"Full model: {full / 2**20:.2f} MiB of parameters. Memory is per rank (rank 0), from the tensors it holds.",
        "",
        "| variant | params (MiB) | grads (MiB) | L2SP anchors (MiB) | anchors / full model | memory ratio to plain "
        "| step (ms, median) | step time ratio to plain (median, min-max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        m = memory[name]
        total = m["params"] + m["grads"] + m["anchors"]
        r = ratios[name]
        lines.append(
            f"| {name} | {m['params'] / 2**20:.2f} | {m['grads'] / 2**20:.2f} | {m['anchors'] / 2**20:.2f} | "
            f"{m['anchors'] / full:.3f} | {total / plain:.2f} | {statistics.median(medians[name]) * 1e3:.1f} | "
            f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f}) |"
        )
    lines += [
        "",
        "Memory ratio: (params + grads + anchors) / (params + grads) of plain sharded training, per rank; the "
        "optimizer state (momentum, one more parameter-sized shard) is the same in every variant and left out. "
        "L2SP's anchors are the local shards (1/2 of the full model's parameters on 2 ranks).",
        "",
        "Step time: L2SP adds one elementwise pass over the local shards (w, w0, g) per step, DTNH three dot "
        "products per tensor and one all-reduce of a 3×(tensors) vector; on 2 shared CPU cores the spread "
        "(min-max over rounds) is as large as these costs, so ratios near 1 mean \"within noise\".",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
