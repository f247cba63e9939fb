"""The transfer-depth scan: fine-tune with the first k blocks frozen, for each k, from the same start."""

from __future__ import annotations

import csv
import hashlib
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import Callback

from lightning_transfer.anatomy import list_blocks

__all__ = ["FIELDS", "InitFingerprint", "depth_scan", "summarize"]

#: Columns of the scan's ``results.csv``, one row per run.
FIELDS = ["per_class", "seed", "depth", "val_acc", "test_acc", "init_sha", "seconds"]


class InitFingerprint(Callback):
    """SHA-256 of every parameter when training starts: proves that the runs of a scan share their start."""

    def __init__(self) -> None:
        self.sha: str | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        h = hashlib.sha256()
        for name, p in sorted(pl_module.state_dict().items()):
            if name.endswith("num_batches_tracked"):
                continue
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        self.sha = h.hexdigest()[:16]


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _key(per_class, seed, depth) -> tuple[str, str, str]:
    return (str(per_class), str(seed), str(depth))


def depth_scan(
    configs: Sequence[str],
    depths: Sequence[int] | None = None,
    seeds: Sequence[int] = (0,),
    per_class: Sequence[int | None] = (None,),
    out_dir: str | Path = "runs/depth_scan",
    extra_args: Sequence[str] = (),
    plot: bool = True,
    data_seed: bool = True,
) -> list[dict]:
    """Run the scan; finished runs (found in ``out_dir/results.csv``) are not run again.

    Every run starts from the same pre-trained weights and, for a given seed, the same head
    initialization and data split (``seed_everything(seed)`` before the model is built; the first
    parameters of each run are fingerprinted in ``init_sha``). Runs differ only in ``FreezeSchedule(depth=k)``.
    Selection uses ``val_acc``; ``test_acc`` is reported beside it and never used to choose.

    Args:
        configs: LightningCLI fit configs (e.g. ``configs/quickstart.yaml``).
        depths: Depths to run; default every depth ``0..L`` (``L`` blocks before the head).
        seeds: Seeds (mean ± std over them).
        per_class: ``data.init_args.per_class`` values, one curve each (``None``: the config's).
        out_dir: Where ``results.csv``, ``results.md`` and ``depth_scan.png`` go.
        extra_args: More LightningCLI arguments for every run (e.g. ``--trainer.max_epochs=10``).
        plot: Write the PNG (needs matplotlib).
        data_seed: Also set ``data.init_args.seed`` to the seed (the split changes with it).
    """
    from lightning_transfer.cli import build_cli

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = [a for c in configs for a in ("--config", str(c))]
    probe = build_cli([*base, *extra_args], run=False)
    num_blocks = len(list_blocks(probe.model)) - 1
    depths = list(range(num_blocks + 1)) if depths is None else list(depths)
    bad = [d for d in depths if not 0 <= d <= num_blocks]
    if bad:
        raise ValueError(f"depths {bad} out of range: the model has {num_blocks} blocks before the head (0..{num_blocks}).")
    if any(type(cb).__name__ == "FreezeSchedule" for cb in probe.trainer.callbacks):
        raise ValueError("The config already has a FreezeSchedule; the scan adds its own. Remove it from the config.")
    del probe

    results_path = out / "results.csv"
    rows = _read(results_path)
    done = {_key(r["per_class"], r["seed"], r["depth"]) for r in rows}
    plan = [(pc, s, d) for pc in per_class for s in seeds for d in depths]
    for i, (pc, seed, depth) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}] per_class={pc} seed={seed} depth={depth}"
        if _key(pc, seed, depth) in done:
            print(f"{tag}: done before, skipped", flush=True)
            continue
        print(f"{tag}: running", flush=True)
        fingerprint = InitFingerprint()
        args = [
            *base, "--seed_everything", str(seed),
            "--trainer.callbacks+=lightning_transfer.FreezeSchedule", f"--trainer.callbacks.depth={depth}",
            "--trainer.enable_checkpointing=false", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            *([f"--data.init_args.per_class={pc}"] if pc is not None else []),
            *([f"--data.init_args.seed={seed}"] if data_seed else []), *extra_args,
        ]
        start = time.perf_counter()
        cli = build_cli(args, run=False)
        cli.trainer.callbacks.append(fingerprint)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        val = float(cli.trainer.callback_metrics["val_acc"])
        tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        row = {"per_class": pc, "seed": seed, "depth": depth, "val_acc": round(val, 5),
               "test_acc": round(float(tested[0]["test_acc"]), 5) if tested and "test_acc" in tested[0] else "",
               "init_sha": fingerprint.sha, "seconds": round(time.perf_counter() - start, 1)}
        rows.append({k: str(v) for k, v in row.items()})
        with results_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"{tag}: val_acc={val:.4f} ({row['seconds']} s)", flush=True)
        del cli
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    (out / "results.md").write_text(summarize(rows))
    if plot:
        _plot(rows, out / "depth_scan.png")
    return rows


def _groups(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    table: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        table.setdefault(r["per_class"], {}).setdefault(int(r["depth"]), []).append(r)
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> str:
    """Markdown: per data size, val (and test) accuracy by depth, the depth chosen on validation marked."""
    lines = []
    for pc, by_depth in _groups(rows).items():
        stats = {d: _mean_std([float(r["val_acc"]) for r in rs]) for d, rs in sorted(by_depth.items())}
        best = max(stats, key=lambda d: stats[d][0])
        lines += [f"### per_class = {pc}", "", "| depth | val_acc (mean ± std) | test_acc | runs |", "|---|---|---|---|"]
        for d, (m, s) in stats.items():
            tests = [float(r["test_acc"]) for r in by_depth[d] if r.get("test_acc")]
            t = f"{statistics.fmean(tests):.3f}" if tests else ""
            mark = " **(chosen on val)**" if d == best else ""
            lines.append(f"| {d}{mark} | {m:.3f} ± {s:.3f} | {t} | {len(by_depth[d])} |")
        lines.append("")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for pc, by_depth in _groups(rows).items():
        ds = sorted(by_depth)
        ms = [_mean_std([float(r["val_acc"]) for r in by_depth[d]]) for d in ds]
        ax.errorbar(ds, [m for m, _ in ms], yerr=[s if not math.isnan(s) else 0 for _, s in ms], marker="o",
                    capsize=3, label=f"{pc} per class")
    ax.set_xlabel("transfer depth k (first k blocks frozen)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Transfer-depth scan")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
