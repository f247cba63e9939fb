"""Loading files without running code stored in them: torch files with ``weights_only``, numpy pickles.

A pickle can call any function while it is read (an object's ``__reduce__``), so a checkpoint or data
file from elsewhere could run code on ``torch.load(weights_only=False)`` or ``pickle.load``. Every file
the library reads goes through here: tensors, plain containers and numbers only, unless the caller opts
in for a file it trusts.
"""

from __future__ import annotations

import pickle
from os import PathLike
from typing import IO, Any

import torch

__all__ = ["UnsafeFileError", "load_numpy_pickle", "load_torch_file"]


class UnsafeFileError(ValueError):
    """A file holds objects that loading it safely refuses (reading them could run code)."""


def _refused_line(err: BaseException) -> str:
    """The line of torch's weights-only error that names what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "WeightsUnpickler error" in line]
    return (named or lines or [type(err).__name__])[0]


def load_torch_file(
    path: str | PathLike, owner: str, trusted: bool = False, way_out: str | None = None
) -> Any:
    """``torch.load(path)`` onto the CPU, with ``weights_only=True`` unless ``trusted``.

    Args:
        path: A file written by ``torch.save`` (a Lightning ``.ckpt`` included).
        owner: The function or callback loading it, for the error message.
        trusted: Unpickle everything (``weights_only=False``): only for files you made or trust.
        way_out: What the error offers instead of loading the file (default: nothing but re-saving).

    Raises:
        UnsafeFileError: the file holds something other than tensors, plain containers and numbers.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if trusted:
            raise
        raise UnsafeFileError(
            f"{owner}: {str(path)!r} holds objects that loading it safely (torch.load(weights_only=True)) "
            f"refuses, since unpickling them could run code stored in the file: {_refused_line(err)}. "
            f"{way_out or 'Save plain tensors instead (e.g. torch.save(model.state_dict(), path))'}."
        ) from None


# numpy's array reconstruction: what a pickled ndarray of numbers needs, and nothing that can run code
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(f"a pickle of numpy arrays refers to {module}.{name}, which is not allowed")


def load_numpy_pickle(file: IO[bytes], what: str) -> Any:
    """``pickle.load(file)`` that rebuilds numpy arrays of numbers and plain containers, and refuses any
    other object (a tampered file cannot run code)."""
    try:
        return _ArrayUnpickler(file).load()
    except UnsafeFileError as err:
        message = f"{what}: {err}; the file is not what the package ships (reinstall it)."
        raise UnsafeFileError(message) from None
