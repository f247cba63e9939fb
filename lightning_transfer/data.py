"""Data modules: the offline Animal-MNIST fine-tuning task, and a user's own image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from lightning_transfer.assets import load_animal_mnist

__all__ = [
    "AnimalMNISTDataModule",
    "ArrayDataModule",
    "ImageFolderDataModule",
    "SeededEpochSampler",
    "few_shot_indices",
    "few_shot_splits",
    "stratified_split",
]

ANIMAL_MNIST_CLASSES = 10


def stratified_split(labels: np.ndarray, sizes: list[int | None], seed: int) -> list[np.ndarray]:
    """Disjoint per-class splits: for each class, shuffle its indices with ``seed`` and cut ``sizes``.

    ``None`` as the last size takes the rest. Raises a clear error when a class has too few examples.
    """
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in sizes]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k, size in enumerate(sizes):
            stop = len(idx) if size is None else start + size
            if stop > len(idx):
                raise ValueError(
                    f"Class {c} has {len(idx)} examples, fewer than the {sum(s or 0 for s in sizes)} per class "
                    f"that splits of sizes {sizes} need. Ask for fewer examples per class."
                )
            out[k] += idx[start:stop].tolist()
            start = stop
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in out]


class _TensorImages(Dataset):
    """Grayscale uint8 images resized once to ``size``, served as 3-channel float tensors in [0, 1].

    An index is an int, or ``(int, flip)`` from :class:`SeededEpochSampler` (flip the image horizontally).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int):
        x = torch.from_numpy(images).unsqueeze(1).float()
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = x.clamp(0, 255).round().to(torch.uint8)
        self.labels = torch.from_numpy(labels)
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, bool]):
        i, flip = key if isinstance(key, tuple) else (key, False)
        x = self.images[i].float().div(255.0).expand(3, -1, -1)
        return (x.flip(-1) if flip else x), self.labels[i]


class SeededEpochSampler(Sampler):
    """Training order (and horizontal flips) as a function of ``(seed, epoch)`` only.

    A ``shuffle=True`` DataLoader draws its order from the global RNG, which validation loaders,
    head re-initializations and evaluation also draw from: two runs of one seed that evaluate
    differently would see different batches from the second epoch on. This sampler has its own
    generator per epoch, so every method run on one seed sees the same batches, and a run resumed at an
    epoch boundary continues the same stream. Lightning calls :meth:`set_epoch` before each training
    epoch; iterated again without it, the sampler moves on to the next epoch's stream.

    Args:
        size: Number of examples.
        seed: Seed of the stream.
        flips: Yield ``(index, flip)`` pairs with a random horizontal flip per example (for
            ``_TensorImages``) instead of plain indices.
    """

    def __init__(self, size: int, seed: int, flips: bool = False) -> None:
        self.size, self.seed, self.flips = size, seed, flips
        self.epoch, self._epoch_given = 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_given = epoch, True

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = torch.randperm(self.size, generator=generator).tolist()
        if not self._epoch_given:
            self.epoch += 1
        self._epoch_given = False
        if not self.flips:
            return iter(order)
        flips = (torch.rand(self.size, generator=generator) < 0.5).tolist()
        return iter([(i, bool(flips[i])) for i in order])


class _SplitDataModule(LightningDataModule):
    """Shared loaders: subclasses fill ``self._splits`` (train/val[/test]) in ``setup``."""

    _splits: dict[str, Dataset]

    @property
    def _flips(self) -> bool:
        """Random horizontal flips drawn by the training sampler (in-memory images only)."""
        return bool(self.hparams.augment) and isinstance(self._splits.get("train"), _TensorImages)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        if split not in self._splits:
            raise ValueError(f"{type(self).__name__} has no {split!r} split.")
        dataset = self._splits[split]
        # training: order (and flips of in-memory images) from (seed, epoch) only, never the global RNG
        sampler = SeededEpochSampler(len(dataset), self.hparams.seed, flips=self._flips) if shuffle else None
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class AnimalMNISTDataModule(_SplitDataModule):
    """Animal-MNIST (10 animal silhouette classes, MIT licence), offline, as a few-shot transfer task.

    Exact duplicate images are removed first. Then, per class and by ``seed``: ``test_per_class``
    images for test, ``val_per_class`` for validation, and ``per_class`` for training, all disjoint; the
    test split does not depend on ``per_class`` or ``val_per_class``, so results at different data
    sizes are measured on the same images. Images are resized to ``image_size`` and given 3 channels in
    ``[0, 1]``; :class:`~lightning_transfer.TransferClassifier` applies the backbone's normalization.

    Args:
        per_class: Training images per class.
        val_per_class: Validation images per class.
        test_per_class: Test images per class.
        image_size: Side of the square input.
        batch_size: Batch size of every loader.
        seed: Seed of the split and of the training stream (order and flips by epoch,
            :class:`SeededEpochSampler`), which the global RNG does not touch.
        augment: Random horizontal flips for training.
        num_workers: DataLoader workers.

    Example::

        >>> dm = AnimalMNISTDataModule(per_class=10, image_size=64)  # offline: the animal-mnist package
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), len(dm.train_dataloader().dataset), len(dm.val_dataloader().dataset)
        ((32, 3, 64, 64), 100, 500)
    """

    def __init__(
        self,
        per_class: int = 10,
        val_per_class: int = 50,
        test_per_class: int = 200,
        image_size: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_split_sizes(per_class, val_per_class, test_per_class)
        self.save_hyperparameters()
        self.num_classes = ANIMAL_MNIST_CLASSES
        self._splits: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._splits = few_shot_splits(*load_animal_mnist(), self.hparams)


def _check_split_sizes(per_class: int, val_per_class: int, test_per_class: int) -> None:
    for key, value in (("per_class", per_class), ("val_per_class", val_per_class), ("test_per_class", test_per_class)):
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}.")


def few_shot_splits(images: np.ndarray, labels: np.ndarray, hp) -> dict[str, Dataset]:
    """Per class and by ``hp.seed``: test, validation, then ``per_class`` training images, disjoint
    (:func:`few_shot_indices`), as datasets of ``hp.image_size`` images."""
    return {split: _TensorImages(images[idx], labels[idx], hp.image_size)
            for split, idx in few_shot_indices(labels, hp).items()}


def few_shot_indices(labels: np.ndarray, hp) -> dict[str, np.ndarray]:
    """Indices of the splits: per class and by ``hp.seed``, ``hp.test_per_class`` test, ``hp.val_per_class``
    validation, then ``hp.per_class`` training examples, disjoint; the test split does not depend on
    ``per_class`` or ``val_per_class``."""
    test, val, pool = stratified_split(labels, [hp.test_per_class, hp.val_per_class, None], hp.seed)
    smallest = int(np.bincount(labels[pool]).min())
    if hp.per_class > smallest:
        raise ValueError(
            f"per_class={hp.per_class} is larger than the data: the smallest class has {smallest} training "
            f"examples left after {hp.test_per_class} test and {hp.val_per_class} validation examples per class. "
            f"Use per_class <= {smallest}."
        )
    (train,) = stratified_split(labels[pool], [hp.per_class], hp.seed + 1)
    return {"train": pool[train], "val": val, "test": test}


class ArrayDataModule(_SplitDataModule):
    """In-memory grayscale images as a few-shot task, split like :class:`AnimalMNISTDataModule`.

    Args:
        images: ``uint8`` array ``(N, H, W)``.
        labels: Integer array ``(N,)`` with classes ``0..C-1``.
        per_class: Training images per class.
        val_per_class: Validation images per class.
        test_per_class: Test images per class.
        image_size: Side of the square input.
        batch_size: Batch size of every loader.
        seed: Seed of the split and of the training stream (order and flips by epoch,
            :class:`SeededEpochSampler`), which the global RNG does not touch.
        augment: Random horizontal flips for training.
        num_workers: DataLoader workers.

    Example::

        >>> import numpy as np
        >>> images = np.random.randint(0, 256, (120, 28, 28), dtype=np.uint8)
        >>> labels = np.arange(120) % 3
        >>> dm = ArrayDataModule(images, labels, per_class=10, val_per_class=10, test_per_class=10)
        >>> dm.setup()
        >>> dm.num_classes, len(dm.train_dataloader().dataset), len(dm.test_dataloader().dataset)
        (3, 30, 30)
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        per_class: int = 10,
        val_per_class: int = 50,
        test_per_class: int = 200,
        image_size: int = 28,
        batch_size: int = 32,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_split_sizes(per_class, val_per_class, test_per_class)
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"images must be a uint8 array (N, H, W) with one label each; got {images.dtype} "
                             f"{images.shape} and {len(labels)} labels.")
        classes = np.unique(labels)
        if not np.array_equal(classes, np.arange(len(classes))) or len(classes) < 2:
            raise ValueError(f"labels must be the classes 0..C-1 (C >= 2); got {classes.tolist()[:20]}.")
        self.save_hyperparameters(ignore=["images", "labels"])
        self.num_classes = len(classes)
        self._images, self._labels = images, np.asarray(labels, dtype=np.int64)
        self._splits: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._splits = few_shot_splits(self._images, self._labels, self.hparams)


class ImageFolderDataModule(_SplitDataModule):
    """A user's own images in ``root/<class>/<image>`` folders (torchvision ``ImageFolder``).

    Validation comes from ``val_root`` when given, else a stratified ``val_fraction`` of ``root`` split
    by ``seed``. Images are resized to ``image_size`` and served in ``[0, 1]``.

    Args:
        root: Training folder.
        val_root: Optional validation folder with the same class sub-folders.
        val_fraction: Share of ``root`` held out for validation when ``val_root`` is not given.
        image_size: Side of the square input.
        batch_size: Batch size.
        seed: Seed of the split and of the training order (:class:`SeededEpochSampler`).
        augment: Random horizontal flips and resized crops for training.
        num_workers: DataLoader workers.

    Example::

        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for cls in ("cat", "dog"):
        ...     (root / cls).mkdir()
        ...     for i in range(5):
        ...         Image.new("RGB", (40, 30)).save(root / cls / f"{i}.png")
        >>> dm = ImageFolderDataModule(str(root), image_size=32, val_fraction=0.2, num_workers=0)
        >>> dm.setup()
        >>> x, y = next(iter(dm.val_dataloader()))
        >>> tuple(x.shape), sorted(y.tolist())
        ((2, 3, 32, 32), [0, 1])
    """

    def __init__(
        self,
        root: str,
        val_root: str | None = None,
        val_fraction: float = 0.2,
        image_size: int = 224,
        batch_size: int = 32,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        self.save_hyperparameters()
        self._splits: dict[str, Dataset] = {}

    def _folder(self, root: str, train: bool):
        from torchvision import datasets, transforms

        if not Path(root).is_dir():
            raise FileNotFoundError(f"Image folder {root!r} does not exist.")
        size = self.hparams.image_size
        if train and self.hparams.augment:
            tf = [transforms.RandomResizedCrop(size, scale=(0.6, 1.0)), transforms.RandomHorizontalFlip()]
        else:
            tf = [transforms.Resize(size), transforms.CenterCrop(size)]
        tf = transforms.Compose([*tf, transforms.Lambda(lambda im: im.convert("RGB")), transforms.ToTensor()])
        try:
            return datasets.ImageFolder(root, transform=tf)
        except (FileNotFoundError, RuntimeError) as err:
            raise FileNotFoundError(
                f"No images found under {root!r}: expected {root}/<class name>/<image>.jpg|png ({err})."
            ) from None

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        hp = self.hparams
        train_set = self._folder(hp.root, train=True)
        self.num_classes = len(train_set.classes)
        if hp.val_root is not None:
            val_set = self._folder(hp.val_root, train=False)
            if val_set.classes != train_set.classes:
                raise ValueError(f"Class folders differ: {train_set.classes} vs {val_set.classes}.")
            self._splits = {"train": train_set, "val": val_set}
            return
        labels = np.asarray(train_set.targets)
        counts = np.bincount(labels)
        n_val = max(1, int(round(hp.val_fraction * counts.min())))
        val, rest = stratified_split(labels, [n_val, None], hp.seed)
        self._splits = {"train": Subset(train_set, rest.tolist()), "val": Subset(self._folder(hp.root, train=False), val.tolist())}

