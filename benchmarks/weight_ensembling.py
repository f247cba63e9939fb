"""Weight-space ensembling on benchmark B: WiSE-FT and greedy model soups, paired seeds.

On each target of benchmark B (``accuracy_controlled.py``: the committed source SmallCNN, *close* and
*far* targets, 10 training images per class) and each seed (which fixes the split and the head init):

* plain fine-tuning, and plain + WiSE-FT (the ``WiSEFT`` callback, ``a`` chosen on validation);
* the best depth of benchmark B's depth scan (read from its runs.csv), and best depth + WiSE-FT;
* a greedy soup over four fine-tuning runs from the same start and head init (the plain run, lr 0.005,
  lr 0.02, and lr 0.01 with another data order), selected on validation; compared with plain and with
  the best single run of the four on validation.

Every test accuracy has BatchNorm statistics re-estimated on all training images (interpolations and
soups need it; the fine-tuned models get it too, so the comparison is like for like).

    python benchmarks/weight_ensembling.py --seeds 5 --epochs 30 --threads 1    # ~25 min on 1 CPU core
    python benchmarks/weight_ensembling.py --quick      # smoke run (tests/test_weight_ensembling_benchmark.py)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accuracy  # noqa: E402
import accuracy_controlled as bench_b  # noqa: E402

from lightning_transfer import ArrayDataModule, FreezeSchedule, WiSEFT, greedy_soup  # noqa: E402

ALPHAS = [i / 10 for i in range(11)]
SOUP_VARIANTS = [("lr 0.005", 0.005, 0), ("lr 0.02", 0.02, 0), ("lr 0.01, order 2", 0.01, 1)]  # + the plain run
B_DIR = Path("benchmarks/results/accuracy_controlled")


class Capture(pl.Callback):
    """The fine-tuned state at train end, before WiSEFT (listed after it) moves the weights."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def bn_test_acc(model, data) -> float:
    return accuracy.accuracy_bn_reestimated(model, data.train_dataloader(), data.test_dataloader(), max_batches=None)


def fine_tune(source, data, seed: int, epochs: int, lr: float = 0.01, order: int = 0, depth: int = 0,
              wise: bool = False) -> tuple:
    """One fine-tuning run; returns (model after fit, fine-tuned state, WiSEFT or None)."""
    pl.seed_everything(seed, verbose=False)  # the head init: the same for every run of this seed
    model = bench_b.build_model(source, data.num_classes, {"lr": lr})
    if order:
        pl.seed_everything(seed * 7919 + order, verbose=False)  # another data order, same start
    capture, wise_cb = Capture(), WiSEFT(alphas=ALPHAS) if wise else None
    callbacks = [*([FreezeSchedule(depth=depth)] if depth else []), capture, *([wise_cb] if wise else [])]
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, datamodule=data)
    return model, capture.state, wise_cb


def run_seed(target: str, seed: int, depth: int, source: Path, args) -> list[dict]:
    images, labels = bench_b.target_arrays(target)
    splits = bench_b.SPLITS[target] if not args.quick else {"val_per_class": 3, "test_per_class": 5}
    data = ArrayDataModule(images, labels, per_class=args.per_class, image_size=28, batch_size=16, seed=seed,
                           augment=False, **splits)
    data.setup("fit")
    rows = []

    def row(method, acc, **extra):
        rows.append({"target": target, "seed": seed, "method": method, "epochs": args.epochs,
                     "test_acc_bn": round(acc, 5), "val_acc": "", "alpha": "", "curve": "", "detail": "", **extra})

    bases = [("plain", 0)] + ([(f"depth {depth}", depth)] if depth else [])
    plain_state = None
    for name, d in bases:
        model, state, wise = fine_tune(source, data, seed, args.epochs, depth=d, wise=True)
        wise_acc = bn_test_acc(model, data)  # WiSEFT left the model at the chosen a (statistics re-estimated)
        model.load_state_dict(state)
        row(name, bn_test_acc(model, data), val_acc=round(wise.curve[1.0], 5))
        row(f"{name}+WiSE-FT", wise_acc, val_acc=round(wise.curve[wise.best_alpha], 5), alpha=wise.best_alpha,
            curve=";".join(f"{wise.curve[a]:.4f}" for a in ALPHAS))
        plain_state = plain_state or state
    states = [plain_state] + [fine_tune(source, data, seed, args.epochs, lr=lr, order=o)[1]
                              for _, lr, o in SOUP_VARIANTS]
    model = bench_b.build_model(source, data.num_classes, {})
    soup, log = greedy_soup(states, model, data.val_dataloader(), data.train_dataloader())
    model.load_state_dict(states[log[0]["candidate"]])
    names = ["lr 0.01"] + [v[0] for v in SOUP_VARIANTS]
    row("best single run of 4 (val)", bn_test_acc(model, data), val_acc=round(log[0]["val_acc"], 5),
        detail=names[log[0]["candidate"]])
    model.load_state_dict(soup)
    kept = [e for e in log if e["kept"]]
    row("greedy soup of 4", accuracy.accuracy_of(model, data.test_dataloader()), val_acc=round(kept[-1]["soup_val_acc"], 5),
        detail="+".join(names[e["candidate"]] for e in kept))
    return rows


def depth_of(target: str, args) -> int:
    if args.quick:
        return 1
    rows = [r for r in accuracy.read_rows(B_DIR / "runs.csv") if r["epochs"] == str(args.epochs)]
    return bench_b.best_depth(rows, target)


def write_report(rows: list[dict], out: Path, args) -> None:
    rows = [r for r in rows if r["epochs"] == str(args.epochs)]
    seeds = len({r["seed"] for r in rows})
    lines = ["# Weight-space ensembling on benchmark B", "",
             f"Source SmallCNN of benchmark B; {args.per_class} training images per class, {args.epochs} epochs, SGD "
             "lr 0.01, batch 16. WiSE-FT: `WiSEFT(alphas=[0, 0.1, ..., 1])`, a chosen on validation accuracy, the "
             "fine-tuned head kept. Greedy soup: `greedy_soup` over 4 runs from the same start and head init "
             "(lr 0.01 = the plain run, lr 0.005, lr 0.02, lr 0.01 with another data order). Test accuracy with "
             "BatchNorm statistics re-estimated on the training images for every model; paired differences over "
             "seeds with 95% t intervals.",
             f"Reproduce: `python benchmarks/weight_ensembling.py --seeds {seeds} --epochs {args.epochs} --threads 1`", ""]
    pairs = [("plain+WiSE-FT", "plain"), ("greedy soup of 4", "plain"), ("greedy soup of 4", "best single run of 4 (val)"),
             ("best single run of 4 (val)", "plain")]
    for target in ("close", "far"):
        sub = [r for r in rows if r["target"] == target]
        if not sub:
            continue
        methods = list(dict.fromkeys(r["method"] for r in sub))
        lines += [f"### {target} target", "", "| method | test acc (mean ± sd) | val acc | seeds |", "|---|---|---|---|"]
        for m in methods:
            accs = [float(r["test_acc_bn"]) for r in sub if r["method"] == m]
            vals = [float(r["val_acc"]) for r in sub if r["method"] == m]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {m} | {statistics.fmean(accs):.3f} ± {sd:.3f} | {statistics.fmean(vals):.3f} | {len(accs)} |")
        lines += ["", "| comparison (paired) | test acc difference [95% CI] |", "|---|---|"]
        depth_pairs = [(m, m.removesuffix("+WiSE-FT")) for m in methods if m.startswith("depth") and m.endswith("+WiSE-FT")]
        for a, b in pairs[:1] + depth_pairs + pairs[1:]:
            if a in methods and b in methods:
                lines.append(f"| {a} − {b} | {accuracy.t_interval(accuracy.paired_between(sub, target, a, b, 'test_acc_bn', 'target'))} |")
        for m in [m for m in methods if m.endswith("+WiSE-FT")]:
            chosen = [float(r["alpha"]) for r in sub if r["method"] == m]
            curves = [[float(x) for x in r["curve"].split(";")] for r in sub if r["method"] == m]
            mean_curve = ", ".join(f"{a:g}: {statistics.fmean(c[i] for c in curves):.3f}" for i, a in enumerate(ALPHAS))
            lines.append(f"\n{m}: chosen a {', '.join(f'{a:g}' for a in chosen)}; mean val acc by a: {mean_curve}")
        soups = [r["detail"] for r in sub if r["method"] == "greedy soup of 4"]
        lines += [f"\nGreedy soups kept: {'; '.join(soups)}", ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy.add_common_arguments(parser)
    parser.set_defaults(epochs=30, seeds=5)
    parser.add_argument("--targets", nargs="+", default=["close", "far"], choices=["close", "far"])
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/weight_ensembling")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, 2 per class, 1-epoch source")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.per_class, args.targets = 1, 1, 2, ["close"]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = (bench_b.source_checkpoint(out, 1, per_class=20) if args.quick else B_DIR / "source_cnn_8ep.pt")
    path = out / "runs.csv"
    rows = accuracy.read_rows(path)
    done = {(r["target"], r["seed"], r["epochs"]) for r in rows}
    for target in [] if args.report_only else args.targets:
        depth = depth_of(target, args)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if (target, str(seed), str(args.epochs)) in done:
                continue
            start = time.perf_counter()
            new = run_seed(target, seed, depth, source, args)
            for r in new:
                r["seconds"] = round(time.perf_counter() - start, 1)
                accuracy.append_row(path, r)
                rows.append({k: str(v) for k, v in r.items()})
            print(f"{target} seed {seed}: " + ", ".join(f"{r['method']} {r['test_acc_bn']:.3f}" for r in new), flush=True)
    write_report(rows, out, args)


if __name__ == "__main__":
    main()
