"""Representation similarity: linear CKA and neighbourhood overlap."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "block_features",
    "centred_gram",
    "linear_cka",
    "linear_cka_of_grams",
    "nearest_neighbours",
    "neighbourhood_overlap",
    "overlap_of_neighbours",
]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double()


def block_features(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """A block's output as ``(n, d)`` features for CKA and the overlap.

    * ``(n,)`` and ``(n, d)``: as they are.
    * ``(n, tokens, hidden)`` (transformers: Hugging Face, timm and torchvision ViT blocks): the mean over
      tokens, counting only the tokens where ``mask`` (``(n, tokens)``, e.g. the batch's
      ``attention_mask``) is non-zero, on either side (left padding: decoders). Pooling, not flattening:
      padding tokens carry nothing (whatever a padded position holds, NaN included, never enters), and
      batches padded to different lengths give the same feature size.
    * ``(n, C, H, W)`` and higher (convolutional maps, channels first or last): flattened to
      ``(n, C·H·W)``, as Kornblith et al. do; CKA does not depend on the order of features.

    A ``(n, channels, length)`` Conv1d output is read as tokens too (averaged over dim 1): pass blocks
    whose outputs are 2-D or 4-D for such models.

    Example::

        >>> h = torch.randn(4, 7, 16)
        >>> block_features(h).shape
        torch.Size([4, 16])
    """
    if x.ndim == 1:
        return x.reshape(-1, 1)
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
            return x.mean(1)
        real = (mask != 0).unsqueeze(-1)
        # masked_fill, not a product with the mask: a padded position may hold inf or NaN (0·NaN is NaN)
        return x.masked_fill(~real, 0).sum(1) / real.sum(1).clamp_min(1).to(x.dtype)
    return x.reshape(x.shape[0], -1)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear centred kernel alignment (Kornblith et al., 2019) between two sets of activations.

    ``x`` (n, ...) and ``y`` (n, ...) hold the same n examples (any trailing shape; flattened). Uses the
    n×n Gram form ``⟨HKH, HLH⟩ / (‖HKH‖·‖HLH‖)`` with ``K = XXᵀ``, ``L = YYᵀ``, so wide feature maps
    cost O(n²·p). Invariant to orthogonal transforms and isotropic scaling; ``CKA(X, X) = 1``.

    Example::

        >>> x = torch.randn(50, 8)
        >>> round(float(linear_cka(x, 3 * x)), 6)
        1.0
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples: {x.shape[0]} vs {y.shape[0]} rows.")
    return linear_cka_of_grams(centred_gram(x), centred_gram(y))


def centred_gram(x: Tensor) -> Tensor:
    """The ``(n, n)`` float64 Gram matrix ``HKH`` of ``x`` (n, ...) with centred features: all that linear CKA
    needs of one side, so a fixed reference is kept as this instead of its features or its model.

    Example::

        >>> g = centred_gram(torch.randn(6, 3))
        >>> g.shape, bool(torch.allclose(g.sum(0), torch.zeros(6, dtype=g.dtype), atol=1e-9))
        (torch.Size([6, 6]), True)
    """
    if x.shape[0] < 2:
        raise ValueError("CKA needs at least 2 examples.")
    k = _flat(x)
    k = k - k.mean(0, keepdim=True)  # centring the features centres the Gram
    return k @ k.T


def linear_cka_of_grams(gk: Tensor, gl: Tensor) -> Tensor:
    """Linear CKA from two centred Gram matrices (:func:`centred_gram`) of the same n examples."""
    if gk.shape != gl.shape:
        raise ValueError(f"CKA needs the same examples: Gram matrices {tuple(gk.shape)} vs {tuple(gl.shape)}.")
    hsic = (gk * gl).sum()
    denom = gk.norm() * gl.norm()
    return (hsic / denom).float() if denom > 0 else torch.zeros((), dtype=torch.float32)


def neighbourhood_overlap(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """Mean fraction of each example's ``k`` nearest neighbours shared by the two representations.

    The measure of Doimo et al. (2020) used by the layer-defrosting paper: 1 when both spaces have the
    same neighbourhoods, about ``k/(n-1)`` for unrelated ones.
    """
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"neighbourhood_overlap needs the same examples: {x.shape[0]} vs {y.shape[0]} rows.")
    return overlap_of_neighbours(nearest_neighbours(x, k), nearest_neighbours(y, k))


def nearest_neighbours(x: Tensor, k: int) -> Tensor:
    """The ``(n, k)`` indices of each example's ``k`` nearest other examples in ``x`` (Euclidean, float64)."""
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}], got {k}.")
    d = torch.cdist(_flat(x), _flat(x))
    d.fill_diagonal_(float("inf"))
    return d.topk(k, largest=False).indices


def overlap_of_neighbours(a: Tensor, b: Tensor) -> Tensor:
    """The mean fraction of shared neighbours between two ``(n, k)`` index sets (:func:`nearest_neighbours`)."""
    if a.shape != b.shape:
        raise ValueError(f"neighbourhood_overlap needs the same examples and k: {tuple(a.shape)} vs {tuple(b.shape)}.")
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1)
    return (shared.float() / a.shape[1]).mean()
