"""Does each method help, tuned fairly? Every method, the same small budget, the linear probe beside it.

Budget: every fine-tuning method gets four settings per task: its own knob (two values) × two learning
rates, or, for methods without a knob (plain, MEI, LP-FT from a converged probe, from scratch), four
learning rates. The setting with the best mean validation accuracy over the seeds is chosen; test
accuracy is reported for that setting only. The linear probe (cached eval-mode features of the
pre-trained network, L2 strength chosen on validation from six values) needs no learning rate.

Every run also fits a linear probe on its own final features (train split, L2 chosen on validation):
``probe on final features`` separates what a method did to the backbone from what it did to the head.

Reproducible per seed: a seed fixes the split, the head init and the training stream (order and flips,
``SeededEpochSampler``) for every method; runs are single-threaded by default with deterministic
algorithms, and each row of ``runs.csv`` records thread count, determinism, torch version and commit.
Rows are kept and never recomputed; a run with other threads is a different run.

    python benchmarks/tuned.py --task A --seeds 3                  # Lite0 -> Animal-MNIST, 10/class
    python benchmarks/tuned.py --task B-close B-far --seeds 3      # SmallCNN, close and far targets
    python benchmarks/tuned.py --task A --methods plain,MEI         # a subset (parallel workers)
    python benchmarks/tuned.py --task B-close --methods "Model Stock (k=2)"   # two runs per seed, merged
    python benchmarks/tuned.py --quick                             # smoke run (the test suite runs it)
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
from tuned_report import write_report  # noqa: E402
from tuned_tasks import TASKS, Task  # noqa: E402

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
    StochNorm,
    model_stock,
)
from lightning_transfer.anatomy import final_linear, find_head  # noqa: E402
from lightning_transfer.batchnorm import reestimate_batchnorm  # noqa: E402
from lightning_transfer.functional.linear_probe import probe_accuracy, select_linear_probe  # noqa: E402
from lightning_transfer.probe import head_features, linear_probe, set_head_from_probe_  # noqa: E402
from lightning_transfer.rank import collect_features  # noqa: E402

PROBE = "linear probe"
PROBE_MEAN = "linear probe (mean-pooled)"
STOCK = "Model Stock (k=2)"


def settings(task: Task) -> dict[str, list[tuple[str, dict, object, bool]]]:
    """method -> its four settings ``(label, TransferClassifier overrides, callbacks factory, probe init)``."""
    no_wd = {"weight_decay": 0.0}  # L2-SP's anchor replaces weight decay
    total = task.epochs * task.steps_per_epoch

    def lrs(make=lambda: [], probe=False, **overrides):
        return [(f"lr {lr:g}", {"lr": lr, **overrides}, make, probe) for lr in task.lrs]

    def knob(name, values, make, **overrides):
        return [(f"{name} {v:g}, lr {lr:g}", {"lr": lr, **overrides}, (lambda v=v: make(v)), False)
                for v in values for lr in task.knob_lrs]

    layers = task.delta_layers
    return {
        "plain": lrs(),
        "L2-SP": knob("alpha", (0.01, 0.1), lambda a: [L2SP(alpha=a, beta=0.01)], **no_wd),
        "L2-SP+DTNH": knob("alpha", (0.01, 0.1), lambda a: [L2SP(alpha=a, beta=0.01), DTNH()], **no_wd),
        "DELTA": knob("alpha", (0.01, 0.1), lambda a: [FeatureMapRegularization(layers, alpha=a)]),
        # text: DELTA's penalty sums over tokens x hidden units, so its CNN grid divided by the tokens per example
        **({"DELTA (α / tokens)": knob("alpha", (0.01 / task.tokens, 0.1 / task.tokens),
                                      lambda a: [FeatureMapRegularization(layers, alpha=a)])}
           if task.tokens else {}),
        "DELTA+DTNH": knob("alpha", (0.01, 0.1), lambda a: [FeatureMapRegularization(layers, alpha=a), DTNH()]),
        "RIFLE": knob("re-init at step", (total // 4, total // 2),
                      lambda p: [RIFLE(points=[int(p)], interval="step", min_epochs_after=0)]),
        "MEI": lrs(lambda: [MaxEntropyHeadInit()]),
        "LP-FT (SGD probe)": knob("probe epochs", (max(1, task.epochs // 5), max(1, task.epochs // 3)),
                                  lambda k: [FreezeSchedule.lp_ft(int(k), blocks=task.blocks)]),
        "LP-FT (converged probe)": lrs(probe=True),
        "best depth": knob("depth", task.depths, lambda d: [FreezeSchedule(depth=int(d), blocks=task.blocks)]),
        # layer decay: TransferClassifier(layer_decay=xi), block d steps below the head at lr * xi^d (two values)
        # x two learning rates (the head's)
        "layer decay": [(f"xi {xi:g}, lr {lr:g}", {"lr": lr, "layer_decay": xi}, lambda: [], False)
                        for xi in (0.65, 0.8) for lr in task.knob_lrs],
        # LiNeS: the depth slope b (two values) x two learning rates; a is chosen on validation inside each run
        "LiNeS": knob("b", (0.5, 1.0), lambda b: [LiNeS(beta=b, blocks=task.blocks)]),
        # StochNorm: the probability of running statistics (the paper's 0.5, and 0.3) x two learning rates
        "StochNorm": knob("p", (0.3, 0.5), lambda p: [StochNorm(p=p, seed=0)]),
        # Co-Tuning: lambda (tllib's 2.3, and 1) x two learning rates, with the task's source head: Lite0's ImageNet
        # head (A), the source network's Animal-MNIST 0-4 head (B, C); D's MiniLM has none (a sentence encoder)
        **({"Co-Tuning": knob("lambda", (1.0, 2.3), lambda a: [CoTuning(task.source_head(), alpha=a)])}
           if task.source_head is not None else {}),
        # SPD: the strength lambda (two values) x two learning rates, no weight decay (SPD replaces it)
        "SPD": knob("lambda", (0.5, 1.0), lambda v: [SPD(lam=v)], **no_wd),
        # BSS: eta (the paper's 0.001, and 0.01) x two learning rates, k = 1
        "BSS": knob("eta", (0.001, 0.01), lambda v: [BSS(eta=v, k=1)]),
        # Model Stock: at each of four learning rates, two plain runs from the same w0 and head init (the seed's),
        # trained on two streams of the same split (the seed's, and seed + 1000), merged per layer
        STOCK: lrs(),
        "from scratch": lrs(pretrained=False),
        # LoRA (peft, rank 8 on query and value, the head in full) at four learning rates ten times the task's:
        # with about 0.3% of the weights trained, LoRA's usual rates are an order of magnitude above full fine-tuning's
        **({"LoRA (r 8)": [(f"lr {10 * lr:g}", {"lr": 10 * lr, "lora_rank": 8}, lambda: [], False) for lr in task.lrs]}
           if task.lora else {}),
    }


def features_of(model, data, layer: torch.nn.Module | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Features (eval mode) of the train, val and test splits, without augmentation: the head's input, or the
    output of ``layer`` mean-pooled over the real tokens."""
    loaders = {s: getattr(data, f"{s}_dataloader")() for s in ("train", "val", "test")}
    if layer is None:
        return {s: head_features(model, loader) for s, loader in loaders.items()}
    pooled = {s: collect_features(model, loader, {"layer": layer}, None, pre=False, owner=PROBE_MEAN)
              for s, loader in loaders.items()}
    return {s: (features["layer"], labels) for s, (features, labels, _) in pooled.items()}


def probe_on(feats, num_classes: int) -> dict:
    """A linear probe fitted on the train features, its L2 strength chosen on validation: its accuracies."""
    probe = select_linear_probe(*feats["train"], *feats["val"], num_classes)
    return {"probe_val_acc": round(probe.val_acc, 5),
            "probe_test_acc": round(probe_accuracy(probe.weight, probe.bias, *feats["test"]), 5),
            "probe_l2": probe.l2}


def measure(model, feats, num_classes: int) -> dict:
    """Accuracy of the model's own head, and of a linear probe fitted on its features."""
    layer = final_linear(find_head(model)[1])
    weight, bias = layer.weight.detach().float(), layer.bias.detach().float()
    test_x, test_y = feats["test"]
    return {"val_acc": round(probe_accuracy(weight, bias, *feats["val"]), 5),
            "test_acc": round(probe_accuracy(weight, bias, test_x, test_y), 5),
            "test_loss": round(float(F.cross_entropy(test_x @ weight.T + bias, test_y)), 6),
            **probe_on(feats, num_classes)}


def run_one(task: Task, method: str, setting: tuple, seed: int) -> dict:
    label, overrides, make_callbacks, probe_init = setting
    pl.seed_everything(seed, verbose=False)
    model = task.model(overrides)
    plain = task.data(seed, augment=False)
    if method in (PROBE, PROBE_MEAN):  # no training: a probe on the pre-trained features, L2 chosen on validation
        layer = model.get_submodule(task.mean_pooled_layer) if method == PROBE_MEAN else None  # pad tokens excluded
        row = probe_on(features_of(model, plain, layer), task.num_classes)
        return {**row, "val_acc": row["probe_val_acc"], "test_acc": row["probe_test_acc"], "test_loss": ""}
    if method == STOCK:
        return run_model_stock(task, overrides, seed, plain)
    callbacks = make_callbacks()
    if probe_init:  # LP-FT as its paper does it: a converged probe on cached features, then fine-tuning
        set_head_from_probe_(model, linear_probe(model, plain.train_dataloader(), plain.val_dataloader()))
    fit(task, model, task.data(seed, augment=task.augment), callbacks)
    rifle = next((c for c in callbacks if isinstance(c, RIFLE)), None)
    after = rifle.steps_after_last if rifle is not None else ""
    return {**measure(model, features_of(model, plain), task.num_classes), "steps_after_last_reinit": after}


def fit(task: Task, model, data, callbacks: list) -> None:
    """The task's training budget on the CPU, without validation or checkpoints."""
    trainer = pl.Trainer(max_epochs=task.epochs, max_steps=task.epochs * task.steps_per_epoch, accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=callbacks)
    trainer.fit(model, datamodule=data)


def run_model_stock(task: Task, overrides: dict, seed: int, plain) -> dict:
    """Two plain fine-tuning runs from one start (the seed's model and head), each on its own training stream of
    the seed's split, merged by :func:`~lightning_transfer.model_stock`; BatchNorm statistics re-estimated on
    the training split; measured like any run (twice a plain run's compute)."""
    states, w0, model = [], None, None
    for run in range(2):
        pl.seed_everything(seed, verbose=False)
        model = task.model(overrides)
        if w0 is None:
            w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        data = task.data(seed, augment=task.augment)
        data.setup("fit")  # the seed's split; then the second run's own order (and flips)
        data.hparams.seed = seed + 1000 * run
        pl.seed_everything(seed + 1000 * run, verbose=False)
        fit(task, model, data, [])
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    # both runs start from w0 by construction; at the largest learning rates a run moves farther than the
    # default guard against runs from other starts allows (SmallCNN at lr 0.1: 4.8·‖w0‖), so it is off here
    model.load_state_dict(model_stock(states, w0, max_relative_update=float("inf")).state_dict)
    model.train()
    reestimate_batchnorm(model, plain.train_dataloader())  # no-op without BatchNorm
    model.eval()
    return {**measure(model, features_of(model, plain), task.num_classes), "steps_after_last_reinit": ""}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment(threads: int) -> dict:
    return {"threads": threads, "deterministic": torch.are_deterministic_algorithms_enabled(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit()}


def probes(task: Task) -> dict[str, list[tuple[str, dict, object, bool]]]:
    """The untrained baselines: the probe on the head's input, and on a text encoder's mean-pooled last layer."""
    table = {PROBE: [("L2 on validation", {}, None, False)]}
    if task.mean_pooled_layer is not None:
        table[PROBE_MEAN] = [("L2 on validation", {}, None, False)]
    return table


def methods_of(tasks) -> list[str]:
    """Every method of these tasks, the probes first, in table order."""
    order: list[str] = []
    for task in tasks:  # a method only some tasks have goes right after its predecessor in that task's table
        previous = None
        for method in (*probes(task), *settings(task)):
            if method not in order:
                order.insert(order.index(previous) + 1 if previous else 0, method)
            previous = method
    return order


def run_missing(path: Path, task: Task, methods: list[str], seeds, threads: int) -> None:
    table = {**probes(task), **settings(task)}
    done = {(r["task"], r["method"], r["setting"], r["seed"], r["threads"]) for r in accuracy.read_rows(path)}
    env = environment(threads)
    for method in methods:
        if method not in table:
            print(f"{task.key}: {method} does not apply (see tuned_tasks.py), skipped", flush=True)
            continue
        for setting in table[method]:
            for seed in seeds:
                if (task.key, method, setting[0], str(seed), str(threads)) in done:
                    continue
                start = time.perf_counter()
                measured = run_one(task, method, setting, seed)
                row = {"task": task.key, "method": method, "setting": setting[0], "seed": seed, "epochs": task.epochs,
                       **{k: measured.get(k, "") for k in ("val_acc", "test_acc", "test_loss", "probe_val_acc",
                                                            "probe_test_acc", "probe_l2", "steps_after_last_reinit")},
                       "seconds": round(time.perf_counter() - start, 1), **env}
                accuracy.append_row(path, row)
                print(f"{task.key} {method} [{setting[0]}] seed {seed}: val {row['val_acc']} test {row['test_acc']} "
                      f"(probe on final features {row['probe_test_acc']})", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", default=["A"], choices=sorted(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default=None, help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of a run's identity)")
    parser.add_argument("--out", default="benchmarks/results/tuned")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a tiny task A: 1 seed, 1 epoch, 3 methods (9 runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [TASKS["quick"]] if args.quick else [TASKS[k] for k in args.task]
    if args.quick:
        args.seeds, args.methods = 1, args.methods or f"{PROBE},plain,LP-FT (converged probe)"
    known = methods_of(tasks)
    methods = args.methods.split(",") if args.methods else known
    unknown = [m for m in methods if m not in known]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {known}")
    for task in [] if args.report_only else tasks:
        run_missing(out / "runs.csv", task, methods, range(args.seeds), args.threads)
    write_report(accuracy.read_rows(out / "runs.csv"), out, args.threads, {t.key: t for t in tasks}
                 if args.quick else TASKS, methods_of(tasks if args.quick else TASKS.values()))


if __name__ == "__main__":
    main()
