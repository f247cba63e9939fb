"""The per-step kernels of L2SP and DTNH on a model's parameters, against their memory-traffic floors.

The unit is one pass over the parameters (reading or writing every element once), timed as a quarter of
the kernel that reads w, w0, g and writes g (``g += α·w·w0``: the traffic of ``g += α·(w − w0)``). Each
implementation's floor is the number of passes its math needs: the coupled L2-SP gradient 4 (read w, w0,
g; write g), the decoupled pull 3 (read w, w0; write w), L2-SP's ``r`` as tensors of their own 3 (read w,
w0; write r), DTNH's projection 5 (read g, r for the dot products; read g, r and write g), SPD's two halves around the
optimizer step 8 (before: read g, w, w0 for ``⟨g, w − w0⟩`` and ``‖w − w0‖²``; after: read w', w0 for
``‖w' − w0‖²``, then read w', w0 and write w' for the decay), the 32 bytes per float32 parameter of #26.
Used by ``benchmarks/overhead.py``.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from lightning_transfer.callbacks.base import add_to_grads
from lightning_transfer.functional import sp_penalty_and_grad
from lightning_transfer.functional.penalties import add_l2sp_grad_
from lightning_transfer.functional.projection import project_conflicting_
from lightning_transfer.functional.sp_updates import l2sp_grad_into_, l2sp_pull_
from lightning_transfer.functional.spd import spd_after_norms, spd_before_step, spd_decay_, spd_factors

FLOOR_ROW = "floor (read w, w0, g; write g)"


def _timed(fns: dict, reps: int, cuda: bool) -> dict[str, float]:
    """Median seconds of each function, interleaved in shuffled order, after one untimed call each."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for i in range(reps):
        order = list(fns)
        random.Random(i).shuffle(order)
        for k in order:
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fns[k]()
            if cuda:
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_kernels(model: torch.nn.Module, name: str, reps: int, compiled: bool, lines: list[str]) -> float:
    """Append the kernel table of ``model``'s parameters to ``lines``; returns the time of one pass (s)."""
    params = [p for p in model.parameters()]
    device = params[0].device
    anchors = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p), alpha=1e-3)
            p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    rs = [torch.randn_like(p) * 1e-2 for p in params]
    weights = [p.detach().clone() for p in params]
    buffers = [torch.empty_like(p) for p in params]
    alpha, workspace = 0.01, {}

    def floor():
        torch._foreach_addcmul_(grads, params, anchors, value=alpha)

    def autograd_reference():
        penalty = sum(0.5 * alpha * (p - a).square().sum() for p, a in zip(params, anchors))
        penalty.backward()

    def spd_both_halves():  # the callback's work on one step, as a single process does it
        dots, before = spd_before_step(weights, grads, anchors)
        spd_decay_(weights, anchors, spd_factors(dots, before, spd_after_norms(weights, anchors), 1e-6))

    def separate_r_allocated():
        _, r = sp_penalty_and_grad(params, anchors, alpha)
        add_to_grads(params, r)

    # (label, function, floor in passes)
    rows = [
        (FLOOR_ROW, floor, 4),
        ("L2SP coupled, other steps (gradient only, in place)",
         lambda: add_l2sp_grad_(grads, params, anchors, alpha, compute_value=False, workspace=workspace), 4),
        ("L2SP coupled, logging step (value from the same difference)",
         lambda: add_l2sp_grad_(grads, params, anchors, alpha, compute_value=True, workspace=workspace), 4),
        ("L2SP decoupled, other steps (_foreach_lerp_ toward w0)",
         lambda: l2sp_pull_(weights, anchors, 1e-6, compute_value=False, workspace=workspace), 3),
        ("L2SP decoupled, logging step (with the value)",
         lambda: l2sp_pull_(weights, anchors, 1e-6, compute_value=True, workspace=workspace), 3),
        ("L2SP r for DTNH, into kept buffers", lambda: l2sp_grad_into_(buffers, params, anchors, alpha, False), 3),
        ("L2SP r for DTNH, freshly allocated (before) and added", separate_r_allocated, 3),
        ("DTNH projection of r against g, other steps (tensor mode, in place)",
         lambda: project_conflicting_(grads, rs, cosine=False), 5),
        ("DTNH projection, logging step (with the cosine)", lambda: project_conflicting_(grads, rs), 5),
        ("SPD, both halves around the step (dots and norms before; norms and decay after)", spd_both_halves, 8),
        ("SPD, the decay alone (_foreach_lerp_ with per-tensor weights)",
         lambda: spd_decay_(weights, anchors, torch.full((len(params),), 1e-6, device=device)), 3),
        ("autograd of the penalty in the loss (common implementation)", autograd_reference, 4),
    ]
    if compiled:
        rows.insert(3, ("L2SP(fused=True): torch.compile kernel",
                        lambda: add_l2sp_grad_(grads, params, anchors, alpha, compute_value=False, compiled=True), 4))
    medians = _timed({label: fn for label, fn, _ in rows}, reps, device.type == "cuda")
    one_pass = medians[FLOOR_ROW] / 4
    n = sum(p.numel() for p in params)
    lines += [f"### Kernels on {name} ({n / 1e6:.1f} M parameters, {len(params)} tensors, {device.type})", "",
              f"One pass over the parameters: {1000 * one_pass:.2f} ms.", "",
              "| kernel | median (ms) | floor (passes) | × its floor |", "|---|---|---|---|"]
    for label, _, passes in rows:
        lines.append(f"| {label} | {1000 * medians[label]:.2f} | {passes} | {medians[label] / (passes * one_pass):.2f} |")
    lines.append("")
    for p in params:
        p.grad = None
    return one_pass
