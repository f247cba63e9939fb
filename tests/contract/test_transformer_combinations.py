"""The contract's callback combinations on the Hugging Face BERT family, and the multi-process columns.

Every COMBINATION (registry.py) resumes exactly at each of its transitions, and those with an independent
reference (the regularizer's penalty put in the loss, differentiated by autograd) equal it, with and
without a partial accumulation window. The slow columns: on BERT, DDP ranks stay identical (L2SP,
FreezeSchedule), and FSDP2 (``ModelParallelStrategy`` + ``fully_shard`` per Linear) trains L2SP to the
single-process result. On the Llama decoder and the two LoRA families (issue #23), one 2-rank launch per
family and strategy runs L2SP, FreezeSchedule, DELTA, WiSEFT and RepresentationSimilarity: under FSDP2
(TransferClassifier's own ``configure_model``, one unit per anatomy block and the root) and DDP the full
parameters and the callbacks' logged values equal the single-process run on the same global batches, and
DDP's ranks are bit-identical; WiSEFT on a LoRA model under FSDP2 is refused before the first step.
"""

from __future__ import annotations

import functools
import re
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
    """One run of the script, which must exit cleanly on every rank (tests.contract.multiprocess.finish)."""
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


# ------------------------------------------------------------------ multi-process on the other families (issue #23)

MP_FAMILIES = ["hf_llama", "peft_lora_bert", "peft_lora_llama"]
MP_NAMES = ["L2SP", "FreezeSchedule", "FeatureMapRegularization", "WiSEFT", "RepresentationSimilarity"]
# Refused before the first step by design (lightning_transfer/callbacks/weight_space.py): WiSEFT's check that the
# LoRA update B@A starts at 0 needs whole factors, which FSDP2 shards; on DDP or one device it is supported.
FSDP2_REFUSED = {f: {"WiSEFT": r"WiSEFT does not combine LoRA factors of a sharded \(FSDP2\) model"}
                 for f in ("peft_lora_bert", "peft_lora_llama")}


def _refused(kind: str, family: str) -> dict[str, str]:
    return FSDP2_REFUSED.get(family, {}) if kind == "fsdp2" else {}


def _launch_family(kind: str, family: str, out: Path) -> None:
    """The family's one 2-rank launch: every name of MP_NAMES, the refused ones last (expected to fail at setup)."""
    refused = _refused(kind, family)
    _launch(kind, str(out), "--family", family, "--blocks",
            *[n for n in MP_NAMES if n not in refused], *[f"!{n}" for n in refused])


def _check_against_single_process(kind: str, family: str, name: str, out: Path) -> None:
    """Rank 0's full parameters and logged values are the single-process run's; it trained, and what the model
    holds frozen before fit (peft's base) never moved; under DDP the ranks are bit-identical."""
    from tests.contract.transformer_multiprocess_run import single_process_metrics, single_process_reference

    ranks = [torch.load(out / f"{name}-rank{r}.pt") for r in (0, 1)]
    metrics = [torch.load(out / f"{name}-metrics-rank{r}.pt") for r in (0, 1)]
    if kind == "ddp":
        assert_params_close(ranks[0], ranks[1], rtol=0, atol=0)
    assert_params_close(ranks[0], single_process_reference(name, family), rtol=1e-5, atol=1e-6)
    start = build(family)
    held = {n for n, p in start.named_parameters() if not p.requires_grad}
    assert bool(held) == family.startswith("peft_")
    start = params_of(start)
    assert any(not torch.equal(start[k], ranks[0][k]) for k in start if k not in held), "it did not train"
    assert all(torch.equal(start[k], ranks[0][k]) for k in held), "a frozen parameter moved"
    expected = single_process_metrics(name, family)
    assert metrics[0].keys() == expected.keys() and expected, sorted(expected)
    for key, value in expected.items():
        if kind == "ddp" and key == "delta/penalty":  # not synced under DDP: each rank's penalty of its own half
            assert (metrics[0][key] + metrics[1][key]) / 2 == pytest.approx(value, rel=1e-4, abs=1e-6)
            continue
        assert metrics[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def _check_family(kind: str, family: str, out: Path) -> None:
    """Every entry of the launch checked (all of them, then one failure listing each entry that failed)."""
    failures = []
    for name in MP_NAMES:
        try:
            if name in _refused(kind, family):
                result = torch.load(out / f"{name}-refused.pt")
                assert result["error"] is not None, "the fit ran"
                assert re.search(_refused(kind, family)[name], result["error"]), result["error"]
                assert result["global_step"] == 0
            else:
                _check_against_single_process(kind, family, name, out)
        except AssertionError as err:
            failures.append(f"{name}: {str(err)[:2000]}")
    assert not failures, "\n".join(failures)


# One test per launch (not per entry): under ``pytest -n 2`` tests of one module may run on both workers, and
# a module-scoped fixture shared by several tests would then launch twice.
@pytest.mark.slow
@pytest.mark.parametrize("family", MP_FAMILIES)
def test_fsdp2_on_family_equals_single_process(family, tmp_path):
    """FSDP2 with TransferClassifier's own per-block sharding: each entry equals one process; on a LoRA model
    WiSEFT is refused before the first step."""
    _launch_family("fsdp2", family, tmp_path)
    _check_family("fsdp2", family, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", MP_FAMILIES)
def test_ddp_on_family_ranks_identical_and_equal_single_process(family, tmp_path):
    _launch_family("ddp", family, tmp_path)
    _check_family("ddp", family, tmp_path)
