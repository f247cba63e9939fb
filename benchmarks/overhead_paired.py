"""A callback's per-step cost measured step against step: its work switched on every other step of one fit.

Separate fits per variant (``overhead.py``'s round table) compare steps taken seconds apart, so on a shared
machine their ratios carry the machine's drift: a callback that does nothing per step reads anywhere from
0.9 to 1.1 there. Here each variant trains one fit in which its callbacks' per-step hooks (and the work of
DELTA's and BSS's forward hooks, through their strengths ``alpha`` and ``eta``) run on odd steps only; SPD's
optimizer post-hook works only after its ``on_before_optimizer_step`` and Co-Tuning's head hook only after its
``on_train_batch_start``, so both follow their switched hooks; each odd step's time is divided by the even
step before it, and the median of those pair ratios is the cost. Everything else (the model, the data,
the optimizer, the memory the callbacks hold) is the same on both steps of a pair. A fit without callbacks
(the null control) shows the resolution of the measurement: its pair ratios should straddle 1.

Used by ``benchmarks/overhead.py`` (``--paired-steps``).
"""

from __future__ import annotations

import random
import statistics
import time
from types import MethodType

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer import BSS, FeatureMapRegularization

STRENGTH = {FeatureMapRegularization: "alpha", BSS: "eta"}  # callbacks whose forward hooks do nothing at 0

PER_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                  "on_before_zero_grad", "on_train_batch_end")


class Switch(Callback):
    """Listed first: decides whether the measured callbacks work on this step (odd steps), and times each
    step from its start to the end of the last callback's ``on_train_batch_end`` (see :class:`StepEnd`)."""

    def __init__(self, callbacks: list[Callback], cuda: bool):
        self.on, self.cuda, self.times, self._t = False, cuda, [], 0.0
        self._strength = [(cb, STRENGTH[type(cb)], getattr(cb, STRENGTH[type(cb)]))
                          for cb in callbacks if type(cb) in STRENGTH]
        for cb in callbacks:
            for hook in PER_STEP_HOOKS:
                if getattr(type(cb), hook) is getattr(Callback, hook):  # not overridden: nothing to switch
                    continue
                setattr(cb, hook, MethodType(self._gated(getattr(type(cb), hook)), cb))

    def _gated(self, hook):
        def run(cb, *args, **kwargs):
            if self.on:
                return hook(cb, *args, **kwargs)
            return None

        return run

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.on = batch_idx % 2 == 1
        for cb, name, value in self._strength:  # forward-hook work, switched by the strength
            setattr(cb, name, value if self.on else 0.0)
        if self.cuda:
            torch.cuda.synchronize()
        self._t = time.perf_counter()


class StepEnd(Callback):
    """Listed last: closes the step's timing."""

    def __init__(self, switch: Switch):
        self.switch = switch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.switch.cuda:
            torch.cuda.synchronize()
        self.switch.times.append(time.perf_counter() - self.switch._t)


def paired_fit(model, make_callbacks, steps: int, size: int, device: str, precision: str) -> list[float]:
    """One fit of ``steps`` steps (an even number, after 4 warm-up steps); returns the on/off pair ratios."""
    gen = torch.Generator().manual_seed(0)
    n = 32 * (steps + 4)
    x, y = torch.rand(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    callbacks = make_callbacks()
    switch = Switch(callbacks, device == "cuda")
    trainer = Trainer(max_epochs=1, max_steps=steps + 4, accelerator="gpu" if device == "cuda" else "cpu",
                      devices=1, precision=precision, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[switch, *callbacks, StepEnd(switch)])
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=32))
    t = switch.times[4:]
    return [t[i + 1] / t[i] for i in range(0, len(t) - 1, 2)]


def bench_paired(name: str, make_model, variants: dict, args, rounds: int, floors: dict, lines: list[str],
                 summary: dict) -> None:
    """Append the paired table of ``name`` to ``lines``; store its ratios in ``summary[name]["paired"]``."""
    table = {"plain (null control)": lambda: [], **variants}
    ratios = {v: [] for v in table}
    for r in range(rounds):
        order = list(table)
        random.Random(1000 + r).shuffle(order)
        for v in order:
            ratios[v] += paired_fit(make_model(name, args.size), table[v], args.paired_steps, args.size,
                                    args.device, args.precision)
    q = {v: statistics.quantiles(x, n=4) for v, x in ratios.items()}
    dtnh_over_l2sp = (statistics.median(ratios["DTNH+L2SP"]) / statistics.median(ratios["L2SP"])
                      if "L2SP" in ratios and "DTNH+L2SP" in ratios else None)
    lines += [f"### Paired steps: {name} ({rounds} fits per variant × {args.paired_steps // 2} pairs)",
              "", "Each variant's per-step work on every other step of one fit; each on-step divided by the "
              "off-step before it.", "", "| variant | ratio to plain (median of pairs) | interquartile range | floor |",
              "|---|---|---|---|"]
    for v in table:
        floor = floors.get(v, 1.0 if v.startswith("plain") else None)
        lines.append(f"| {v} | {statistics.median(ratios[v]):.3f} | {q[v][0]:.3f}–{q[v][2]:.3f} | "
                     f"{'—' if floor is None else f'{floor:.3f}'} |")
    if dtnh_over_l2sp is not None:
        lines.append(f"| DTNH+L2SP / L2SP (ratio of the two medians) | {dtnh_over_l2sp:.3f} | | "
                     f"{floors['DTNH+L2SP'] / floors['L2SP']:.3f} |")
    lines.append("")
    summary.setdefault(name, {})["paired"] = {v: statistics.median(x) for v, x in ratios.items()} | (
        {"DTNH+L2SP / L2SP": dtnh_over_l2sp} if dtnh_over_l2sp is not None else {})
