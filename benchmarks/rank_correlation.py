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

* benchmark D (``--part text``): all-MiniLM-L6-v2 -> BBC News, 8 per class, as ``benchmarks/tuned.py`` runs
  task D-8, at plain's chosen learning rate (1e-4): ``FreezeSchedule(depth=k)`` for k = 1..7 (the embeddings,
  then each of the six layers; 7 leaves the pooler and the classifier trainable), seeds 0-2, one row per run in
  ``rank/text_depths.csv`` (resumable; workers on disjoint seeds may run side by side). Scores: the mean over
  unpadded tokens of each block's output on each seed's training split (40 articles), averaged over seeds.

Depth 0 (nothing frozen) has no frozen features to score and is left out of the correlations.

Across backbones (``--part backbones``): EfficientNet-Lite0, Lite1 and Lite2 (ImageNet, offline) are each
fine-tuned on benchmark A's task as ``benchmarks/accuracy.py`` fine-tunes "plain" (Animal-MNIST, 10 per
class, 64x64, validation 30 and test 200 per class, SGD lr 0.01, 15 epochs; seed -> split and head init),
for seeds 0-4, one row per run in ``backbones.csv`` (resumable). Unlike there, no per-epoch validation
curve is recorded (it costs twice the training here), only the final validation accuracy, so every
backbone, Lite0 included, is fine-tuned here. Each backbone is scored with ``rank_models``
(LogME and H-score on the head-input features, LEEP and NCE from its ImageNet head) on each seed's
training split, and the order is compared with the fine-tuned accuracies (Kendall τ over 3 backbones).

    python benchmarks/rank_correlation.py --part depths      # ~30 s on 1 CPU thread
    python benchmarks/rank_correlation.py --part backbones   # ~12 minutes on 1 CPU thread (15 fine-tunings)
    python benchmarks/rank_correlation.py --part text        # ~12 minutes on 1 CPU thread (21 fine-tunings)
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

import accuracy as bench_a  # noqa: E402
import accuracy_controlled as bench_b  # noqa: E402

from lightning_transfer import AnimalMNISTDataModule, ArrayDataModule, TransferClassifier, rank_depths  # noqa: E402
from lightning_transfer.backbones import build_backbone  # noqa: E402
from lightning_transfer.rank import Normalized, rank_models  # noqa: E402

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


TEXT_DEPTHS, TEXT_LR, TEXT_SEEDS = range(1, 8), 1e-4, (0, 1, 2)


def run_text_depths(path: Path, seeds) -> list[dict]:
    """Fine-tune task D-8 frozen through each depth (``tuned.run_one``: its seeding, split and measurement) for
    every (seed, depth) not yet in ``path``; one appended row per run. Returns all rows of ``path``."""
    import tuned
    from tuned_tasks import TASKS

    from lightning_transfer import FreezeSchedule

    task, done = TASKS["D-8"], {(r["seed"], r["depth"]) for r in bench_a.read_rows(path)}
    torch.use_deterministic_algorithms(True)
    for seed in seeds:
        for depth in TEXT_DEPTHS:
            if (str(seed), str(depth)) in done:
                continue
            start = time.perf_counter()
            setting = (f"depth {depth}, lr {TEXT_LR:g}", {"lr": TEXT_LR},
                       lambda d=depth: [FreezeSchedule(depth=d)], False)
            measured = tuned.run_one(task, "depth scan", setting, seed)
            row = {"seed": seed, "depth": depth, "lr": TEXT_LR, "val_acc": measured["val_acc"],
                   "test_acc": measured["test_acc"], "seconds": round(time.perf_counter() - start, 1)}
            bench_a.append_row(path, row)
            print(f"D-8 depth {depth} seed {seed}: {row}", flush=True)
    return bench_a.read_rows(path)


def setting_d(runs: list[dict]) -> list[dict]:
    """Scores per depth on the D-8 training split of each seed (averaged), beside the mean fine-tuned accuracy."""
    from tuned_tasks import TASKS

    task = TASKS["D-8"]
    seeds = sorted({int(r["seed"]) for r in runs})
    by_depth: dict[int, dict[str, list[float]]] = {}
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        for row in rank_depths(task.model({"lr": TEXT_LR}), task.data(seed, augment=False), ESTIMATORS):
            for e in ESTIMATORS:
                by_depth.setdefault(row["depth"], {}).setdefault(e, []).append(row[e])
    rows = []
    for d in TEXT_DEPTHS:
        mine = [r for r in runs if r["depth"] == str(d)]
        if len(mine) != len(seeds):
            raise SystemExit(f"text depth scan incomplete at depth {d}: run --part text to finish it")
        rows.append({"benchmark": "D", "setting": "8 per class", "depth": d,
                     "val_acc": statistics.fmean(float(r["val_acc"]) for r in mine),
                     "test_acc": statistics.fmean(float(r["test_acc"]) for r in mine),
                     **{e: statistics.fmean(by_depth[d][e]) for e in ESTIMATORS}})
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
             "`benchmarks/results/` (A: one run per depth; B: mean of seeds 100-102, BN re-estimated; D, text: "
             "MiniLM -> BBC News at 8 per class, mean of seeds 0-2, from `rank/text_depths.csv`). "
             f"Reproduce: `python benchmarks/rank_correlation.py --part depths` ({seconds:.0f} s on 1 CPU thread; "
             "the text scan's fine-tunings first with `--part text`).", "",
             "With 4 or 5 depths no correlation short of a perfect one is significant (with D's 7, |ρ| ≥ 0.79 is at "
             "p < 0.05): p (exact) is the two-sided "
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


BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BACKBONE_SEEDS = 5  # seeds 0-4
MODEL_ESTIMATORS = ("logme", "hscore", "leep", "nce")
EPOCHS = 15
MARKER = "## Across backbones"


def task_a(seed: int, augment: bool = True) -> AnimalMNISTDataModule:
    """Benchmark A's task as ``accuracy.run_one`` builds it with that script's defaults."""
    return AnimalMNISTDataModule(per_class=10, seed=seed, image_size=64, val_per_class=30, test_per_class=200,
                                 augment=augment)


def fine_tune(backbone: str, seed: int) -> dict:
    """``accuracy.run_one``'s "plain" run with another backbone (same seeding, split, optimizer, budget),
    evaluated once at the end: validation and test accuracy, BatchNorm as trained and re-estimated."""
    pl.seed_everything(seed, verbose=False)
    data = task_a(seed)
    model = TransferClassifier(backbone, num_classes=10, lr=0.01)
    measured = bench_a.fit_and_test(model, data, [], EPOCHS, curves=False, final_val=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    val = trainer.validate(model, datamodule=data, verbose=False)[0]["val_acc"]
    return {"val_acc": round(float(val), 5), "val_acc_bn": float(measured["val_curve_bn"]),
            "test_acc": measured["test_acc"], "test_acc_bn": measured["test_acc_bn"]}


def run_backbones(path: Path, seeds: range) -> list[dict]:
    """Fine-tune every (seed, backbone) not yet in ``path``; one appended row per run. Returns the rows of ``seeds``."""
    rows = bench_a.read_rows(path)
    for seed in seeds:
        for name in BACKBONES:
            if any(r["backbone"] == name and r["seed"] == str(seed) for r in rows):
                continue
            start = time.perf_counter()
            measured = fine_tune(name, seed)
            row = {"backbone": name, "seed": seed, "epochs": EPOCHS, **measured,
                   "seconds": round(time.perf_counter() - start, 1)}
            bench_a.append_row(path, row)
            rows.append({k: str(v) for k, v in row.items()})
            print(f"{name} seed={seed}: {measured} ({row['seconds']} s)", flush=True)
    return [r for r in rows if int(r["seed"]) in seeds]


def backbone_scores(seeds: range) -> list[dict]:
    """``rank_models`` scores of each backbone (its ImageNet head kept) on each seed's training split."""
    rows = []
    for seed in seeds:
        candidates = {}
        for name in BACKBONES:
            net, (mean, std) = build_backbone(name, num_classes=None)
            candidates[name] = Normalized(net, mean, std)
        for r in rank_models(candidates, task_a(seed, augment=False), MODEL_ESTIMATORS):
            rows.append({"seed": seed, "backbone": r["model"], **{e: r[e] for e in MODEL_ESTIMATORS}})
    return rows


def accuracies(runs: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """(backbone, seed) -> final val accuracy and test accuracy, BatchNorm as trained and re-estimated."""
    keys = ("val_acc", "val_acc_bn", "test_acc", "test_acc_bn")
    return {(r["backbone"], int(r["seed"])): {k: float(r[k]) for k in keys} for r in runs}


def tau(scores: list[float], values: list[float]) -> float:
    return float(stats.kendalltau(scores, values).statistic)


def backbone_report(runs: list[dict], scores: list[dict]) -> str:
    acc = accuracies(runs)
    seeds = sorted({s for _, s in acc})
    score = {(r["backbone"], int(r["seed"])): r for r in scores}
    mean_acc = {b: {k: statistics.fmean(acc[b, s][k] for s in seeds) for k in acc[b, seeds[0]]} for b in BACKBONES}
    mean_score = {b: {e: statistics.fmean(float(score[b, s][e]) for s in seeds) for e in MODEL_ESTIMATORS}
                  for b in BACKBONES}
    minutes = sum(float(r["seconds"]) for r in runs) / 60
    lines = [MARKER, "",
             f"EfficientNet-Lite0/1/2 (ImageNet, offline) fine-tuned on benchmark A's task as "
             f"`benchmarks/accuracy.py` runs \"plain\" (Animal-MNIST, 10 per class, 64×64, val 30 / test 200 per "
             f"class, SGD lr 0.01, {EPOCHS} epochs), seeds {seeds[0]}-{seeds[-1]} (a seed fixes the split and the "
             "head init for every backbone), evaluated once at the end (no per-epoch curve), every run here. "
             "Scores: `rank_models` on each seed's training split (100 images, no augmentation): LogME and "
             "H-score on the 1280-d head input, LEEP and NCE from each ImageNet head. Reproduce: "
             f"`python benchmarks/rank_correlation.py --part backbones` ({minutes:.0f} min of fine-tuning on 1 "
             "CPU thread).", "",
             "| backbone | params | val acc (BN re-est.) | test acc (BN re-est.) | test acc (BN as trained) | "
             "LogME | H-score | LEEP | NCE |", "|---|---|---|---|---|---|---|---|---|"]
    for b in BACKBONES:
        cells = []
        for k in ("val_acc_bn", "test_acc_bn", "test_acc"):
            values = [acc[b, s][k] for s in seeds]
            cells.append(f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}")
        params = sum(p.numel() for p in build_backbone(b, 10, pretrained=False)[0].parameters()) / 1e6
        lines.append(f"| {b} | {params:.1f} M | {' | '.join(cells)} | {mean_score[b]['logme']:.4f} | "
                     f"{mean_score[b]['hscore']:.3f} | {mean_score[b]['leep']:.3f} | {mean_score[b]['nce']:.3f} |")
    best = max(BACKBONES, key=lambda b: mean_acc[b]["test_acc_bn"])
    for b in BACKBONES:
        diffs = [acc[best, s]["test_acc_bn"] - acc[b, s]["test_acc_bn"] for s in seeds]
        if b != best:
            lines += ["", f"Paired test accuracy (BN re-est.), {best} − {b}, seeds {seeds[0]}-{seeds[-1]}: "
                      f"{', '.join(f'{d:+.3f}' for d in diffs)}; mean [95% t-interval] {bench_a.t_interval(diffs)}."]
    lines += ["", "Does each estimator order the three backbones as their fine-tuned accuracies do? Kendall τ "
              "between the scores and the accuracies over the 3 backbones (+1: same order, −1: reversed), per "
              "seed and on the means over seeds; regret: mean accuracy of the best backbone minus that of the "
              "top-scored one. With 3 items τ takes only the values ±1 and ±1/3 (without "
              "ties); even τ = +1 has a permutation p-value of 1/3: **no result here can be significant**.", "",
              "| estimator | vs | τ seed " + " | τ seed ".join(map(str, seeds)) + " | τ on means | top-scored | best | regret (acc) |",
              "|---|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for e in MODEL_ESTIMATORS:
        for k in ("val_acc_bn", "test_acc_bn"):
            per_seed = [tau([float(score[b, s][e]) for b in BACKBONES], [acc[b, s][k] for b in BACKBONES])
                        for s in seeds]
            on_means = tau([mean_score[b][e] for b in BACKBONES], [mean_acc[b][k] for b in BACKBONES])
            top = max(BACKBONES, key=lambda b: mean_score[b][e])
            best = max(BACKBONES, key=lambda b: mean_acc[b][k])
            lines.append(f"| {e} | {k} | " + " | ".join(f"{t:+.2f}" for t in per_seed)
                         + f" | {on_means:+.2f} | {top} | {best} | {mean_acc[best][k] - mean_acc[top][k]:.3f} |")
    lines += ["", "Per seed:", "", "| seed | backbone | val acc (BN re-est.) | test acc (BN re-est.) | LogME | "
              "H-score | LEEP | NCE |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s} | {b} | {acc[b, s]['val_acc_bn']:.3f} | {acc[b, s]['test_acc_bn']:.3f} | "
              + " | ".join(f"{float(score[b, s][e]):.4f}" for e in MODEL_ESTIMATORS) + " |"
              for s in seeds for b in BACKBONES]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, table: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.5f}" if isinstance(v, float) else v for k, v in r.items()} for r in table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "rank"))
    parser.add_argument("--part", choices=("depths", "backbones", "text", "all"), default="all")
    parser.add_argument("--text-seeds", default=",".join(map(str, TEXT_SEEDS)),
                        help="seeds of the text depth scan to run here")
    parser.add_argument("--backbone-seeds", type=int, default=BACKBONE_SEEDS, help="seeds 0..N-1 (default %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = (out / "results.md").read_text() if (out / "results.md").is_file() else ""
    depth_text, _, backbone_text = old.partition(MARKER)
    backbone_text = MARKER + backbone_text if backbone_text else ""
    if args.part == "text":  # the fine-tunings only; --part depths then adds the correlations
        run_text_depths(out / "text_depths.csv", [int(s) for s in args.text_seeds.split(",")])
        return
    if args.part in ("depths", "all"):
        start = time.perf_counter()
        text_runs = bench_a.read_rows(out / "text_depths.csv")
        rows = [*setting_a(10), *setting_a(100), *setting_b("close"), *setting_b("far"),
                *(setting_d(text_runs) if text_runs else [])]
        corr = correlations(rows)
        write_csv(out / "scores.csv", rows)
        write_csv(out / "correlations.csv", corr)
        depth_text = report(rows, corr, time.perf_counter() - start) + "\n"
    if args.part in ("backbones", "all"):
        seeds = range(args.backbone_seeds)
        runs = run_backbones(out / "backbones.csv", seeds)
        scores = backbone_scores(seeds)
        write_csv(out / "backbone_scores.csv", scores)
        backbone_text = backbone_report(runs, scores)
    text = depth_text + backbone_text
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
