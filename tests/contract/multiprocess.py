"""The end of a multi-process test script: every rank's process exits cleanly, every time.

Lightning destroys the process group at exit only for NCCL. With gloo, the group's C++ threads (two
``pt_gloo_runloop`` workers, ``gloo_tcp_loop`` and, on rank 0, the TCP store's ``pt_tcpstore_uv``) are
still running when the script returns, and tearing them down during interpreter finalization can abort
the process ("terminate called without an active exception", return code -6), rarely, after a
successful fit. And rank 0, the process the test waits for, does not wait for the other ranks it
launched: a rank still writing its results, or one that failed on the way out, went unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer


def record_refusal(trainer: Trainer, fit: Callable[[], None], path: Path) -> Trainer:
    """Run ``fit`` (expected to fail at setup with a ValueError); rank 0 saves the error (None if it trained)
    and the step reached to ``path``."""
    try:
        fit()
        error = None
    except ValueError as err:
        error = str(err)
    if trainer.global_rank == 0:
        torch.save({"error": error, "global_step": trainer.global_step}, path)
    return trainer


def finish(*trainers: Trainer, timeout: float = 120.0) -> None:
    """Call at the end of the script on every rank, after the results are written, with the script's
    Trainers (the first one launched the other ranks; later ones join the same processes).

    A barrier (every rank is done), then ``destroy_process_group`` (its threads joined while the
    interpreter is fully alive), then rank 0 waits for the ranks it launched and fails if one failed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # rank 0 only: the other ranks' processes
    launched = [proc for t in trainers for proc in getattr(t.strategy.launcher, "procs", None) or []]
    codes = [proc.wait(timeout=timeout) for proc in launched]
    if any(codes):
        raise SystemExit(f"rank 0: the other ranks exited with return codes {codes}")
