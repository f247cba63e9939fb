"""The SP penalties' analytic gradients against autograd of an independently written penalty."""

import pytest
import torch

from lightning_transfer.functional import sp_penalty_and_grad


def reference_penalty(params, anchors, alpha, norm, fisher=None):
    """The penalty as other libraries write it: a scalar in the loss, differentiated by autograd."""
    total = 0.0
    for i, p in enumerate(params):
        d = p.float() - (anchors[i].float() if anchors is not None else 0)
        f = fisher[i].float() if fisher is not None else torch.ones_like(d)
        if norm == "l2":
            total = total + alpha / 2 * (f * d * d).sum()
        elif norm == "l1":
            total = total + alpha * (f * d.abs()).sum()
        else:
            rows = (f * d * d).reshape(d.shape[0], -1).sum(1) if d.ndim > 1 else f * d * d
            n_g = d[0].numel() if d.ndim > 1 else 1
            # sqrt is not differentiable at 0 (w = w0 at the first step): take the 0 subgradient there
            safe = torch.where(rows > 0, rows, torch.ones_like(rows)).sqrt() * (rows > 0)
            total = total + alpha * n_g**0.5 * safe.sum()
    return total


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (5, 8), (5,), (2, 4, 1)]
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
    anchors = [(p.detach().float() + 0.3 * torch.randn(p.shape, generator=g)).to(dtype) for p in params]
    fisher = [torch.rand(s, generator=g) * 2 for s in shapes]
    return params, anchors, fisher


@pytest.mark.parametrize("norm", ["l2", "l1", "group_lasso"])
@pytest.mark.parametrize("use_anchor", [True, False], ids=["sp", "toward0"])
@pytest.mark.parametrize("use_fisher", [False, True], ids=["plain", "fisher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_matches_autograd(norm, use_anchor, use_fisher, dtype):
    params, anchors, fisher = _tensors(dtype)
    anchors = anchors if use_anchor else None
    fisher = fisher if use_fisher else None
    alpha = 0.37
    ref = reference_penalty(params, anchors, alpha, norm, fisher)
    ref_grads = torch.autograd.grad(ref, params)
    value, grads = sp_penalty_and_grad(params, anchors, alpha, norm, fisher)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(value, ref.detach().float(), **tol)
    for g, r, p in zip(grads, ref_grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape
        torch.testing.assert_close(g.float(), r.float(), **tol)


def test_parameters_are_not_modified_and_no_autograd_graph():
    params, anchors, _ = _tensors(torch.float32)
    before = [p.detach().clone() for p in params]
    _, grads = sp_penalty_and_grad(params, anchors, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(not g.requires_grad for g in grads)


def test_zero_distance_has_zero_group_lasso_gradient():
    w = [torch.ones(3, 2)]
    value, (g,) = sp_penalty_and_grad(w, [torch.ones(3, 2)], 1.0, "group_lasso")
    assert float(value) == 0.0 and torch.count_nonzero(g) == 0


def test_mixed_dtypes_are_grouped():
    a, b = torch.randn(4, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)
    anchors = [torch.zeros(4), torch.zeros(4, dtype=torch.float64)]
    value, grads = sp_penalty_and_grad([a, b], anchors, 2.0)
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float64
    torch.testing.assert_close(grads[1], 2.0 * b.detach())
    torch.testing.assert_close(value, (a.detach().square().sum() + b.detach().float().square().sum()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        sp_penalty_and_grad([torch.ones(1)], None, -1.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        sp_penalty_and_grad([torch.ones(1)], None, 1.0, "l3")


@pytest.mark.parametrize("compute_value", [True, False])
@pytest.mark.parametrize("use_anchor", [True, False])
def test_fused_l2sp_in_place_matches_autograd(compute_value, use_anchor):
    from lightning_transfer.functional.penalties import add_l2sp_grad_

    params, anchors, _ = _tensors(torch.float32, seed=4)
    anchors = anchors if use_anchor else None
    ref = reference_penalty(params, anchors, 0.2, "l2")
    ref_grads = torch.autograd.grad(ref, params)
    grads = [torch.ones_like(p) for p in params]
    value = add_l2sp_grad_(grads, params, anchors, 0.2, compute_value)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, 1.0 + rg)
    if compute_value:
        torch.testing.assert_close(value, ref.detach())
    else:
        assert value is None


def test_compiled_l2sp_kernel_equals_eager():
    from lightning_transfer.functional.penalties import add_l2sp_grad_

    params, anchors, _ = _tensors(torch.float32, seed=7)
    eager = [torch.ones_like(p) for p in params]
    fused = [torch.ones_like(p) for p in params]
    v_eager = add_l2sp_grad_(eager, params, anchors, 0.3, True)
    v_fused = add_l2sp_grad_(fused, params, anchors, 0.3, True, compiled=True)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v_fused, v_eager, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", ["eager", "toward0", "compiled"])
def test_l2sp_kernel_multiplies_the_scale_the_gradients_carry(path):
    """A fused optimizer under a GradScaler steps on S·g and divides by S: the kernel must add S·α·(w − w0),
    and still return the unscaled penalty."""
    from lightning_transfer.functional.penalties import add_l2sp_grad_

    params, anchors, _ = _tensors(torch.float32, seed=8)
    anchors = None if path == "toward0" else anchors
    ref = reference_penalty(params, anchors, 0.3, "l2")
    ref_grads = torch.autograd.grad(ref, params)
    scale = torch.tensor(2.0**13)
    grads = [torch.full_like(p, float(scale)) for p in params]  # S·g with g = 1
    value = add_l2sp_grad_(grads, params, anchors, 0.3, True, compiled=path == "compiled", grad_scale=scale)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g / scale, 1.0 + rg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-5, atol=1e-7)
