"""The fast L2SP/DTNH kernels against their plain references, with tensors on both sides of the size at
which the CPU paths switch from batched ``_foreach`` calls to one call per tensor; and the per-step values
reaching the loggers."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_transfer import DTNH, L2SP
from lightning_transfer.functional.penalties import add_l2sp_grad_, sp_penalty_and_grad
from lightning_transfer.functional.projection import project_conflicting, project_conflicting_
from lightning_transfer.functional.sp_updates import l2sp_grad_into_, l2sp_pull_
from tests.helpers import TinyClassifier, quiet_trainer
from tests.test_dtnh import reference_projection

SHAPES = [(3, 4), (7,), (256, 160), (40000,), (2, 3, 5)]  # 40960 and 40000 elements: the large-tensor path


def _tensors(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * scale for s in SHAPES]


@pytest.mark.parametrize("anchored", [True, False])
@pytest.mark.parametrize("compute_value", [True, False])
def test_in_place_gradient_equals_the_reference(anchored, compute_value):
    w, w0, g = _tensors(0), _tensors(1) if anchored else None, _tensors(2)
    value, r = sp_penalty_and_grad(w, w0, 0.3)
    got = [t.clone() for t in g]
    got_value = add_l2sp_grad_(got, w, w0, 0.3, compute_value, workspace={})
    for a, b, ri in zip(got, g, r):
        torch.testing.assert_close(a, b + ri)
    if compute_value:
        torch.testing.assert_close(got_value, value)


@pytest.mark.parametrize("anchor_dtype", [torch.float32, torch.bfloat16, None])
def test_r_into_kept_buffers_equals_the_reference(anchor_dtype):
    w = _tensors(0)
    w0 = None if anchor_dtype is None else [t.to(anchor_dtype) for t in _tensors(1)]
    value, r = sp_penalty_and_grad(w, w0, 0.3)
    out = [torch.full_like(t, float("nan")) for t in w]
    got_value = l2sp_grad_into_(out, w, w0, 0.3, compute_value=True)
    torch.testing.assert_close(got_value, value)
    for a, b in zip(out, r):
        torch.testing.assert_close(a, b)
    assert l2sp_grad_into_(out, w, w0, 0.3, compute_value=False) is None


@pytest.mark.parametrize("anchor_dtype", [torch.float32, torch.bfloat16, None])
@pytest.mark.parametrize("compute_value", [True, False])
def test_decoupled_pull_equals_the_hand_update(anchor_dtype, compute_value):
    w = _tensors(0)
    w0 = None if anchor_dtype is None else [t.to(anchor_dtype) for t in _tensors(1)]
    t = 0.05
    expected = [wi - t * (wi - (a.float() if a is not None else 0.0)) for wi, a in zip(w, w0 or [None] * len(w))]
    before = 0.5 * sum(float((wi - (a.float() if a is not None else 0.0)).square().sum())
                       for wi, a in zip(w, w0 or [None] * len(w)))
    got = [wi.clone() for wi in w]
    value = l2sp_pull_(got, w0, t, compute_value, workspace={})
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert (value is None) != compute_value
    if compute_value:
        assert float(value) == pytest.approx(before, rel=1e-5)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("seed", range(3))
def test_projection_of_large_tensors_equals_the_reference(granularity, seed):
    g, r = _tensors(seed), _tensors(seed + 10, scale=0.5)
    r[2] = -2.0 * g[2] + 0.1 * r[2]  # a strong conflict on a large tensor
    d, stats = project_conflicting(g, r, granularity)
    for a, b in zip(d, reference_projection(g, r, granularity)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    d3 = [t.clone() for t in g]  # without the cosine: the same result, no cosine
    stats3 = project_conflicting_(d3, r, granularity, cosine=False)
    assert "cosine" in stats and "cosine" not in stats3
    for a, b in zip(d3, d):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(stats3["removed_norm"], stats["removed_norm"])


def test_nonfinite_large_gradient_is_left_untouched():
    g, r = _tensors(0), _tensors(1)
    g[3][5] = float("inf")
    d, _ = project_conflicting(g, r)
    assert all(torch.equal(a, b) for a, b in zip(d, g))


@pytest.mark.parametrize("callbacks", [lambda: [L2SP(alpha=0.5)], lambda: [L2SP(alpha=0.5), DTNH()],
                                       lambda: [L2SP(alpha=0.5, decoupled=True)]], ids=["l2sp", "dtnh", "decoupled"])
def test_penalty_reaches_the_logger_every_log_every_n_steps(callbacks, tmp_path):
    """The value is computed on the steps whose logs Lightning writes (not only on global_step % n == 0)."""
    logger = CSVLogger(tmp_path, name="", version="")
    quiet_trainer(max_steps=6, callbacks=callbacks(), logger=logger, log_every_n_steps=2).fit(TinyClassifier())
    with open(tmp_path / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("l2sp/penalty")]
    assert len(rows) == 3 and all(float(row["l2sp/penalty"]) > 0 for row in rows)
