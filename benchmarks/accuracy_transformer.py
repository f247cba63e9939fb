"""Benchmark C: the methods on a real pre-trained transformer, offline.

No pre-trained transformer ships as a package here, so a small timm ``VisionTransformer`` (28×28 input,
4×4 patches, width 64, 6 blocks, 4 heads, a class token; about 0.3 M parameters) is pre-trained by this
script on the source task of benchmark B (Animal-MNIST classes 0-4, seed 0, AdamW with warm-up and
cosine decay, horizontal flips) and fine-tuned on the same *close* and *far* targets, splits and paired
seeds (see ``accuracy_controlled.py``, whose pieces this reuses). Being a timm model, the ViT's blocks
are timm's own grouping (``group_matcher``: stem, ``blocks.0`` … ``blocks.5``, head), which is what
FreezeSchedule depths and layer-wise LR decay act on.

Fine-tuning uses AdamW. Per target, the learning rate is chosen first, by plain fine-tuning on the scan
seeds 100-102 (final validation accuracy), then the fixed depth, by a depth scan at that learning rate on
the same seeds; neither choice sees a test split. Every method of ``accuracy.methods`` runs, plus
``layer decay`` (``TransferClassifier(layer_decay=0.7)``), the transformer fine-tuning recipe.

    python benchmarks/accuracy_transformer.py --seeds 5 --epochs 30 --threads 1
    python benchmarks/accuracy_transformer.py --quick        # smoke run (the test suite runs it)

The source checkpoint is kept in ``--out`` and reused when present. Runs append to ``runs.csv`` and are
never recomputed; the two targets can run in parallel processes (``--targets close`` / ``--targets far``)
once the checkpoint exists.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
import accuracy_controlled as controlled  # noqa: E402

from lightning_transfer import list_blocks  # noqa: E402

DELTA_LAYERS = ["backbone.blocks.1", "backbone.blocks.3", "backbone.blocks.5"]
LEARNING_RATES = (1e-4, 3e-4, 1e-3)
LAYER_DECAY = 0.7


def small_vit(num_classes: int) -> nn.Module:
    """The benchmark's ViT: 28×28×3 input, 7×7 patches of 4×4 pixels plus a class token, 6 blocks."""
    return VisionTransformer(img_size=28, patch_size=4, in_chans=3, num_classes=num_classes, embed_dim=64,
                             depth=6, num_heads=4)


VIT = controlled.Network(
    "vit", "ViT (timm VisionTransformer, patch 4, width 64, 6 blocks, 4 heads)", small_vit,
    source_options={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 150},
    finetune_options={"optimizer": "adamw", "weight_decay": 0.05, "warmup_steps": 12},
)


def best_lr(rows: list[dict], target: str) -> float:
    """Learning rate with the best mean final validation accuracy of plain fine-tuning (scan seeds)."""
    means = controlled.scan_means(rows, target, "lr")
    return float(max(means, key=lambda lr: (means[lr], -float(lr))))


def method_table(epochs: int, depth: int) -> dict:
    """``accuracy.methods`` on the ViT's blocks, with the scanned depth renamed, plus layer decay."""
    table = accuracy.methods(epochs, depth, DELTA_LAYERS)
    table[f"depth {depth} (scan)"] = table.pop(f"depth {depth}")
    table["layer decay"] = ({"layer_decay": LAYER_DECAY}, lambda: [])
    return table


def run_target(target: str, source: Path, path: Path, args) -> None:
    """Learning-rate scan, depth scan at the chosen rate, then every chosen method on the seeds."""
    lrs = LEARNING_RATES[-2:] if args.quick else LEARNING_RATES
    scan = {f"scan lr {lr:g}": ({"lr": lr}, lambda: []) for lr in lrs}
    lr = best_lr(controlled.run_scan(path, target, scan, controlled.make_run(target, source, args, scan, VIT), args),
                 target)
    network = dataclasses.replace(VIT, finetune_options={**VIT.finetune_options, "lr": lr})
    blocks = len(list_blocks(small_vit(len(controlled.SOURCE_CLASSES))))
    scan = controlled.depth_scan_table((0, blocks - 1) if args.quick else range(blocks))
    rows = controlled.run_scan(path, target, scan, controlled.make_run(target, source, args, scan, network), args)
    table = method_table(args.epochs, controlled.best_depth(rows, target))
    chosen = args.methods.split(",") if args.methods else list(table)
    unknown = [m for m in chosen if m not in table]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(table)}")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    accuracy.run_missing(path, "target", [target], seeds, chosen,
                         controlled._per_class(controlled.make_run(target, source, args, table, network), args.per_class))


def main(argv: list[str] | None = None) -> None:
    args, out = controlled.parse_target_arguments(argv, __doc__, source_epochs=60, seeds=5,
                                                  out="benchmarks/results/accuracy_transformer",
                                                  quick_methods="plain,layer decay")
    source = controlled.source_checkpoint(out, args.source_epochs, per_class=20 if args.quick else None, network=VIT)
    path = out / "runs.csv"
    for target in [] if args.report_only else args.targets:
        run_target(target, source, path, args)
    write_report(accuracy.read_rows(path), out, args)


def write_report(rows: list[dict], out: Path, args) -> None:
    # "from scratch" last: far left in the chart, where the legend (lower right) hides nothing
    rows = sorted((r for r in rows if r["epochs"] == str(args.epochs)), key=lambda r: r["method"] == "from scratch")
    gap = max((abs(float(r["test_acc"]) - float(r["test_acc_bn"])) for r in rows), default=0.0)
    header = [
        f"Targets: *close* = Animal-MNIST classes {controlled.CLOSE_CLASSES}, *far* = scikit-learn digits (8×8, "
        f"upsampled to 28×28); {args.per_class} training images per class, {args.epochs} epochs, AdamW (weight decay "
        "0.05, none for L2-SP), 12 warm-up steps then cosine decay, batch 16. Per target, the learning rate was "
        f"chosen among {', '.join(f'{lr:g}' for lr in LEARNING_RATES)} by plain fine-tuning, then the fixed depth "
        "at that rate, both on final validation accuracy with the scan seeds 100-102 (never the test split). "
        f"DELTA regularizes the token outputs of {', '.join(DELTA_LAYERS)}; *layer decay* is "
        f"`TransferClassifier(layer_decay={LAYER_DECAY})` (block d steps below the head at lr·{LAYER_DECAY}^d).",
        "",
        "The ViT has no BatchNorm, so the *BN re-estimated* columns are the same evaluation again: over the "
        f"{len(rows)} runs the largest |as trained − re-estimated| test accuracy difference is {gap:.4f}. A depth-0 "
        "scan winner trains exactly as *plain* does; the two still differ a little because plain also records "
        "per-epoch validation curves, and each validation loader draws from the global RNG, which changes the "
        "order of the training batches after the first epoch.",
        "",
    ]
    controlled.save_report("# Benchmark C: a pre-trained vision transformer", header, "accuracy_transformer.py",
                           rows, out, args, scans=("lr", "depth"))


if __name__ == "__main__":
    main()
