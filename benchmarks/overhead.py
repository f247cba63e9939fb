"""What each callback costs, beside the floor its math needs: train-step time against plain fine-tuning,
validation-time callbacks against a validation epoch, the L2SP/DTNH kernels against their memory traffic,
and the memory each callback adds.

Timing on shared machines is noisy, so every figure is a ratio measured inside one process: variants are
interleaved in shuffled order, round after round, and each round's median step time is divided by the same
round's plain median (DTNH+L2SP also by the same round's L2SP median). Reported: the median over rounds
and the spread (min–max). Floors, as ratios to plain: L2SP 1 + 4 passes over the parameters (read w, w0, g;
write g), decoupled 1 + 3 passes, DTNH+L2SP 1 + 7 passes (the projection reads g and r twice and writes g;
r is made from w and w0 on the way), DELTA 1 + one no-grad forward of the reference model, DTNH+DELTA also
a backward from the regularized layers (DTNH needs r apart) and 5 passes; RIFLE and MEI 1 (they do nothing
per step); SPD 1 + 8 passes (its two halves around the optimizer step); BSS 1 + one SVD of the batch's head
features and its gradient; Co-Tuning 1 + the source head's forward and backward on those features; StochNorm 1
(a per-channel choice between two statistics the layer has anyway). A pass is timed on the model's parameters (see overhead_kernels.py). Separate fits still carry the
machine's drift between them; the per-step variants are therefore also measured step against step, their
work switched on every other step of one fit (overhead_paired.py), and the summary gives those ratios.

    python benchmarks/overhead.py                        # CPU, fp32, four models (~15 min on 2 busy cores)
    python benchmarks/overhead.py --models resnet18 --rounds 7
    python benchmarks/overhead.py --device cuda --precision bf16-mixed --out benchmarks/results/overhead_gpu_h200_bf16.md
    python benchmarks/overhead.py --device cuda --precision 16-mixed --optimizer adamw-fused
    python benchmarks/overhead.py --models resnet18,lite0 --variants plain,SPD,BSS,Co-Tuning,StochNorm
    python benchmarks/overhead.py --quick                # smoke run (the test suite runs it)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead_kernels import bench_kernels  # noqa: E402
from overhead_paired import bench_paired  # noqa: E402
from overhead_validation import _ratio_row, bench_validation  # noqa: E402

from lightning_transfer import (  # noqa: E402
    BSS,
    DTNH,
    L2SP,
    RIFLE,
    SPD,
    CoTuning,
    FeatureMapRegularization,
    FreezeSchedule,
    MaxEntropyHeadInit,
    StochNorm,
    TransferClassifier,
    list_blocks,
)
from lightning_transfer.anatomy import final_linear, find_head  # noqa: E402
from lightning_transfer.functional.bss import bss_penalty_grad  # noqa: E402

MODELS = {"resnet18": "torchvision:resnet18", "lite0": "efficientnet_lite0", "resnet50": "torchvision:resnet50",
          "vit": "timm vit_tiny_patch16_224, patch 8"}


class FusedAdamWClassifier(TransferClassifier):
    """The benchmark's model trained with torch's fused AdamW (``--optimizer adamw-fused``): under 16-mixed the
    fused step unscales the gradients itself, the set-up of #27's first defect."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, fused=True)


OPTIMIZER = {"name": "sgd"}  # set by --optimizer


def make_model(name: str, size: int) -> TransferClassifier:
    torch.manual_seed(0)
    kw = dict(num_classes=10, weight_decay=0.0, scheduler="constant")
    cls = FusedAdamWClassifier if OPTIMIZER["name"] == "adamw-fused" else TransferClassifier
    if cls is FusedAdamWClassifier:
        kw.update(optimizer="adamw", lr=1e-4)
    if name == "vit":  # a small ViT at the benchmark's resolution: (size/8)² tokens of width 192, 12 blocks
        import timm

        return cls(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8), **kw)
    return cls(MODELS[name], pretrained=name == "lite0", **kw)


def _module_name(model, block_name: str) -> str:
    """A real module for a block (the last member of a group), usable as a feature-map layer."""
    block = dict(list_blocks(model))[block_name]
    target = block.members[-1] if hasattr(block, "members") else block
    return next(n for n, m in model.named_modules() if m is target)


def delta_layers(model) -> list[str]:
    blocks = [n for n, _ in list_blocks(model)]
    return [_module_name(model, blocks[(len(blocks) - 1) // 2]), _module_name(model, blocks[len(blocks) - 2])]


def head_width(model) -> int:
    """The number of features the new head reads (Co-Tuning's source head is a Linear from them)."""
    return final_linear(find_head(model)[1]).in_features


def variants(model: TransferClassifier, steps: int, only: list[str] | None = None) -> dict[str, callable]:
    depth_all = len(list_blocks(model)) - 1
    layers = delta_layers(model)
    width = head_width(model)
    table = {
        "plain": lambda: [],
        "L2SP": lambda: [L2SP(alpha=0.01)],
        "L2SP decoupled": lambda: [L2SP(alpha=0.01, decoupled=True)],
        "DTNH+L2SP": lambda: [L2SP(alpha=0.01), DTNH()],
        "DELTA": lambda: [FeatureMapRegularization(layers, alpha=0.01)],
        "DTNH+DELTA": lambda: [FeatureMapRegularization(layers, alpha=0.01), DTNH()],
        "RIFLE": lambda: [RIFLE(interval="step", points=[steps - 1], min_epochs_after=0)],  # one re-init
        "MEI": lambda: [MaxEntropyHeadInit()],
        "FreezeSchedule, half the blocks": lambda: [FreezeSchedule(depth=depth_all // 2)],
        "FreezeSchedule, all but the head": lambda: [FreezeSchedule(depth=depth_all)],
        "SPD": lambda: [SPD(lam=1.0)],
        "BSS": lambda: [BSS(eta=0.001, k=1)],
        "Co-Tuning": lambda: [CoTuning(torch.nn.Linear(width, 1000), alpha=2.3, relationship_batches=2)],
        "StochNorm": lambda: [StochNorm(p=0.5, seed=0)],
    }
    if only is None:
        return table
    unknown = sorted(set(only) - set(table))
    if unknown or "plain" not in only:
        raise SystemExit(f"--variants: unknown {unknown} (known: {list(table)}); 'plain' must be one of them.")
    return {v: table[v] for v in table if v in only}


class Timer(Callback):
    """Train-step times after ``warmup`` steps, and validation-epoch times (the callbacks' end-of-epoch work
    included: list this one last)."""

    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda, self.steps, self.vals, self._t = warmup, cuda, [], [], 0.0

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.warmup:
            self.steps.append(self._now() - self._t)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._t = self._now()

    def on_validation_epoch_end(self, trainer, pl_module):
        self.vals.append(self._now() - self._t)


def _rss(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), else 0."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return 0


def _reset_peak() -> int:
    """Reset the peak resident set (Linux ``clear_refs``) and return the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss("VmRSS")


def held_bytes(obj, model_tensors: set[int], seen=None) -> int:
    """Bytes of the tensors a callback holds beyond the model's own (anchors, reference copies, buffers)."""
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


def trial(name, make_callbacks, args, steps, val_batches=0, epochs=1):
    """One fit; returns (step times, validation times, peak memory above the start, bytes the callbacks hold)."""
    model = make_model(name, args.size)
    gen = torch.Generator().manual_seed(0)
    n = 32 * max(steps, val_batches)
    x, y = torch.rand(n, 3, args.size, args.size, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    loader = DataLoader(TensorDataset(x[: 32 * steps], y[: 32 * steps]), batch_size=32)
    val = DataLoader(TensorDataset(x[: 32 * val_batches], y[: 32 * val_batches]), batch_size=32) if val_batches else None
    cuda = args.device == "cuda"
    timer, callbacks = Timer(args.warmup, cuda), make_callbacks()
    trainer = Trainer(max_epochs=epochs, max_steps=steps * epochs, accelerator="gpu" if cuda else "cpu", devices=1,
                      precision=args.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=val_batches or 0,
                      callbacks=[*callbacks, timer])
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _reset_peak()
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=val)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")) - base
    model_tensors = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    held = sum(held_bytes(vars(cb), model_tensors) for cb in callbacks)
    return timer.steps, timer.vals, peak, held


def floor_parts(name, args, reps: int = 5) -> tuple[float, float, float, float]:
    """Median seconds of a no-grad eval forward of the reference model, of a backward from DELTA's layers
    to the parameters (the pass DTNH+DELTA adds), of BSS's SVD and gradient on the batch's head features, and
    of a source head's forward and backward on them (Co-Tuning), on one batch."""
    model = make_model(name, args.size).to(args.device)
    layers = delta_layers(model)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    x = torch.rand(32, 3, args.size, args.size, device=args.device)
    feats = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, o)) for n in layers]
    head = find_head(model)[1]
    hooks.append(head.register_forward_hook(lambda m, a, o: feats.__setitem__("head input", a[0])))
    source = torch.nn.Linear(head_width(model), 1000).to(args.device)
    params = [p for p in model.parameters()]
    fwd, bwd, bss, cotuning = [], [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        with torch.no_grad():
            reference(x)
        fwd.append(time.perf_counter() - t)
        model(x)
        h = feats.pop("head input").detach().flatten(1)
        t = time.perf_counter()
        bss_penalty_grad(h, 1e-3, 1)
        bss.append(time.perf_counter() - t)
        h.requires_grad_(True)
        t = time.perf_counter()
        out = source(h)
        loss = -(torch.softmax(out.detach(), 1) * torch.log_softmax(out, 1)).sum(1).mean()
        torch.autograd.grad(loss, [h, *source.parameters()])
        cotuning.append(time.perf_counter() - t)
        target = sum((f * 0.5).square().sum() for f in feats.values())
        t = time.perf_counter()
        torch.autograd.grad(target, params, retain_graph=True, allow_unused=True)
        bwd.append(time.perf_counter() - t)
    for h in hooks:
        h.remove()
    return statistics.median(fwd), statistics.median(bwd), statistics.median(bss), statistics.median(cotuning)


def bench_steps(name, args, rounds, one_pass, lines, summary, paired_rounds=0):
    probe = make_model(name, args.size)
    steps = args.warmup + args.steps
    table = variants(probe, steps, args.variants.split(",") if args.variants else None)
    per_round = {v: [] for v in table}
    vs_l2sp, all_times, memory = [], {v: [] for v in table}, {}
    t_ref, t_bwd, t_bss, t_co = [], [], [], []
    for r in range(rounds):
        order = [*table, "floor parts"]
        random.Random(r).shuffle(order)
        medians = {}
        for v in order:
            if v == "floor parts":
                f, b, sv, co = floor_parts(name, args)
                t_ref.append(f)
                t_bwd.append(b)
                t_bss.append(sv)
                t_co.append(co)
                continue
            times, _, peak, held = trial(name, table[v], args, steps)
            medians[v] = statistics.median(times)
            all_times[v] += times
            memory.setdefault(v, []).append((peak, held))
        for v in table:
            per_round[v].append(medians[v] / medians["plain"])
        if "DTNH+L2SP" in medians and "L2SP" in medians:
            vs_l2sp.append(medians["DTNH+L2SP"] / medians["L2SP"])
        print(f"{name}: round {r + 1}/{rounds} done", flush=True)
    plain = statistics.median(all_times["plain"])
    ref, bwd = statistics.median(t_ref), statistics.median(t_bwd)
    floors = {"plain": 1.0, "L2SP": 1 + 4 * one_pass / plain, "L2SP decoupled": 1 + 3 * one_pass / plain,
              "DTNH+L2SP": 1 + 7 * one_pass / plain, "DELTA": 1 + ref / plain,
              "DTNH+DELTA": 1 + (ref + bwd + 5 * one_pass) / plain, "RIFLE": 1.0, "MEI": 1.0,
              "SPD": 1 + 8 * one_pass / plain, "BSS": 1 + statistics.median(t_bss) / plain,
              "Co-Tuning": 1 + statistics.median(t_co) / plain, "StochNorm": 1.0}
    plain_peak = statistics.median(p for p, _ in memory["plain"])
    lines += [f"### Train step: {name} ({MODELS[name]}, {args.size}×{args.size}, batch 32, "
              f"{len(list_blocks(probe)) - 1} blocks below the head)", "",
              f"Plain step {1000 * plain:.1f} ms; reference forward {1000 * ref:.1f} ms; backward from the DELTA "
              f"layers {1000 * bwd:.1f} ms; one pass over the parameters {1000 * one_pass:.2f} ms.", "",
              "| variant | ratio to plain (median of rounds) | spread (min–max) | floor | median step (ms) | "
              "held by callback (MiB) | peak memory above plain (MiB) |", "|---|---|---|---|---|---|---|"]
    for v in table:
        peak = statistics.median(p for p, _ in memory[v]) - plain_peak
        floor = f"{floors[v]:.3f}" if v in floors else "—"
        lines.append(_ratio_row(v, per_round[v], f" {floor} | {1000 * statistics.median(all_times[v]):.1f} | "
                                f"{memory[v][-1][1] / 2**20:.1f} | {peak / 2**20:.0f} |"))
    if vs_l2sp:
        lines.append(f"| DTNH+L2SP / L2SP (same rounds) | {statistics.median(vs_l2sp):.3f} | "
                     f"{min(vs_l2sp):.3f}–{max(vs_l2sp):.3f} | {floors['DTNH+L2SP'] / floors['L2SP']:.3f} | | | |")
    lines.append("")
    summary[name] = {v: statistics.median(per_round[v]) for v in table} | {"floors": floors} | (
        {"DTNH+L2SP / L2SP": statistics.median(vs_l2sp)} if vs_l2sp else {})
    paired_variants = ("L2SP", "L2SP decoupled", "DTNH+L2SP", "DELTA", "DTNH+DELTA", "SPD", "BSS", "Co-Tuning")
    if paired_rounds > 0:  # the per-step work, step against step in one fit (StochNorm's swap is not switchable)
        per_step = {v: table[v] for v in paired_variants if v in table}
        bench_paired(name, make_model, per_step, args, paired_rounds, floors, lines, summary)


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,lite0,resnet50,vit")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw-fused"],
                        help="sgd (momentum 0.9) or torch's fused AdamW (e.g. with --precision 16-mixed)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of train-step variants for the first model")
    parser.add_argument("--other-rounds", type=int, default=2, help="... for the other models")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20, help="repetitions of each kernel")
    parser.add_argument("--val-rounds", type=int, default=1)
    parser.add_argument("--paired-rounds", type=int, default=4,
                        help="paired fits per per-step variant, first model (0: none)")
    parser.add_argument("--other-paired-rounds", type=int, default=2, help="... for the other models")
    parser.add_argument("--paired-steps", type=int, default=20, help="measured steps per paired fit (even)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated train-step variants (with plain), e.g. plain,SPD,BSS; default all")
    parser.add_argument("--compiled", action="store_true", help="also time L2SP(fused=True)'s compiled kernel")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 steps, resnet18 at 32x32")
    parser.add_argument("--validation-only", action="store_true",
                        help="only the validation-time callbacks (RepresentationSimilarity, WiSEFT)")
    parser.add_argument("--out", default="benchmarks/results/overhead_cpu.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.other_rounds, args.steps, args.warmup = "resnet18", 1, 1, 2, 1
        args.size, args.reps, args.val_rounds, args.paired_rounds, args.paired_steps = 32, 3, 1, 1, 4
    torch.set_float32_matmul_precision("high")
    OPTIMIZER["name"] = args.optimizer
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    started, load_before = time.time(), _load()
    command = " ".join(["python benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])])
    head = [f"# Overhead of each callback ({args.device}, {args.precision}, {args.optimizer})", "",
            f"Machine: {device_name}; torch {torch.__version__}. Train steps: {args.rounds} rounds for the first "
            f"model, {args.other_rounds} for the others, × {args.steps} measured steps per variant (after "
            f"{args.warmup} warm-up), variants shuffled each round; kernels: {args.reps} interleaved repetitions.",
            "", f"Reproduce: `{command}`", ""]
    lines, summary = [], {}
    names = args.models.split(",")

    def write(done: bool):
        load = f"Load average (1/5/15 min) before: {load_before}" + (
            f"; after: {_load()}; {(time.time() - started) / 60:.1f} min." if done else " (run in progress).")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(head + [load, ""] + _summary(summary) + lines) + "\n")

    for i, name in enumerate(names):
        if args.validation_only:
            bench_validation(name, args, lines, make_model, trial)
            write(done=False)
            continue
        one_pass = bench_kernels(make_model(name, args.size).to(args.device), name, args.reps,
                                 args.compiled and i == 0, lines)
        bench_steps(name, args, args.rounds if i == 0 else args.other_rounds, one_pass, lines, summary,
                    args.paired_rounds if i == 0 else args.other_paired_rounds)
        if args.val_rounds > 0:
            bench_validation(name, args, lines, make_model, trial)
        write(done=False)  # written after each model: partial runs count
    write(done=True)
    print(Path(args.out).read_text())


def _summary(summary: dict) -> list[str]:
    """Per-step variants from the paired fits where they ran (their separate-fit ratio in brackets), the
    others from separate fits."""
    if not summary:
        return []
    keys = ["plain (null control)", "L2SP", "L2SP decoupled", "DTNH+L2SP", "DTNH+L2SP / L2SP", "DELTA", "DTNH+DELTA",
            "RIFLE", "MEI", "SPD", "BSS", "Co-Tuning", "StochNorm"]
    out = ["## Summary: ratio to plain (floor)", "",
           "Per-step variants: the median of on/off step pairs in one fit (see *Paired steps*), with the ratio of "
           "separate fits in brackets; RIFLE, MEI and FreezeSchedule from separate fits.", "",
           "| variant | " + " | ".join(summary) + " |", "|---|" + "---|" * len(summary)]
    for k in keys:
        if not any(k in s or k in s.get("paired", {}) for s in summary.values()):
            continue  # not measured in this run (--variants)
        cells = []
        for s in summary.values():
            floors, paired = s["floors"], s.get("paired", {})
            floor = 1.0 if k.startswith("plain") else floors.get(
                k, floors["DTNH+L2SP"] / floors["L2SP"] if "/" in k else None)
            if k in paired:
                cells.append(f"{paired[k]:.3f} ({floor:.3f}) [{s[k]:.2f}]" if k in s else f"{paired[k]:.3f} ({floor:.3f})")
            elif k in s:
                cells.append(f"{s[k]:.2f} ({floor:.2f})" if floor is not None else f"{s[k]:.2f}")
            else:
                cells.append("—")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    for k in ("FreezeSchedule, half the blocks", "FreezeSchedule, all but the head"):
        if all(k in s for s in summary.values()):
            out.append(f"| {k} | " + " | ".join(f"{s[k]:.2f}" for s in summary.values()) + " |")
    return out + [""]


if __name__ == "__main__":
    main()
