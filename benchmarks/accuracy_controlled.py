"""Benchmark B: controlled source-target similarity (the setting of the depth-freezing paper).

A small CNN (four conv blocks and a linear head, 28×28 grayscale) is pre-trained on a source task with
plenty of data: Animal-MNIST classes 0-4, about 4,700 images. It is then fine-tuned on a data-poor
target that is either *close* (Animal-MNIST classes 5-9: same silhouette domain, new classes) or *far*
(scikit-learn's bundled 8×8 handwritten digits, upsampled: another domain). Every method gets the same
budget; a seed fixes the target split and the head init for every method, so differences to plain
fine-tuning are paired (see ``accuracy.py``, which this reuses). The fixed depth is chosen per target
by a depth scan on validation accuracy with separate seeds, so the choice never sees the test split.

The source checkpoint is made reproducibly here (seeded) and kept in ``--out``; it is reused when present.

    python benchmarks/accuracy_controlled.py --seeds 5 --epochs 30        # ~50 min on 2 CPU cores
    python benchmarks/accuracy_controlled.py --quick        # smoke run (the test suite runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accuracy  # noqa: E402

from lightning_transfer import ArrayDataModule, FreezeSchedule, TransferClassifier  # noqa: E402
from lightning_transfer.assets import load_animal_mnist  # noqa: E402

SOURCE_CLASSES, CLOSE_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
DELTA_LAYERS = ["backbone.block2", "backbone.block3", "backbone.block4"]
SPLITS = {"close": {"val_per_class": 30, "test_per_class": 200}, "far": {"val_per_class": 20, "test_per_class": 120}}
SCAN_SEEDS = (100, 101, 102)  # depth selection: seeds disjoint from the evaluation seeds
SCAN_LABELS = {"lr": "Learning-rate", "depth": "Depth"}


def conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Four conv blocks (28 → 14 → 7 → 7) and a linear head; 3-channel input as the data modules give."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.block1 = conv_block(3, 32, pool=False)
        self.block2 = conv_block(32, 64, pool=True)
        self.block3 = conv_block(64, 96, pool=True)
        self.block4 = conv_block(96, 128, pool=False)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.head(x.mean((2, 3)))


def animal_subset(classes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_animal_mnist()
    keep = np.isin(labels, classes)
    remap = {c: i for i, c in enumerate(classes)}
    return images[keep], np.array([remap[c] for c in labels[keep]], dtype=np.int64)


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8), d.target.astype(np.int64)


def target_arrays(target: str) -> tuple[np.ndarray, np.ndarray]:
    return animal_subset(CLOSE_CLASSES) if target == "close" else digits()


@dataclass(frozen=True)
class Network:
    """What a benchmark pre-trains and fine-tunes: a builder ``num_classes -> module``, its name in the
    checkpoint file and in source.md, and the TransferClassifier settings of each phase."""

    key: str
    title: str
    build: Callable[[int], nn.Module]
    source_options: dict = field(default_factory=dict)
    finetune_options: dict = field(default_factory=dict)
    source_batch_size: int = 64


CNN = Network("cnn", "SmallCNN", SmallCNN, {"lr": 0.05}, {"lr": 0.01})


def source_checkpoint(out: Path, epochs: int, per_class: int | None = None, network: Network = CNN) -> Path:
    """Pre-train ``network`` on the source classes (seed 0), once; returns the state-dict path. By default
    every source image but 100 validation and 50 test images per class trains it."""
    path = out / f"source_{network.key}_{epochs}ep.pt"
    if path.is_file():
        return path
    pl.seed_everything(0, verbose=False)
    images, labels = animal_subset(SOURCE_CLASSES)
    per_class = per_class or int(np.bincount(labels).min()) - 150
    data = ArrayDataModule(images, labels, per_class=per_class, val_per_class=100,
                           test_per_class=50, image_size=28, batch_size=network.source_batch_size, seed=0)
    model = TransferClassifier(network.build(len(SOURCE_CLASSES)), num_classes=len(SOURCE_CLASSES),
                               **network.source_options)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    val = trainer.validate(model, datamodule=data, verbose=False)[0]["val_acc"]
    print(f"source model: val acc {val:.4f} on {len(SOURCE_CLASSES)} source classes", flush=True)
    torch.save(model.backbone.state_dict(), path)
    (out / "source.md").write_text(f"Source {network.title}, {epochs} epochs on Animal-MNIST classes {SOURCE_CLASSES}: "
                                   f"val accuracy {val:.4f}.\n")
    return path


def source_network(source: Path | None, network: Network = CNN) -> nn.Module:
    """The source network with its Animal-MNIST 0-4 head, pre-trained weights loaded from ``source`` (if any)."""
    net = network.build(len(SOURCE_CLASSES))
    if source is not None:
        net.load_state_dict(torch.load(source, weights_only=True))
    return net


def build_model(source: Path | None, num_classes: int, overrides: dict, network: Network = CNN) -> TransferClassifier:
    overrides = {**network.finetune_options, **overrides}
    net = source_network(source if overrides.pop("pretrained", True) else None, network)
    return TransferClassifier(net, num_classes=num_classes, **overrides)


def make_run(target: str, source: Path, args, table: dict, network: Network = CNN):
    images, labels = target_arrays(target)
    num_classes = int(labels.max()) + 1

    def run(per_class: int, seed: int, method: str) -> dict:
        overrides, make_callbacks = table[method]
        pl.seed_everything(seed, verbose=False)
        data = ArrayDataModule(images, labels, per_class=per_class, image_size=28, batch_size=16, seed=seed,
                               augment=False, **(SPLITS[target] if not args.quick else {"val_per_class": 3, "test_per_class": 5}))
        model = build_model(source, num_classes, overrides, network)
        return accuracy.fit_and_test(model, data, make_callbacks(), args.epochs,
                                     curves=method in accuracy.CURVE_METHODS, final_val=method.startswith("scan "))

    run.epochs = args.epochs
    return run


def run_scan(path: Path, target: str, table: dict, runner, args) -> list[dict]:
    """Run the selection runs ``table`` (names ``"scan <what> <value>"``) on the scan seeds; all rows."""
    return accuracy.run_missing(path, "target", [target], SCAN_SEEDS[: 1 if args.quick else 3], list(table),
                                _per_class(runner, args.per_class))


def scan_means(rows: list[dict], target: str, what: str) -> dict[str, float]:
    """value -> mean final validation accuracy (BN re-estimated) of the ``"scan <what> <value>"`` runs."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["target"] == target and r["method"].startswith(f"scan {what} "):
            by.setdefault(r["method"].split()[-1], []).append(float(r["val_curve_bn"].split(";")[-1]))
    return {value: statistics.fmean(accs) for value, accs in by.items()}


def best_depth(rows: list[dict], target: str) -> int:
    """Depth with the best mean final validation accuracy (BN re-estimated) over the scan seeds."""
    means = scan_means(rows, target, "depth")
    return max((int(d) for d in means), key=lambda d: (means[str(d)], -d))


def depth_scan_table(depths) -> dict:
    """The depth-scan runs: ``"scan depth <d>"`` -> (no overrides, ``FreezeSchedule(depth=d)``)."""
    return {f"scan depth {d}": ({}, (lambda d=d: [FreezeSchedule(depth=d)])) for d in depths}


def parse_target_arguments(argv, description: str, *, source_epochs: int, out: str, quick_methods: str,
                           **defaults) -> tuple[argparse.Namespace, Path]:
    """The command line of a source -> close/far target benchmark (B, C): arguments, and the output folder
    (created). ``--quick`` shrinks everything to a smoke run; ``defaults`` override the common ones."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy.add_common_arguments(parser)
    parser.set_defaults(epochs=30, **defaults)
    parser.add_argument("--targets", nargs="+", default=["close", "far"], choices=["close", "far"])
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--source-epochs", type=int, default=source_epochs)
    parser.add_argument("--out", default=out)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, 2 methods, 1-epoch source")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.source_epochs, args.per_class = 1, 1, 1, 2
        args.methods = args.methods or quick_methods
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    return args, folder


def main(argv=None):
    args, out = parse_target_arguments(argv, __doc__, source_epochs=8, out="benchmarks/results/accuracy_controlled",
                                       quick_methods="plain,MEI")
    source = source_checkpoint(out, args.source_epochs, per_class=20 if args.quick else None)
    path = out / "runs.csv"
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for target in args.targets:
        if args.report_only:
            break
        scan = depth_scan_table((0, 4) if args.quick else range(5))
        depth = best_depth(run_scan(path, target, scan, make_run(target, source, args, scan), args), target)
        table = accuracy.methods(args.epochs, depth, DELTA_LAYERS)
        table[f"depth {depth} (scan)"] = table.pop(f"depth {depth}")
        chosen = args.methods.split(",") if args.methods else list(table)
        accuracy.run_missing(path, "target", [target], seeds, chosen,
                             _per_class(make_run(target, source, args, table), args.per_class))
    write_report(accuracy.read_rows(path), out, args)


def _per_class(run, per_class: int):
    """Adapt ``run(per_class, seed, method)`` to run_missing's ``run(group, seed, method)`` with group = target."""
    def by_target(target, seed, method):
        return run(per_class, seed, method)

    by_target.epochs = run.epochs
    return by_target


def write_report(rows: list[dict], out: Path, args) -> None:
    rows = [r for r in rows if r["epochs"] == str(args.epochs)]
    header = [f"Targets: *close* = Animal-MNIST classes {CLOSE_CLASSES}, *far* = scikit-learn digits (8×8, "
              f"upsampled to 28×28); {args.per_class} training images per class, {args.epochs} epochs, SGD lr 0.01, "
              "batch 16. The fixed depth was chosen per target on validation accuracy (seeds 100-102)."]
    save_report("# Benchmark B: controlled source-target similarity", header, "accuracy_controlled.py", rows, out, args)


def save_report(title: str, header: list[str], script: str, rows: list[dict], out: Path, args,
                scans: tuple[str, ...] = ("depth",)) -> None:
    """results.md (source line, ``header``, reproduce command, per target: scan lines and the paired
    table) and, unless quick, paired_diffs.png."""
    seeds = len({r["seed"] for r in rows if not r["method"].startswith("scan ")})
    lines = [title, "", (out / "source.md").read_text().strip() if (out / "source.md").is_file() else "", "",
             *header, f"Reproduce: `python benchmarks/{script} --seeds {seeds} --epochs {args.epochs}`", ""]
    for target in ("close", "far"):
        for what in scans:
            means = scan_means(rows, target, what)
            if means:
                lines.append(f"{SCAN_LABELS.get(what, what.capitalize())} scan ({target}): " + ", ".join(
                    f"{value}: {means[value]:.3f}" for value in sorted(means, key=float))
                    + " (mean final val acc, BN re-estimated)\n")
        evaluated = [r for r in rows if r["target"] == target and not r["method"].startswith("scan ")]
        if evaluated:
            lines += accuracy.paired_summary(evaluated, target, f"{target} target", by="target")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    groups = [t for t in ("close", "far") if any(r["target"] == t and r["method"] == "plain" for r in rows)]
    if not args.quick and groups:
        kept = [r for r in rows if not r["method"].startswith("scan ")]
        accuracy.plot_diffs(kept, groups, [f"{t} target" for t in groups], out / "paired_diffs.png", by="target")


if __name__ == "__main__":
    main()
