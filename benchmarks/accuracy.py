"""Does each method help? Benchmark A: ImageNet EfficientNet-Lite0 -> Animal-MNIST (64x64), paired seeds.

Every method gets the same budget; a seed fixes the data split and the head initialization for every
method (``seed_everything(seed)`` before the model is built, ``data.seed = seed``), so differences to
plain fine-tuning are paired. Reported: test accuracy mean ± std, and the paired difference to plain
fine-tuning with a 95% t-interval. Finished runs are kept in ``runs.csv`` and never recomputed.

    python benchmarks/accuracy.py --per-class 10 --seeds 10        # ~1 hour on 2 CPU cores
    python benchmarks/accuracy.py --per-class 100 --seeds 5
    python benchmarks/accuracy.py --quick                           # smoke run (the test suite runs it)
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_transfer import (  # noqa: E402
    DTNH,
    L2SP,
    RIFLE,
    AnimalMNISTDataModule,
    FeatureMapRegularization,
    FreezeSchedule,
    MaxEntropyHeadInit,
    TransferClassifier,
)

DELTA_LAYERS = ["backbone._blocks.7", "backbone._blocks.14", "backbone._blocks.15"]
FIELDS = ["per_class", "seed", "method", "epochs", "test_acc", "val_curve", "seconds"]
# two-sided 95% Student t quantiles by degrees of freedom (1..30); beyond, the normal 1.96
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def methods(epochs: int, best_depth: int) -> dict[str, tuple[dict, callable]]:
    """name -> (TransferClassifier overrides, callbacks factory)."""
    no_wd = {"weight_decay": 0.0}  # L2-SP's anchor must not be pulled toward zero as well
    return {
        "plain": ({}, lambda: []),
        "L2-SP": (no_wd, lambda: [L2SP(alpha=0.01, beta=0.01)]),
        "L2-SP+DTNH": (no_wd, lambda: [L2SP(alpha=0.01, beta=0.01), DTNH()]),
        "DELTA": ({}, lambda: [FeatureMapRegularization(DELTA_LAYERS, alpha=0.01)]),
        "DELTA+DTNH": ({}, lambda: [FeatureMapRegularization(DELTA_LAYERS, alpha=0.01), DTNH()]),
        "RIFLE": ({}, lambda: [RIFLE(num_reinits=1, min_epochs_after=max(1, epochs // 3))]),
        "MEI": ({}, lambda: [MaxEntropyHeadInit()]),
        "LP-FT": ({}, lambda: [FreezeSchedule.lp_ft(probe_epochs=max(1, epochs // 3))]),
        f"depth {best_depth}": ({}, lambda: [FreezeSchedule(depth=best_depth)]),
        "from scratch": ({"pretrained": False}, lambda: []),
    }


class ValCurve(pl.Callback):
    def __init__(self):
        self.accs: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.accs.append(float(trainer.callback_metrics["val_acc"]))


def run_one(per_class, seed, overrides, make_callbacks, args) -> tuple[float, list[float]]:
    pl.seed_everything(seed, verbose=False)
    data = AnimalMNISTDataModule(per_class=per_class, seed=seed, image_size=args.size,
                                 test_per_class=args.test_per_class)
    model = TransferClassifier("efficientnet_lite0", num_classes=10, lr=0.01, **overrides)
    curve = ValCurve()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[*make_callbacks(), curve])
    trainer.fit(model, datamodule=data)
    tested = trainer.test(model, datamodule=data, verbose=False)
    return float(tested[0]["test_acc"]), curve.accs


def paired_summary(rows: list[dict], per_class: int) -> list[str]:
    by = {}
    for r in rows:
        if int(r["per_class"]) == per_class:
            by.setdefault(r["method"], {})[int(r["seed"])] = r
    plain = by.get("plain", {})
    lines = [f"### {per_class} images per class", "",
             "| method | test acc (mean ± std) | paired diff to plain [95% CI] | seeds | epochs to reach plain's final val acc (median) |",
             "|---|---|---|---|---|"]
    plain_final = {s: float(r["val_curve"].split(";")[-1]) for s, r in plain.items()}
    for method, runs in by.items():
        accs = [float(r["test_acc"]) for r in runs.values()]
        mean, std = statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)
        common = sorted(set(runs) & set(plain))
        diffs = [float(runs[s]["test_acc"]) - float(plain[s]["test_acc"]) for s in common]
        if method != "plain" and len(diffs) > 1:
            d, sd = statistics.fmean(diffs), statistics.stdev(diffs)
            half = (T95[len(diffs) - 2] if len(diffs) - 1 <= len(T95) else 1.96) * sd / math.sqrt(len(diffs))
            diff = f"{d:+.3f} [{d - half:+.3f}, {d + half:+.3f}]"
        elif method != "plain" and diffs:
            diff = f"{diffs[0]:+.3f} (1 seed, no CI)"
        else:
            diff = "—"
        reach = []
        for s in common:
            curve = [float(x) for x in runs[s]["val_curve"].split(";")]
            hit = next((i + 1 for i, a in enumerate(curve) if a >= plain_final[s]), None)
            reach.append(hit if hit is not None else math.inf)
        reach_txt = f"{statistics.median(reach):g}" if reach else "—"
        lines.append(f"| {method} | {mean:.3f} ± {std:.3f} | {diff} | {len(accs)} | {reach_txt} |")
    return lines + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, nargs="+", default=[10])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--best-depth", type=int, default=6, help="from the depth scan (benchmarks/results/depth_scan)")
    parser.add_argument("--methods", default=None, help="comma-separated subset")
    parser.add_argument("--out", default="benchmarks/results/accuracy")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, 2 methods, 16x16 inputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.seeds, args.epochs, args.size, args.test_per_class = [2], 1, 1, 32, 5
        args.methods = args.methods or "plain,MEI"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.csv"
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    done = {(r["per_class"], r["seed"], r["method"], r["epochs"]) for r in rows}
    table = methods(args.epochs, args.best_depth)
    chosen = args.methods.split(",") if args.methods else list(table)
    unknown = [m for m in chosen if m not in table]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(table)}")
    for pc in args.per_class:
        for seed in range(args.seeds):
            for m in chosen:
                key = (str(pc), str(seed), m, str(args.epochs))
                if key in done:
                    continue
                start = time.perf_counter()
                acc, curve = run_one(pc, seed, *table[m], args)
                rows.append({"per_class": pc, "seed": seed, "method": m, "epochs": args.epochs,
                             "test_acc": round(acc, 5), "val_curve": ";".join(f"{a:.4f}" for a in curve),
                             "seconds": round(time.perf_counter() - start, 1)})
                with path.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=FIELDS)
                    w.writeheader()
                    w.writerows(rows)
                print(f"per_class={pc} seed={seed} {m}: test_acc={acc:.4f}", flush=True)
    lines = ["# Benchmark A: ImageNet EfficientNet-Lite0 -> Animal-MNIST", "",
             f"{args.epochs} epochs, SGD lr 0.01, {args.size}×{args.size}, test split of {args.test_per_class} images per class.",
             "Reproduce: `python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", ""]
    for pc in sorted({int(r["per_class"]) for r in rows if str(r["epochs"]) == str(args.epochs)}):
        lines += paired_summary([r for r in rows if str(r["epochs"]) == str(args.epochs)], pc)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
