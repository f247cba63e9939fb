"""The contract's callback combinations on the Hugging Face BERT family, and its multi-process column.

Every COMBINATION (registry.py) resumes exactly at each of its transitions, and those with an independent
reference (the regularizer's penalty put in the loss, differentiated by autograd) equal it, with and
without a partial accumulation window. The slow column: DDP ranks stay identical (L2SP, FreezeSchedule),
and FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) trains L2SP to the single-process result.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.contract.registry import COMBINATIONS, BSSPenaltyInLoss, FeaturePenaltyInLoss
from tests.contract.test_contract import RESUME_POINTS
from tests.contract.transformer_models import (
    FAMILIES,
    BSSReference,
    FamilyData,
    FeaturePenaltyReference,
    LossReference,
    build,
    lr_for,
)
from tests.helpers import assert_params_close, launch_env, params_of, quiet_trainer

FAMILY = "hf_bert"
INFO = FAMILIES[FAMILY].model
N = 48  # 3 batches of 16 an epoch: accumulation 2 leaves a partial last window


def _fit(name: str, model, callbacks, **kw):
    entry = COMBINATIONS[name]
    trainer = quiet_trainer(max_epochs=entry.max_epochs, callbacks=callbacks, **{**entry.trainer, **kw})
    trainer.fit(model, datamodule=FamilyData(FAMILY, n=N))
    return params_of(model)


@functools.cache
def _checkpointed(name: str, folder: Path) -> dict[str, torch.Tensor]:
    """The uninterrupted run, writing a checkpoint at the end of every epoch into ``folder``."""
    every = ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    return _fit(name, build(FAMILY, lr=lr_for(COMBINATIONS[name]), **COMBINATIONS[name].module),
                [*COMBINATIONS[name].make(INFO), every], enable_checkpointing=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bert-combinations")


@pytest.mark.parametrize("name,epoch", sorted({p for p in RESUME_POINTS if p[0] in COMBINATIONS}))
def test_combination_resume_at_each_transition(name, epoch, folder):
    """Resumed from the end of ``epoch`` (just before or after a transition), the run ends where the
    uninterrupted one does."""
    full = _checkpointed(name, folder / name)
    entry = COMBINATIONS[name]
    resumed = build(FAMILY, seed=123, lr=lr_for(entry), **entry.module)  # everything must come from the checkpoint
    trainer = quiet_trainer(max_epochs=entry.max_epochs, callbacks=entry.make(INFO), **entry.trainer)
    trainer.fit(resumed, datamodule=FamilyData(FAMILY, n=N), ckpt_path=folder / name / f"epoch={epoch}.ckpt")
    assert_params_close(params_of(resumed), full, rtol=1e-5, atol=1e-6)


REFERENCED = [n for n, e in COMBINATIONS.items() if e.reference is not None]


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("name", REFERENCED)
def test_combination_equals_its_independent_reference(name, accumulate):
    """The callbacks' run equals the penalty-in-the-loss run (same schedule) on BERT's token batches."""
    entry = COMBINATIONS[name]
    kwargs, ref_callbacks = entry.reference(INFO)
    cls = kwargs.pop("cls", None)
    if cls is BSSPenaltyInLoss:  # BSS's penalty of the head's input, put in the loss of the family's model
        cls, kwargs = BSSReference, {**kwargs, "head": INFO.head}
    else:
        cls = FeaturePenaltyReference if cls is FeaturePenaltyInLoss else LossReference
    lr = lr_for(entry)
    runs = [_fit(name, build(FAMILY, lr=lr, **entry.module), entry.make(INFO), accumulate_grad_batches=accumulate),
            _fit(name, build(FAMILY, lr=lr, cls=cls, **kwargs), ref_callbacks, accumulate_grad_batches=accumulate)]
    start = params_of(build(FAMILY))
    assert any(not torch.equal(start[k], runs[0][k]) for k in start)
    assert_params_close(runs[0], runs[1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ multi-process (2 CPU ranks)

SCRIPT = Path(__file__).with_name("transformer_multiprocess_run.py")


def _launch(*args: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_ddp_ranks_stay_identical(tmp_path):
    names = ["L2SP", "FreezeSchedule"]
    _launch("ddp", str(tmp_path), *names)
    start = params_of(build(FAMILY))
    for name in names:
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1)]
        assert_params_close(ranks[0], ranks[1], rtol=0, atol=0)
        assert any(not torch.equal(start[k], ranks[0][k]) for k in start), name


@pytest.mark.slow
def test_fsdp2_l2sp_equals_single_process(tmp_path):
    from tests.contract.transformer_multiprocess_run import single_process_reference

    _launch("fsdp2", str(tmp_path), "L2SP")
    assert_params_close(torch.load(tmp_path / "L2SP-rank0.pt"), single_process_reference("L2SP"), rtol=1e-5, atol=1e-6)
