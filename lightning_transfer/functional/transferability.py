"""Transferability estimators: score features (or source predictions) for a target task before training.

Features are ``(N, D)`` float tensors, labels ``(N,)`` integer class ids, source probabilities ``(N, Z)``
softmax outputs of the source head. Every function returns a Python float (higher: more transferable)
and checks its inputs first: N mismatch, fewer than 2 classes, non-finite values, probabilities that
are not distributions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["hscore", "leep", "ledoit_wolf_shrinkage", "logme", "logme_evidence", "nce"]


def _check_labels(owner: str, labels: Tensor, n: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{owner}: labels must be a 1-D integer tensor (N,), got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}.")
    if labels.shape[0] != n:
        raise ValueError(f"{owner}: features/probabilities have {n} rows but labels have {labels.shape[0]}; "
                         "pass one label per example.")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{owner}: labels must be class ids >= 0, got {int(labels.min())}.")
    if labels.unique().numel() < 2:
        raise ValueError(f"{owner}: needs at least 2 classes among the labels, got {labels.unique().tolist()}; "
                         "score a sample that holds several classes.")
    return labels.long()


def _check_matrix(owner: str, name: str, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a 2-D float tensor (N, D), got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}; pool or "
                        "flatten block outputs first.")
    labels = _check_labels(owner, labels, x.shape[0])
    if not torch.isfinite(x).all():
        raise ValueError(f"{owner}: {name} hold {int((~torch.isfinite(x)).sum())} non-finite values (NaN/inf); "
                         "check the model's outputs (e.g. a half-precision overflow) before scoring.")
    return x.detach().double().cpu(), labels.cpu()


def logme_evidence(features: Tensor, target: Tensor, max_iter: int = 1000, tol: float = 1e-7) -> tuple[float, float, float]:
    """Maximized log evidence of Bayesian linear regression ``target ≈ features @ w``, per example.

    The model of LogME: ``w ~ N(0, α⁻¹ I)``, ``target | w ~ N(features @ w, β⁻¹ I)``. MacKay's fixed-point
    iteration (``α = γ / mᵀm``, ``β = (N - γ) / ‖t - F m‖²``, ``γ = Σ βσᵢ² / (α + βσᵢ²)``) runs on the
    SVD of the features, computed once: every quantity is a sum over singular values.

    Args:
        features: ``(N, D)`` float.
        target: ``(N,)`` float regression target (a one-hot column in :func:`logme`).
        max_iter: Iteration cap.
        tol: Stop when ``α/β`` changes by less than this, relatively, or the evidence per example by
            less than ``tol / 1000`` (with ``N <= D`` the target can be interpolated and β grows without
            bound while the evidence converges).

    Returns:
        ``(evidence / N, α, β)`` at the fixed point.

    Example::

        >>> f = torch.randn(20, 3, dtype=torch.float64)
        >>> ev, alpha, beta = logme_evidence(f, f[:, 0] + 0.1 * torch.randn(20, dtype=torch.float64))
        >>> beta > alpha
        True
    """
    f, t = features.detach().double().cpu(), target.detach().double().cpu().reshape(-1)
    n, d = f.shape
    u, sigma, _ = torch.linalg.svd(f, full_matrices=False)  # u (N, k), sigma (k,)
    s2 = sigma**2
    z = u.T @ t  # coordinates of the target in the column space of F
    z2 = z**2
    outside = max(float(t @ t - z2.sum()), 0.0)  # ‖t‖² not reachable by F w
    tiny = torch.finfo(torch.float64).tiny

    def state(alpha: float, beta: float) -> tuple[float, float, float, float]:
        """(evidence / N, γ, mᵀm, ‖t - F m‖²) at (α, β)."""
        denom = alpha + beta * s2
        gamma = float((beta * s2 / denom).sum())
        mm = float((beta**2 * s2 * z2 / denom**2).sum())  # mᵀm, m = β V diag(σ / (α + βσ²)) z
        res = outside + float(((alpha / denom) ** 2 * z2).sum())  # ‖t - F m‖²
        logdet = float(torch.log(denom).sum()) + (d - s2.numel()) * math.log(alpha)  # log|αI + βFᵀF|
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * logdet - beta / 2 * res
                    - alpha / 2 * mm - n / 2 * math.log(2 * math.pi))
        return evidence / n, gamma, mm, res

    alpha, beta = 1.0, 1.0
    evidence, gamma, mm, res = state(alpha, beta)
    for _ in range(max_iter):
        rest = (n - s2.numel()) + float((alpha / (alpha + beta * s2)).sum())  # N - γ, no cancellation at γ ≈ N
        new_alpha, new_beta = max(gamma / max(mm, tiny), tiny), max(rest / max(res, tiny), tiny)
        step = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta)
        alpha, beta = new_alpha, new_beta
        new_evidence, gamma, mm, res = state(alpha, beta)
        # converged: α/β settled, or (N <= D, the target interpolated: β grows without end) the evidence did
        done = step <= tol or abs(new_evidence - evidence) <= tol * 1e-3
        evidence = new_evidence
        if done:
            break
    return evidence, alpha, beta


def logme(features: Tensor, labels: Tensor) -> float:
    """LogME (You et al., ICML 2021): the mean over classes of the maximized log evidence, per example.

    Each class ``c`` is a regression target, the one-hot column ``labels == c``; its evidence is
    :func:`logme_evidence`. Higher means features from which the labels are more linearly predictable
    at a lower model complexity. Invariant to renaming the classes.

    Example::

        >>> f = torch.randn(40, 4)
        >>> y = (f[:, 0] > 0).long()
        >>> logme(f, y) > logme(f, y[torch.randperm(40)])
        True
    """
    f, y = _check_matrix("logme", "features", features, labels)
    classes = y.unique()
    return sum(logme_evidence(f, (y == c).double())[0] for c in classes) / len(classes)


def _check_probs(owner: str, probs: Tensor, labels: Tensor, atol: float = 1e-3) -> tuple[Tensor, Tensor]:
    p, y = _check_matrix(owner, "source_probs", probs, labels)
    if (p < 0).any() or ((p.sum(1) - 1).abs() > atol).any():
        worst = float((p.sum(1) - 1).abs().max())
        raise ValueError(f"{owner}: source_probs must be probabilities (>= 0, rows summing to 1); a row sum is off "
                         f"by {worst:.3g}. Pass softmax(logits), not the logits.")
    return p, y


def leep(source_probs: Tensor, labels: Tensor) -> float:
    """LEEP (Nguyen et al., ICML 2020): log expected empirical prediction of the source head.

    With ``θ = source_probs`` (source head's softmax, ``(N, Z)``): the empirical joint
    ``P(y, z) = 1/N Σᵢ θᵢ_z [yᵢ = y]``, the conditional ``P(y | z) = P(y, z) / P(z)``, and
    ``LEEP = 1/N Σᵢ log Σ_z P(yᵢ | z) θᵢ_z``. Always ``<= 0``; 0 when the source labels map onto the
    target labels deterministically.

    Example::

        >>> leep(torch.eye(2)[[0, 1, 1]], torch.tensor([1, 0, 0]))
        0.0
    """
    p, y = _check_probs("leep", source_probs, labels)
    joint = torch.zeros(int(y.max()) + 1, p.shape[1], dtype=torch.float64).index_add_(0, y, p) / p.shape[0]
    conditional = joint / joint.sum(0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    expected = (p * conditional[y]).sum(1)  # Σ_z P(yᵢ|z) θᵢ_z
    return float(torch.log(expected).mean())


def nce(source_labels: Tensor, labels: Tensor) -> float:
    """NCE (Tran et al., ICCV 2019): negative conditional entropy ``-H(Y | Z)`` of target labels given
    source labels (e.g. the source head's argmax), from their empirical joint. ``<= 0``; 0 when each
    source label determines the target label.

    Example::

        >>> nce(torch.tensor([3, 3, 5]), torch.tensor([0, 0, 1]))
        0.0
    """
    if not isinstance(source_labels, Tensor) or source_labels.ndim != 1 or source_labels.is_floating_point():
        raise TypeError("nce: source_labels must be a 1-D integer tensor (N,), e.g. source_logits.argmax(1).")
    y = _check_labels("nce", labels, source_labels.shape[0]).cpu()
    _, z = source_labels.cpu().unique(return_inverse=True)
    joint = torch.zeros(int(y.max()) + 1, int(z.max()) + 1, dtype=torch.float64)
    joint.index_put_((y, z), torch.ones(len(y), dtype=torch.float64), accumulate=True)
    joint /= len(y)
    conditional = joint / joint.sum(0, keepdim=True)
    seen = joint > 0
    return float((joint[seen] * conditional[seen].log()).sum())


def ledoit_wolf_shrinkage(features: Tensor) -> float:
    """Ledoit-Wolf shrinkage intensity of the covariance of ``features`` ``(N, D)`` (scikit-learn's estimate).

    The covariance estimate ``(1 - a) S + a (tr S / D) I`` with this ``a`` minimizes the expected
    Frobenius error (Ledoit & Wolf, 2004).
    """
    x = features.detach().double().cpu()
    x = x - x.mean(0)
    n, d = x.shape
    x2 = x**2
    trace_terms = x2.sum(0) / n
    mu = float(trace_terms.sum()) / d
    delta_ = float(((x.T @ x) ** 2).sum()) / n**2
    beta_ = float((x2.T @ x2).sum())
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * float(trace_terms.sum()) + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


def hscore(features: Tensor, labels: Tensor, shrinkage: float | str | None = "auto") -> float:
    """H-score (Bao et al., ICIP 2019): ``tr(cov(f)⁻¹ cov(E[f | y]))``, the discriminability of the
    features for the labels under a linear-Gaussian view; between 0 and ``C - 1`` without shrinkage.

    With ``N <= D`` (few-shot) the plain covariance is singular and the score saturates at ``C - 1``
    for any features; ``shrinkage="auto"`` (default) uses the Ledoit-Wolf shrunk covariance instead,
    the regularized H-score of Ibrahim et al. (ICLR 2023). ``shrinkage=None`` (or 0) gives the original
    score with a pseudo-inverse; a float in ``[0, 1]`` a fixed shrinkage.

    Example::

        >>> f = torch.randn(60, 3)
        >>> y = (f[:, 0] > 0).long()
        >>> hscore(f, y) > hscore(f, y[torch.randperm(60)])
        True
    """
    f, y = _check_matrix("hscore", "features", features, labels)
    f = f - f.mean(0)
    n, d = f.shape
    if shrinkage == "auto":
        a = ledoit_wolf_shrinkage(f)
    elif shrinkage is None:
        a = 0.0
    elif isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1:
        a = float(shrinkage)
    else:
        raise ValueError(f"hscore: shrinkage must be 'auto', None or a number in [0, 1], got {shrinkage!r}.")
    classes, index = y.unique(return_inverse=True)
    means = torch.zeros(len(classes), d, dtype=f.dtype).index_add_(0, index, f)
    means /= torch.bincount(index, minlength=len(classes)).unsqueeze(1).to(f.dtype)
    g = means[index]  # E[f | y] for each example; cov(E[f|y]) = gᵀg / N
    if a == 0:
        return float(torch.trace(torch.linalg.pinv(f.T @ f / n, hermitian=True) @ (g.T @ g / n)))
    ridge, scale = a * float((f**2).sum()) / (n * d), (1 - a) / n  # shrunk covariance: ridge·I + scale·fᵀf
    if d <= n:
        return float(torch.trace(torch.linalg.solve(ridge * torch.eye(d, dtype=f.dtype) + scale * f.T @ f, g.T @ g))) / n
    # d > N (few-shot, wide features): Woodbury, in the N×N sample space
    inner = torch.linalg.solve(ridge * torch.eye(n, dtype=f.dtype) + scale * f @ f.T, f @ g.T)
    gg, gf = g @ g.T, g @ f.T
    return float(torch.trace(gg) - scale * torch.trace(gf @ inner)) / (ridge * n)
