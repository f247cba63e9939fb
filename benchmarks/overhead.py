"""What each callback costs: train-step time against plain fine-tuning, the SP gradient against its
references, and the extra memory each callback holds.

Timing on shared machines is noisy, so every figure is a ratio measured inside one process: variants
are interleaved in shuffled order, round after round, and each round's median step time is divided by
the same round's plain median. The report gives the median of those ratios and their spread (min-max).

    python benchmarks/overhead.py                       # CPU, fp32, all three models (~20 min on 2 cores)
    python benchmarks/overhead.py --device cuda --precision bf16-mixed --out benchmarks/results/overhead_gpu.md
    python benchmarks/overhead.py --quick               # smoke run (the test suite runs it)
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_transfer import (  # noqa: E402
    DTNH,
    L2SP,
    RIFLE,
    FeatureMapRegularization,
    FreezeSchedule,
    MaxEntropyHeadInit,
    TransferClassifier,
    list_blocks,
)
from lightning_transfer.callbacks.base import add_to_grads  # noqa: E402
from lightning_transfer.functional import sp_penalty_and_grad  # noqa: E402
from lightning_transfer.functional.penalties import add_l2sp_grad_  # noqa: E402
from lightning_transfer.functional.projection import project_conflicting_  # noqa: E402

MODELS = {"lite0": "efficientnet_lite0", "resnet18": "torchvision:resnet18", "resnet50": "torchvision:resnet50"}


def variants(model: TransferClassifier, steps: int) -> dict[str, callable]:
    blocks = [n for n, _ in list_blocks(model)]
    depth_all = len(blocks) - 1
    layers = [blocks[depth_all // 2], blocks[depth_all - 1]]
    layer_modules = [_module_name(model, n) for n in layers]
    return {
        "plain": lambda: [],
        "L2SP": lambda: [L2SP(alpha=0.01)],
        "L2SP fused (torch.compile)": lambda: [L2SP(alpha=0.01, fused=True)],
        "L2SP decoupled": lambda: [L2SP(alpha=0.01, decoupled=True)],
        "DTNH+L2SP": lambda: [L2SP(alpha=0.01), DTNH()],
        "DELTA": lambda: [FeatureMapRegularization(layer_modules, alpha=0.01)],
        "DTNH+DELTA": lambda: [FeatureMapRegularization(layer_modules, alpha=0.01), DTNH()],
        "RIFLE": lambda: [RIFLE(interval="step", points=[steps - 1], min_epochs_after=0)],  # one re-init
        "MEI": lambda: [MaxEntropyHeadInit()],
        f"Freeze depth {depth_all // 2}": lambda: [FreezeSchedule(depth=depth_all // 2)],
        f"Freeze depth {depth_all} (all but head)": lambda: [FreezeSchedule(depth=depth_all)],
    }


def _module_name(model, block_name: str) -> str:
    """A real module for a block (the last member of a group), usable as a feature-map layer."""
    block = dict(list_blocks(model))[block_name]
    target = block.members[-1] if hasattr(block, "members") else block
    return next(n for n, m in model.named_modules() if m is target)


class StepTimer(Callback):
    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda, self.times, self._t = warmup, cuda, [], 0.0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def held_bytes(obj, model_tensors: set[int], seen=None) -> int:
    """Bytes of the tensors a callback holds beyond the model's own (anchors, reference copies, ...)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 0 if id(obj) in model_tensors else obj.numel() * obj.element_size()
    if isinstance(obj, torch.nn.Module):
        return sum(held_bytes(t, model_tensors, seen) for t in list(obj.parameters()) + list(obj.buffers()))
    if isinstance(obj, dict):
        return sum(held_bytes(v, model_tensors, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, model_tensors, seen) for v in obj)
    return 0


def trial(backbone, make_callbacks, args, steps):
    torch.manual_seed(0)
    model = TransferClassifier(backbone, num_classes=10, pretrained=backbone == "efficientnet_lite0",
                               weight_decay=0.0, scheduler="constant")
    x = torch.rand(32 * steps, 3, args.size, args.size)
    y = torch.randint(0, 10, (32 * steps,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    cuda = args.device == "cuda"
    timer = StepTimer(args.warmup, cuda)
    callbacks = make_callbacks()
    trainer = Trainer(max_steps=steps, accelerator="gpu" if cuda else "cpu", devices=1, precision=args.precision,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=[*callbacks, timer])
    if cuda:  # peak above what was allocated before this trial (earlier trials' tensors freed first)
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, train_dataloaders=loader)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    model_tensors = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    held = sum(held_bytes(vars(cb), model_tensors) for cb in callbacks)
    return timer.times, peak, held


def bench_model(name, args, lines):
    backbone = MODELS[name]
    probe = TransferClassifier(backbone, num_classes=10, pretrained=False)
    steps = args.warmup + args.steps
    table = variants(probe, steps)
    per_round: dict[str, list[float]] = {v: [] for v in table}
    all_times: dict[str, list[float]] = {v: [] for v in table}
    memory: dict[str, tuple[int, int]] = {}
    for r in range(args.rounds):
        order = list(table)
        random.Random(r).shuffle(order)
        medians = {}
        for v in order:
            times, peak, held = trial(backbone, table[v], args, steps)
            medians[v] = statistics.median(times)
            all_times[v] += times
            memory[v] = (peak, held)
        for v in table:
            per_round[v].append(medians[v] / medians["plain"])
        print(f"{name}: round {r + 1}/{args.rounds} done", flush=True)
    plain_peak = memory["plain"][0]
    lines += [f"### {name} ({backbone}, {args.size}×{args.size}, batch 32)", "",
              "| variant | median step (ms) | ratio to plain (median of rounds) | spread (min–max) | held by callback (MiB) | peak GPU extra (MiB) |",
              "|---|---|---|---|---|---|"]
    for v in table:
        ratios = per_round[v]
        extra = (memory[v][0] - plain_peak) / 2**20 if args.device == "cuda" else float("nan")
        lines.append(f"| {v} | {1000 * statistics.median(all_times[v]):.1f} | {statistics.median(ratios):.3f} | "
                     f"{min(ratios):.3f}–{max(ratios):.3f} | {memory[v][1] / 2**20:.1f} | "
                     + ("—" if args.device != "cuda" else f"{extra:.0f}") + " |")
    lines.append("")


def bench_sp_gradient(name, args, lines):
    """The SP gradient on the same parameters: ours vs autograd of the penalty vs the memory-traffic floor."""
    device = torch.device(args.device)
    model = TransferClassifier(MODELS[name], num_classes=10, pretrained=False).to(device)
    params = [p for p in model.parameters()]
    anchors = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p), alpha=1e-3)
            p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    alpha = 0.01

    workspace = {}

    def ours():  # what L2SP runs on a logging step (every log_every_n_steps)
        add_l2sp_grad_(grads, params, anchors, alpha, compute_value=True, workspace=workspace)

    def ours_no_value():  # ... and on the other steps
        add_l2sp_grad_(grads, params, anchors, alpha, compute_value=False, workspace=workspace)

    def ours_fused():  # L2SP(fused=True): one compiled kernel at the traffic floor
        add_l2sp_grad_(grads, params, anchors, alpha, compute_value=False, compiled=True)

    def ours_separate_r():  # r as its own tensors, as handed to DTNH (and the generic norm path)
        _, r = sp_penalty_and_grad(params, anchors, alpha)
        add_to_grads(params, r)

    def autograd_reference():
        penalty = sum(0.5 * alpha * (p - a).square().sum() for p, a in zip(params, anchors))
        penalty.backward()

    def floor():  # reads w, w0 and g once, writes g once: the traffic of g += alpha*(w - w0)
        torch._foreach_addcmul_(grads, params, anchors, value=alpha)

    def dtnh_projection():
        project_conflicting_(grads, anchors)

    fns = {"floor (read w, w0, g; write g)": floor, "L2SP, logging step (value + gradient, in place)": ours,
           "L2SP, other steps (gradient only, in place)": ours_no_value,
           "L2SP(fused=True), compiled kernel": ours_fused,
           "r as separate tensors (DTNH input), added": ours_separate_r,
           "autograd of the penalty in the loss (common implementation)": autograd_reference,
           "DTNH projection of r against g (tensor mode, in place)": dtnh_projection}
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for i in range(args.sp_reps):
        order = list(fns)
        random.Random(i).shuffle(order)
        for k in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fns[k]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["floor (read w, w0, g; write g)"])
    n = sum(p.numel() for p in params)
    lines += [f"### SP gradient on {name} ({n / 1e6:.1f} M parameters, {len(params)} tensors, {args.device})", "",
              "| implementation | median (ms) | ratio to floor |", "|---|---|---|"]
    for k, ts in times.items():
        lines.append(f"| {k} | {1000 * statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f} |")
    lines.append("")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,lite0,resnet50")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sp-reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="1 round, 2 steps, resnet18 at 32x32")
    parser.add_argument("--out", default="benchmarks/results/overhead_cpu.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.steps, args.warmup, args.size, args.sp_reps = "resnet18", 1, 2, 1, 32, 3
    torch.set_float32_matmul_precision("high")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [f"# Overhead of each callback ({args.device}, {args.precision})", "",
             f"Machine: {device_name}; torch {torch.__version__}. {args.rounds} rounds × {args.steps} measured steps "
             f"per variant (after {args.warmup} warm-up), variants shuffled each round.", "",
             f"Reproduce: `python benchmarks/overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        bench_sp_gradient(name, args, lines)
    for name in args.models.split(","):
        bench_model(name, args, lines)
        Path(args.out).write_text("\n".join(lines) + "\n")  # written after each model: partial runs count
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
