"""Do transferability scores predict the depth scans' fine-tuned accuracies? An honest check.

For each transfer depth k (features after block k, before any fine-tuning) LogME and H-score are computed
on the training split each scan fine-tuned on, and rank-correlated (Spearman ρ, Kendall τ) with the
accuracies the library measured by fine-tuning at that depth:

* benchmark A: EfficientNet-Lite0 (ImageNet) -> Animal-MNIST, 10 and 100 images per class
  (``benchmarks/results/depth_scan/results.csv``, split seed 0, depths 2, 4, 6, 8, 9);
* benchmark B: the SmallCNN source (``source_cnn_8ep.pt``) -> close and far targets
  (``benchmarks/results/accuracy_controlled/runs.csv`` rows ``scan depth k``, seeds 100-102, depths 1-4;
  scores averaged over the three seeds' splits, accuracies too). Depths count ``list_blocks`` blocks, as
  FreezeSchedule does: for SmallCNN each conv and each BatchNorm is a block, so depths 1-4 end after
  block1.0 (conv1), block1.1 (bn1), block2.0 (conv2), block2.1 (bn2).

Depth 0 (nothing frozen) has no frozen features to score and is left out of the correlations.

    python benchmarks/rank_correlation.py            # ~2 minutes on 1 CPU thread
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accuracy_controlled as bench_b  # noqa: E402

from lightning_transfer import AnimalMNISTDataModule, ArrayDataModule, TransferClassifier, rank_depths  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATORS = ("logme", "hscore")


def setting_a(per_class: int) -> list[dict]:
    """Scores per depth on the split of the benchmark-A scan (configs/quickstart.yaml, seed 0)."""
    scan = [r for r in csv.DictReader((RESULTS / "depth_scan/results.csv").open()) if r["per_class"] == str(per_class)]
    pl.seed_everything(0, verbose=False)
    model = TransferClassifier("efficientnet_lite0", num_classes=10)
    data = AnimalMNISTDataModule(per_class=per_class, val_per_class=50, image_size=64, batch_size=32, seed=0,
                                 augment=False)
    scores = {r["depth"]: r for r in rank_depths(model, data, ESTIMATORS)}
    acc = {int(r["depth"]): (float(r["val_acc"]), float(r["test_acc"])) for r in scan}
    return [{"benchmark": "A", "setting": f"{per_class} per class", "depth": d, "val_acc": acc[d][0],
             "test_acc": acc[d][1], **{e: scores[d][e] for e in ESTIMATORS}} for d in sorted(acc) if d in scores]


def setting_b(target: str) -> list[dict]:
    """Scores per depth on the splits of the benchmark-B scan (seeds 100-102), averaged over seeds."""
    source = RESULTS / "accuracy_controlled/source_cnn_8ep.pt"
    runs = [r for r in csv.DictReader((RESULTS / "accuracy_controlled/runs.csv").open())
            if r["target"] == target and r["method"].startswith("scan depth ") and r["epochs"] == "30"]
    images, labels = bench_b.target_arrays(target)
    by_depth: dict[int, dict[str, list[float]]] = {}
    for seed in bench_b.SCAN_SEEDS:
        pl.seed_everything(seed, verbose=False)
        data = ArrayDataModule(images, labels, per_class=10, image_size=28, batch_size=16, seed=seed, augment=False,
                               **bench_b.SPLITS[target])
        model = bench_b.build_model(source, int(labels.max()) + 1, {})
        for row in rank_depths(model, data, ESTIMATORS):
            for e in ESTIMATORS:
                by_depth.setdefault(row["depth"], {}).setdefault(e, []).append(row[e])
    seen: dict[str, dict] = {r["seed"] + r["method"]: r for r in runs}  # runs.csv repeats some rows
    rows = []
    for d, scores in sorted(by_depth.items()):
        mine = [r for r in seen.values() if r["method"] == f"scan depth {d}"]
        if not mine:  # the scan ran depths 0-4 of list_blocks' 8 blocks (conv and BN apart)
            continue
        rows.append({"benchmark": "B", "setting": target, "depth": d,
                     "val_acc": statistics.fmean(float(r["val_curve_bn"].split(";")[-1]) for r in mine),
                     "test_acc": statistics.fmean(float(r["test_acc_bn"]) for r in mine),
                     **{e: statistics.fmean(v) for e, v in scores.items()}})
    return rows


def exact_p(scores: list[float], values: list[float]) -> float:
    """Two-sided permutation p-value of Spearman's ρ: the share of all orderings at least as extreme."""
    observed = abs(stats.spearmanr(scores, values).statistic)
    perms = list(itertools.permutations(values))
    return sum(abs(stats.spearmanr(scores, p).statistic) >= observed - 1e-12 for p in perms) / len(perms)


def correlations(rows: list[dict]) -> list[dict]:
    out = []
    for setting in dict.fromkeys((r["benchmark"], r["setting"]) for r in rows):
        part = [r for r in rows if (r["benchmark"], r["setting"]) == setting]
        for e in ESTIMATORS:
            scores = [r[e] for r in part]
            top = max(part, key=lambda r: r[e])
            for acc in ("val_acc", "test_acc"):
                values = [r[acc] for r in part]
                best = max(part, key=lambda r: r[acc])
                out.append({"benchmark": setting[0], "setting": setting[1], "estimator": e, "accuracy": acc,
                            "depths": len(part), "spearman": stats.spearmanr(scores, values).statistic,
                            "p_exact": exact_p(scores, values),
                            "kendall": stats.kendalltau(scores, values).statistic,
                            "top_scored_depth": top["depth"], "best_depth": best["depth"],
                            "regret": best[acc] - top[acc]})
    return out


def report(rows: list[dict], corr: list[dict], seconds: float) -> str:
    lines = ["# Transferability scores vs. fine-tuned accuracy by transfer depth", "",
             "Scores: LogME and H-score (Ledoit-Wolf shrinkage) of the pooled features after block k, on the "
             "training split of each scan, before fine-tuning. Accuracies: the depth scans already in "
             "`benchmarks/results/` (A: one run per depth; B: mean of seeds 100-102, BN re-estimated). "
             f"Reproduce: `python benchmarks/rank_correlation.py` ({seconds:.0f} s on 1 CPU thread).", "",
             "With 4 or 5 depths no correlation short of a perfect one is significant: p (exact) is the two-sided "
             "permutation p-value of ρ over all orderings. Regret: accuracy of the best depth minus that of the "
             "top-scored depth.", "",
             "| benchmark | setting | estimator | vs | depths | Spearman ρ | p (exact) | Kendall τ | top-scored depth | "
             "best depth | regret (acc) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in corr:
        lines.append(f"| {c['benchmark']} | {c['setting']} | {c['estimator']} | {c['accuracy']} | {c['depths']} | "
                     f"{c['spearman']:+.2f} | {c['p_exact']:.2f} | {c['kendall']:+.2f} | {c['top_scored_depth']} | {c['best_depth']} | "
                     f"{c['regret']:.3f} |")
    lines += ["", "Per depth:", "", "| benchmark | setting | depth | LogME | H-score | val acc | test acc |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['setting']} | {r['depth']} | {r['logme']:.4f} | {r['hscore']:.3f} | "
              f"{r['val_acc']:.3f} | {r['test_acc']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "rank"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [*setting_a(10), *setting_a(100), *setting_b("close"), *setting_b("far")]
    corr = correlations(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("scores.csv", rows), ("correlations.csv", corr)):
        with (out / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows({k: f"{v:.5f}" if isinstance(v, float) else v for k, v in r.items()} for r in table)
    text = report(rows, corr, time.perf_counter() - start)
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
