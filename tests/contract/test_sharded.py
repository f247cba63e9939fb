"""The sharded column of the contract: FSDP2 (``ModelParallelStrategy`` + ``fully_shard``) on 2 CPU ranks.

Every callback entry of the registry, and every combination of supported callbacks, trains to the same
full parameters as a single-process run on the same global batches, and a run resumed from its
distributed checkpoint ends equal to the uninterrupted one (WiSEFT and LiNeS: the same curve, the same
chosen ``a``, the same final parameters). FeatureMapRegularization (DELTA) keeps its reference copy
sharded as the live model (1/N of it per rank); RepresentationSimilarity keeps no copy (the pre-trained
side's Gram matrices and neighbours, from the sharded forward) and logs what one process logs; DELTA
under DTNH (a second autograd pass) is rejected at setup; FSDP1 and DeepSpeed are rejected for every
callback by the one shared strategy check.

All sharded fits run in one 2-process launch (tests/contract/sharded_run.py); the single-process
references run here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_transfer import (
    DTNH,
    L2SP,
    RIFLE,
    FeatureMapRegularization,
    FreezeSchedule,
    LiNeS,
    MaxEntropyHeadInit,
    RepresentationSimilarity,
    WiSEFT,
)
from lightning_transfer.functional.projection import _dots, _squared_norms, project_conflicting_
from lightning_transfer.validation import check_strategy
from tests.contract.registry import REGISTRY, Model
from tests.contract.sharded_run import entries, extra_entries, reference
from tests.helpers import TinyClassifier, assert_params_close, launch_env

SCRIPT = Path(__file__).with_name("sharded_run.py")
def _delta_under_dtnh(callbacks) -> bool:
    return any(isinstance(cb, FeatureMapRegularization) for cb in callbacks) and any(isinstance(cb, DTNH) for cb in callbacks)


def _supported(name: str) -> bool:
    callbacks = REGISTRY[name].make(Model())
    return not _delta_under_dtnh(callbacks)


SUPPORTED = [n for n in REGISTRY if _supported(n)]
REJECTED = [n for n in REGISTRY if not _supported(n)]
EXTRA = list(extra_entries(Path(".")))  # other norms, Fisher, fused, uneven shards, a user-frozen parameter
NAMES = SUPPORTED + EXTRA

# one worker runs this module under `-n 2` (pyproject: --dist loadgroup): its module-scoped 2-rank launch runs
# once, not once per worker that receives some of its tests
pytestmark = pytest.mark.xdist_group("fsdp2_contract_launch")

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """One 2-rank launch: every supported entry, uninterrupted and resumed, then every rejected entry (each
    expected to fail at setup); rank 0's results by name."""
    out = tmp_path_factory.mktemp("sharded")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--resume", *NAMES, *[f"!{n}" for n in REJECTED]],
                          capture_output=True, text=True, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, {n: torch.load(out / f"{n}.pt") for n in NAMES + REJECTED}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_equals_single_process(name, sharded):
    out, results = sharded
    # the fused kernel runs eager under sharding: compare with the eager single-process L2SP (no compile here)
    expected, metrics = reference(entries(out)["L2SP" if name == "L2SP-fused" else name])
    tol = {"rtol": 1e-4, "atol": 1e-4} if "gl" in name or "group_lasso" in name else {"rtol": 1e-5, "atol": 1e-6}
    assert_params_close(results[name]["params"], expected, **tol)
    start = dict(TinyClassifier(norm=False, **{k: v for k, v in entries(out)[name].module.items() if k != "frozen"})
                 .named_parameters())
    assert any(not torch.equal(start[k].detach(), results[name]["params"][k]) for k in start)  # it trained
    # logged values (penalties, DTNH statistics) are of the whole model on rank 0, not of its shard
    assert results[name]["metrics"].keys() == metrics.keys()
    for key, value in metrics.items():
        if key.startswith("bss/"):  # the penalty of the rank's own batch (rank 0's), not of the reference's last
            continue  # micro-batch (rank 1's part)
        assert results[name]["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_resume_from_distributed_checkpoint_equals_uninterrupted(name, sharded):
    _, results = sharded
    assert_params_close(results[name]["resumed"], results[name]["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_similarity_history_survives_a_resume(sharded):
    """RepresentationSimilarity under FSDP2: the checkpoint is restored after on_fit_start there, so the summaries
    of the pre-trained side must come from it; every epoch's values equal the uninterrupted run's."""
    _, results = sharded
    names = [n for n in NAMES if results[n]["history"]]
    assert {"RepresentationSimilarity", "FreezeSchedule+RepresentationSimilarity"} <= set(names)
    for name in names:
        (full,), (resumed,) = results[name]["history"], results[name]["resumed_history"]
        assert full.keys() == resumed.keys() and any(k.startswith("cka/") for k in full), name
        for key, values in full.items():
            assert len(values) == REGISTRY[name].max_epochs and resumed[key] == pytest.approx(values, abs=1e-6), key
        assert min(full["cka/head"]) < 0.999, name  # it trained: a comparison with itself would give 1


@pytest.mark.slow
def test_l2sp_anchor_memory_per_rank_is_one_over_n(sharded):
    _, results = sharded
    measured = [a for n in NAMES for a in results[n]["anchors"]]
    assert measured
    for a in measured:
        assert a["types"] == ["Tensor"]  # local shards, not DTensors or full copies
        assert a["local"] * 2 == a["full"]


@pytest.mark.slow
def test_delta_reference_is_sharded_as_the_live_model_half_per_rank(sharded):
    """DELTA's reference copy under FSDP2: DTensors whose local shards are 1/2 of the full copy on 2 ranks
    (TinyClassifier's backbone: 1568 fp32 parameters, 3136 bytes per rank; the same 1/2 at width 1024 in
    benchmarks/results/sharded_cpu.md)."""
    out, results = sharded
    names = [n for n in NAMES if any(isinstance(cb, FeatureMapRegularization) for cb in entries(out)[n].make(Model()))]
    assert {"FeatureMapRegularization", "FeatureMapRegularization-attention", "DELTA+LP-FT"} <= set(names)
    for name in names:
        for ref in results[name]["reference"]:
            assert ref["types"] == ["DTensor"], name
            assert ref["local"] * 2 == ref["full"] and ref["bytes"] == ref["local"] * 4, name
    backbone = sum(p.numel() for p in TinyClassifier(norm=False).backbone.parameters())  # DELTA's root, fp32
    assert results["FeatureMapRegularization"]["reference"][0]["bytes"] == backbone * 4 // 2 == 3136


@pytest.mark.slow
def test_fsdp2_weight_space_selection_keeps_local_w0_and_chooses_as_one_process(sharded):
    """WiSEFT, LiNeS: w0 held as local shards (1/N), and the curve and the chosen a of the single-process run."""
    out, results = sharded
    names = [n for n in NAMES if any(isinstance(cb, (WiSEFT, LiNeS)) for cb in entries(out)[n].make(Model()))]
    assert {"WiSEFT", "LiNeS", "L2SP+WiSEFT", "L2SP+LiNeS"} <= set(names)
    for name in names:
        prefix = "lines" if "LiNeS" in name else "wise_ft"
        _, metrics = reference(entries(out)[name])
        assert results[name]["metrics"][f"{prefix}/best_alpha"] == metrics[f"{prefix}/best_alpha"], name
        for copy in results[name]["w0"]:
            assert copy["types"] in ([], ["Tensor"]) and copy["local"] * 2 == copy["full"], name
    assert any(copy["full"] > 0 for n in names for copy in results[n]["w0"])  # some copy was measured


@pytest.mark.slow
def test_fsdp2_user_frozen_parameter_is_never_thawed(sharded):
    _, results = sharded
    start = dict(TinyClassifier(norm=False).named_parameters())
    assert torch.equal(results["FreezeSchedule-user-frozen"]["params"]["backbone.1.0.bias"], start["backbone.1.0.bias"])


@pytest.mark.slow
@pytest.mark.parametrize("name", REJECTED)
def test_rejected_callbacks_fail_at_setup_of_a_real_fsdp2_run(name, sharded):
    _, results = sharded
    error = results[name]["error"]
    assert error is not None and "does not support sharded training (ModelParallelStrategy / FSDP2)" in error
    assert "DTNH needs DELTA's gradient apart" in error
    assert "on a single device or DDP" in error or "Use a single device or DDP" in error
    assert results[name]["global_step"] == 0


# ------------------------------------------------------------------ strategy checks (no processes)


def _stub(strategy):
    return SimpleNamespace(strategy=strategy, max_epochs=10, max_steps=-1, callbacks=[], world_size=2)


def _fsdp2():
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


@pytest.mark.parametrize("name", REJECTED)
def test_delta_under_dtnh_is_rejected_under_fsdp2(name):
    callbacks = REGISTRY[name].make(Model())
    stub = _stub(_fsdp2())
    stub.callbacks = callbacks
    delta = next(cb for cb in callbacks if isinstance(cb, FeatureMapRegularization))
    with pytest.raises(ValueError, match="with DTNH does not support sharded training .*second autograd pass"):
        delta.setup(stub, TinyClassifier(), "fit")


def test_delta_rejects_a_model_sharded_or_on_the_meta_device_at_setup():
    """Its reference is copied at setup, before configure_model: a module sharded already, or built on the meta
    device, holds no pre-trained weights to copy."""
    from torch.distributed.fsdp import FSDPModule

    delta = FeatureMapRegularization(["backbone.0"])
    delta.setup(_stub(_fsdp2()), TinyClassifier(), "fit")  # a whole model: copied
    assert delta._reference is not None and not isinstance(delta._reference, FSDPModule)
    sharded = TinyClassifier()
    sharded.backbone[0].__class__ = type("FSDPLinear", (FSDPModule, type(sharded.backbone[0])), {})
    with pytest.raises(ValueError, match="already sharded with fully_shard at setup.*configure_model"):
        delta.setup(_stub(_fsdp2()), sharded, "fit")
    with torch.device("meta"):
        meta = TinyClassifier()
    with pytest.raises(ValueError, match="meta device at setup"):
        delta.setup(_stub(_fsdp2()), meta, "fit")


ALL_CALLBACKS = [
    lambda: L2SP(), lambda: DTNH(), lambda: MaxEntropyHeadInit(), lambda: RIFLE(points=[1]),
    lambda: FreezeSchedule(depth=1), lambda: FeatureMapRegularization(["backbone.0"]),
    lambda: RepresentationSimilarity(), lambda: WiSEFT(), lambda: LiNeS(),
]


@pytest.mark.parametrize("make", ALL_CALLBACKS)
@pytest.mark.parametrize("strategy,message", [
    (lambda: FSDPStrategy.__new__(FSDPStrategy), "does not support FSDPStrategy: FSDP1 .*needs a GPU"),
    (lambda: DeepSpeedStrategy.__new__(DeepSpeedStrategy), "does not support DeepSpeedStrategy: DeepSpeed"),
])
def test_fsdp1_and_deepspeed_rejected_by_the_shared_check(make, strategy, message):
    cb = make()
    with pytest.raises(ValueError, match=message):
        cb.setup(_stub(strategy()), TinyClassifier(), "fit")


def test_check_strategy_accepts_fsdp2_only_when_the_callback_does():
    check_strategy(_stub(_fsdp2()), "X", sharded=True)
    with pytest.raises(ValueError, match="X does not support sharded training .*: needs Y. Use a single device or DDP"):
        check_strategy(_stub(_fsdp2()), "X", reason="needs Y")
    with pytest.raises(ValueError, match="only single-device, DDP and ModelParallelStrategy"):
        check_strategy(_stub(object()), "X", sharded=True)


# ------------------------------------------------------------------ DTNH's sums over shards (no processes)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_projection_on_shards_with_one_reduce_equals_the_unsharded_projection(granularity):
    """Two "ranks" hold dim-0 halves of g and r; one reduce of the partial sums gives the whole projection."""
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    r = [-t + 0.3 * torch.randn(t.shape, generator=gen) for t in g]  # conflicting
    whole = [t.clone() for t in g]
    project_conflicting_(whole, r, granularity)

    halves = [([t[:3].clone() for t in g], [t[:3] for t in r]), ([t[3:].clone() for t in g], [t[3:] for t in r])]
    partial = [torch.cat([_dots(gs, rs), _squared_norms(gs), _squared_norms(rs)]) for gs, rs in halves]
    for rank, (gs, rs) in enumerate(halves):
        calls = []
        other = partial[1 - rank]

        def reduce(v, calls=calls, other=other):
            calls.append(1)
            return v + other

        project_conflicting_(gs, rs, granularity, reduce=reduce)
        assert len(calls) == 1
        for full, piece in zip(whole, gs):
            torch.testing.assert_close(piece, full[:3] if rank == 0 else full[3:])
