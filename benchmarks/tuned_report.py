"""Selection and report of ``tuned.py``: per method, the setting with the best mean validation accuracy;
test accuracy of that setting only, paired by seed to plain fine-tuning and to the linear probe."""

from __future__ import annotations

import statistics
from pathlib import Path

import accuracy

RIFLE_MIN_STEPS = 100  # RIFLE's default min_steps_after_last: fewer steps after the last re-init is out of regime


def _by_setting(rows: list[dict]) -> dict[str, dict[str, dict[int, dict]]]:
    """method -> setting (in grid order) -> seed -> row."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for r in rows:
        out.setdefault(r["method"], {}).setdefault(r["setting"], {})[int(r["seed"])] = r
    return out


def choose(rows: list[dict]) -> dict[str, tuple[str, dict[int, dict], dict[str, float]]]:
    """method -> (chosen setting, its rows by seed, mean validation accuracy of every complete setting).

    Only settings run on every seed of the task compete; ties go to the earlier setting of the grid."""
    seeds = {int(r["seed"]) for r in rows}
    chosen = {}
    for method, by in _by_setting(rows).items():
        means = {s: statistics.fmean(float(r["val_acc"]) for r in runs.values())
                 for s, runs in by.items() if set(runs) == seeds}
        if means:
            best = max(means, key=lambda s: (means[s], -list(means).index(s)))
            chosen[method] = (best, by[best], means)
    return chosen


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def _diffs(a: dict[int, dict], b: dict[int, dict]) -> list[float]:
    """Test accuracy of ``a`` minus ``b``, paired by seed."""
    return [float(a[s]["test_acc"]) - float(b[s]["test_acc"]) for s in sorted(a) if s in b]


def _paired(a: dict[int, dict], b: dict[int, dict] | None) -> str:
    if not b or a is b:
        return "—"
    return accuracy.t_interval(_diffs(a, b))


def _note(method: str, runs: dict[int, dict]) -> str:
    steps = {r.get("steps_after_last_reinit", "") for r in runs.values()} - {""}
    if method == "RIFLE" and steps and min(int(float(s)) for s in steps) < RIFLE_MIN_STEPS:
        return f"**out of regime**: {min(int(float(s)) for s in steps)} steps after the re-init (< {RIFLE_MIN_STEPS})"
    return ""


def task_section(rows: list[dict], title: str, order: list[str] | None = None) -> list[str]:
    chosen = choose(rows)
    if order:
        chosen = {m: chosen[m] for m in sorted(chosen, key=lambda m: order.index(m) if m in order else len(order))}
    seeds = sorted({int(r["seed"]) for r in rows})
    plain = chosen.get("plain", (None, None, None))[1]
    probe = chosen.get("linear probe", (None, None, None))[1]
    pooled = chosen.get("linear probe (mean-pooled)", (None, None, None))[1]  # text tasks: the encoder's own pooling
    lines = [f"### {title}", "", f"Seeds {seeds}; test accuracy of the setting chosen on validation; paired differences "
             "with a 95% t-interval.", "",
             "| method | chosen setting (of those tried) | val acc | test acc | − plain | − linear probe "
             f"{'| − mean-pooled probe ' if pooled else ''}| probe on final features | note |",
             f"|---|---|---|---|---|---|{'---|' if pooled else ''}---|---|"]
    for method, (setting, runs, means) in chosen.items():
        tests = [float(r["test_acc"]) for r in runs.values()]
        final_probe = [float(r["probe_test_acc"]) for r in runs.values()]
        lines.append(f"| {method} | {setting} ({len(means)}) | {means[setting]:.3f} | {_mean_std(tests)} | "
                     f"{_paired(runs, plain)} | {_paired(runs, probe)} | {f'{_paired(runs, pooled)} | ' if pooled else ''}"
                     f"{'—' if method.startswith('linear probe') else _mean_std(final_probe)} | {_note(method, runs)} |")
    for method in chosen:
        base = method.removesuffix("+DTNH")
        if method != base and base in chosen:  # DTNH's claim is against the regularizer it wraps
            lines.append(f"\n{method} − {base} (each at its chosen setting), paired: "
                         f"{_paired(chosen[method][1], chosen[base][1])}")
    lines += ["", "<details><summary>Every setting's mean validation accuracy (the selection)</summary>", "",
              "| method | setting | mean val acc |", "|---|---|---|"]
    for method, (setting, _, means) in chosen.items():
        lines += [f"| {method} | {s}{' (chosen)' if s == setting else ''} | {v:.3f} |" for s, v in means.items()]
    return lines + ["", "</details>", ""]


def _points(runs: dict[int, dict], base: dict[int, dict]) -> str:
    """Paired difference in points, bold where its 95% interval excludes zero."""
    diffs = _diffs(runs, base)
    if len(diffs) < 2:
        return "—"
    d, low, high = accuracy.t_bounds(diffs)
    cell = f"{100 * d:+.1f}".replace("-", "−")
    return f"**{cell}**" if low > 0 or high < 0 else cell


def summary(rows: list[dict], tasks: dict, order: list[str]) -> list[str]:
    """One table over the tasks: plain fine-tuning's test accuracy, then every method's paired difference to it."""
    chosen = {key: choose([r for r in rows if r["task"] == key]) for key in tasks}
    keys = [k for k in tasks if "plain" in chosen[k]]
    if not keys:
        return []
    methods = [m for m in order if m != "plain" and any(m in chosen[k] for k in keys)]
    plain_acc = [statistics.fmean(float(r["test_acc"]) for r in chosen[k]["plain"][1].values()) for k in keys]
    lines = ["## Summary", "", "Test accuracy of plain fine-tuning, then each method's paired difference to it in points "
             "(each at its setting chosen on validation; **bold**: the 95% interval excludes zero; —: not run; "
             "†: RIFLE out of regime). Intervals and settings: the task sections below.", "",
             f"| method | {' | '.join(keys)} |", f"|---|{'---|' * len(keys)}",
             f"| plain (test acc) | {' | '.join(f'{a:.3f}' for a in plain_acc)} |"]
    for method in methods:
        cells = []
        for k in keys:
            if method not in chosen[k]:
                cells.append("—")
                continue
            runs = chosen[k][method][1]
            cells.append(_points(runs, chosen[k]["plain"][1]) + ("†" if _note(method, runs) else ""))
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return lines + [""]


def write_report(rows: list[dict], out: Path, threads: int, tasks: dict, order: list[str] | None = None) -> None:
    rows = [r for r in rows if r["threads"] == str(threads)]
    env = sorted({(r["torch"], r["deterministic"], r["commit"]) for r in rows})
    lines = ["# Does each method help, tuned fairly", "",
             "Budget: four settings per fine-tuning method (its knob × two learning rates, or four learning rates), "
             "chosen by mean validation accuracy over the seeds; the linear probe's L2 strength is chosen on "
             "validation from six values. 'probe on final features': a linear probe fitted on the run's own final "
             f"features. CPU, {threads} thread(s) per run; torch, deterministic algorithms and commit per row "
             f"in runs.csv ({', '.join(f'torch {t}, deterministic {d}, commit {c}' for t, d, c in env[:3])}"
             f"{', ...' if len(env) > 3 else ''}).", ""]
    lines += summary(rows, tasks, order or [])
    for key, task in tasks.items():
        sub = [r for r in rows if r["task"] == key]
        if sub:
            lines.append(f"Reproduce: `python benchmarks/tuned.py --task {key} --seeds {len({r['seed'] for r in sub})}"
                         f"{f' --threads {threads}' if threads != 1 else ''}`\n")
            lines += task_section(sub, f"{key}: {task.title}", order)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
