"""Files the library reads are loaded without running code stored in them, unless the caller trusts them."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from lightning_transfer import greedy_soup
from lightning_transfer.functional import load_fisher, save_fisher
from lightning_transfer.safe_load import UnsafeFileError, load_numpy_pickle
from tests.helpers import TinyClassifier, quiet_trainer
from tests.test_soup import VAL, candidate


class WritesMarker:
    """An object whose unpickling runs code: it creates the file ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_that_would_run_code_is_refused_by_default(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": candidate(-2.5), "hyper_parameters": {"x": WritesMarker(str(marker))}}, path)
    with pytest.raises(UnsafeFileError, match=r"greedy_soup: .*evil\.ckpt.*weights_only=True.*trusted=True"):
        greedy_soup([path], nn.Linear(1, 2), VAL)
    assert not marker.exists(), "unpickling ran the file's code"
    # the opt-in reads it (and runs its code: that is what trusting a file means)
    soup, _ = greedy_soup([path], nn.Linear(1, 2), VAL, trusted=True)
    torch.testing.assert_close(soup["bias"], torch.tensor([0.0, -2.5]))
    assert marker.exists()


def test_a_lightning_checkpoint_loads_safely_by_default(tmp_path):
    model = TinyClassifier(norm=False)  # no BatchNorm: no statistics to re-estimate
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    soup, log = greedy_soup([path], TinyClassifier(norm=False, seed=1), model.val_dataloader())
    assert len(log) == 1
    for name, value in model.state_dict().items():
        assert torch.equal(soup[name], value), name


def test_trusted_must_be_a_bool():
    with pytest.raises(TypeError, match="trusted must be True or False"):
        greedy_soup([candidate(0.0)], nn.Linear(1, 2), VAL, trusted="yes")


def test_a_fisher_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "fisher.pt"
    torch.save({"fisher": {"w": torch.ones(2)}, "format": WritesMarker(str(marker))}, path)
    with pytest.raises(UnsafeFileError, match=r"load_fisher: .*save_fisher"):
        load_fisher(path)
    assert not marker.exists()
    save_fisher({"w": torch.ones(2)}, path)
    assert torch.equal(load_fisher(path)["w"], torch.ones(2))


def test_numpy_pickles_rebuild_arrays_and_nothing_else(tmp_path):
    """The Animal-MNIST package ships pickled arrays: a tampered file cannot run code."""
    arrays = [np.arange(12, dtype=np.uint8).reshape(3, 4), np.array([1, 2], dtype=np.int64)]
    loaded = load_numpy_pickle(io.BytesIO(pickle.dumps(arrays)), "arrays")
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded, arrays))
    marker = tmp_path / "ran"
    with pytest.raises(UnsafeFileError, match=r"images: .*refers to io\.open, which is not allowed.*reinst"):
        load_numpy_pickle(io.BytesIO(pickle.dumps([arrays[0], WritesMarker(str(marker))])), "images")
    assert not marker.exists()
