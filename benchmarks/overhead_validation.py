"""Validation-time callbacks against a validation epoch: RepresentationSimilarity (CKA and neighbourhood overlap
on its probe), WiSEFT and LiNeS evaluating their 11 interpolations at every validation. Used by
``benchmarks/overhead.py`` (``--val-rounds``, ``--validation-only``), which passes its model builder and its
``trial`` (one timed fit).
"""

from __future__ import annotations

import random
import statistics

import torch

from lightning_transfer import LiNeS, RepresentationSimilarity, WiSEFT


def _ratio_row(label, ratios, extra=""):
    return (f"| {label} | {statistics.median(ratios):.3f} | {min(ratios):.3f}–{max(ratios):.3f} |" + extra)


def bench_validation(name, args, lines, make_model, trial):
    """RepresentationSimilarity and WiSEFT(every_validation=True) per validation epoch (4 batches of 32, its
    probe 128 examples; WiSEFT's 11 interpolations, with BatchNorm re-estimated on the 2 training batches)."""
    table = {"plain": lambda: [], "RepresentationSimilarity (probe 128)": lambda: [RepresentationSimilarity()],
             "WiSEFT(every_validation=True), 11 alphas": lambda: [WiSEFT(every_validation=True)],
             "LiNeS(every_validation=True), 11 alphas": lambda: [LiNeS(every_validation=True)]}
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in make_model(name, args.size).modules())
    floors = {"plain": 1.0, "RepresentationSimilarity (probe 128)": 2.0,
              "WiSEFT(every_validation=True), 11 alphas": 1 + 11 * (1.5 if has_bn else 1.0),
              "LiNeS(every_validation=True), 11 alphas": 1 + 11 * (1.5 if has_bn else 1.0)}
    ratios, memory = {v: [] for v in table}, {}
    for r in range(args.val_rounds):
        order = list(table)
        random.Random(100 + r).shuffle(order)
        medians = {}
        for v in order:
            _, vals, peak, held = trial(name, table[v], args, steps=2, val_batches=4, epochs=3)
            medians[v] = statistics.median(vals[1:])  # the first validation warms up
            memory[v] = (peak, held)
        for v in table:
            ratios[v].append(medians[v] / medians["plain"])
    lines += [f"### Validation: {name} (per validation epoch of 128 examples)", "",
              "Floor: CKA runs the model on its probe (128 examples; the pre-trained side is kept as Gram matrices "
              "from fit start); WiSE-FT evaluates "
              "each interpolation (11 validation epochs) and re-estimates BatchNorm statistics on 64 training "
              "examples per interpolation where the model has BatchNorm.", "",
              "| callback | ratio to a validation epoch | spread (min–max) | floor | held by callback (MiB) | "
              "peak memory above plain (MiB) |", "|---|---|---|---|---|---|"]
    for v in table:
        lines.append(_ratio_row(v, ratios[v], f" {floors[v]:.1f} | {memory[v][1] / 2**20:.1f} | "
                                f"{(memory[v][0] - memory['plain'][0]) / 2**20:.0f} |"))
    lines.append("")
