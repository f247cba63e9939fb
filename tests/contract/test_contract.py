"""The contract every callback of the library passes (see REGISTRY): resume, DDP, precision,
accumulation and clipping, state, LightningCLI, bad input, architectures."""

import copy
import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_transfer import DTNH, L2SP
from lightning_transfer.cli import build_cli
from tests.contract.registry import COMBINATIONS, REGISTRY, SINGLE, Model
from tests.helpers import (
    ACCELERATOR,
    ImageModule,
    StopAfter,
    TinyClassifier,
    assert_params_close,
    launch_env,
    params_of,
    quiet_trainer,
)

NAMES = list(REGISTRY)


def _model(name, **kwargs):
    """The entry's TinyClassifier (with its extra module arguments, e.g. layer decay)."""
    return TinyClassifier(**{**REGISTRY[name].module, **kwargs})


@pytest.mark.parametrize("name", NAMES)
def test_resume_equals_uninterrupted(name, tmp_path):
    epochs = REGISTRY[name].max_epochs
    extra = REGISTRY[name].trainer
    full = _model(name, batch_size=8)
    quiet_trainer(max_epochs=epochs, callbacks=REGISTRY[name].make(Model()), **extra).fit(full)

    first = _model(name, batch_size=8)
    t1 = quiet_trainer(max_epochs=epochs, callbacks=[*REGISTRY[name].make(Model()), StopAfter(epochs // 2)],
                       default_root_dir=tmp_path, enable_checkpointing=True, **extra)
    t1.fit(first)
    ckpt = t1.checkpoint_callback.best_model_path
    resumed = _model(name, batch_size=8, seed=123)  # different init: everything must come from the checkpoint
    quiet_trainer(max_epochs=epochs, callbacks=REGISTRY[name].make(Model()), **extra).fit(resumed, ckpt_path=ckpt)
    assert_params_close(params_of(resumed), params_of(full), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_ddp_ranks_stay_identical(name, tmp_path):
    script = Path(__file__).with_name("ddp_run.py")
    proc = subprocess.run([sys.executable, str(script), name, str(tmp_path)], capture_output=True, text=True, timeout=300, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert_params_close(ranks[0], ranks[1], rtol=0, atol=0)
    start = params_of(_model(name))
    assert any(not torch.equal(start[k], ranks[0][k]) for k in start)


def _run(name, model, batches=1, **kw):
    """Epoch-based (so epoch schedules such as RIFLE's fire): max_epochs of the entry, `batches` per epoch."""
    trainer = quiet_trainer(max_epochs=REGISTRY[name].max_epochs, limit_train_batches=batches,
                            callbacks=REGISTRY[name].make(Model()), **{**REGISTRY[name].trainer, **kw})
    trainer.fit(model)
    return trainer


def _update(name, precision=None, plugins=None):
    model = _model(name, batch_size=16, lr=0.02)
    start = params_of(model)
    kw = {"plugins": plugins} if plugins else {"precision": precision or "32-true"}
    _run(name, model, **kw)
    end = params_of(model)
    return {k: end[k] - start[k] for k in start}


def _relative_error(a, b):
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].norm() ** 2) for k in b) ** 0.5
    return num / max(den, 1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_mixed_keeps_the_math(name):
    fp32, bf16 = _update(name), _update(name, "bf16-mixed")
    assert _relative_error(bf16, fp32) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_gradscaler_unscales_before_the_callback(name):
    """A real GradScaler (scale 2**10) on CPU: a contribution added before unscaling would be 1024x off."""
    fp32 = _update(name)
    device = "cuda" if ACCELERATOR == "gpu" else "cpu"
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    scaled = _update(name, plugins=[MixedPrecision("16-mixed", device, scaler=scaler)])
    assert _relative_error(scaled, fp32) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_accumulation_equals_full_batch(name):
    entry = REGISTRY[name]
    if entry.batch_dependent:  # the penalty of each micro-batch: the reference in the loss, accumulated alike
        model = _model(name, batch_size=8, norm=False)
        _run(name, model, batches=2, accumulate_grad_batches=2)
        kwargs, callbacks = entry.reference()
        kwargs = {**entry.module, **kwargs, "batch_size": 8, "norm": False}
        reference = kwargs.pop("cls", TinyClassifier)(**kwargs)
        quiet_trainer(max_epochs=entry.max_epochs, limit_train_batches=2, accumulate_grad_batches=2,
                      callbacks=callbacks, **entry.trainer).fit(reference)
        assert_params_close(params_of(model), params_of(reference), rtol=1e-4, atol=1e-6)
        return
    ends = []
    for batch, acc in ((16, 1), (8, 2)):
        model = _model(name, batch_size=batch, norm=False)  # no BatchNorm: batch statistics would differ
        _run(name, model, batches=acc, accumulate_grad_batches=acc)
        ends.append(params_of(model))
    assert_params_close(ends[1], ends[0], rtol=1e-4, atol=1e-6)


class RecordingSGD(torch.optim.SGD):
    norms: list = []

    def step(self, closure=None):
        loss = closure() if closure is not None else None  # Lightning's closure ends with clipping
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        RecordingSGD.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        super().step()
        return loss


class ClippedModel(TinyClassifier):
    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("name", NAMES)
def test_clipping_sees_the_final_gradient(name):
    RecordingSGD.norms = []
    _run(name, ClippedModel(), gradient_clip_val=0.01)
    assert len(RecordingSGD.norms) == REGISTRY[name].max_epochs and max(RecordingSGD.norms) <= 0.01 * (1 + 1e-4)


def _states_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    trainer = _run(name, _model(name))
    callbacks = [cb for cb in trainer.callbacks if type(cb).__module__.startswith("lightning_transfer")]
    for cb in callbacks:
        state = cb.state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        fresh = copy.deepcopy(REGISTRY[name].make(Model())[callbacks.index(cb)])
        fresh.load_state_dict(torch.load(buffer, weights_only=False))
        assert _states_equal(fresh.state_dict(), state)
        if REGISTRY[name].stateful and type(cb).__name__ != "DTNH":
            assert state, f"{type(cb).__name__} saves no state"


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].two_instances])
def test_two_instances_coexist(name, tmp_path):
    a, b = REGISTRY[name].make(Model())[0], REGISTRY[name].make(Model())[0]
    b.alpha = a.alpha * 2  # a different configuration -> a different state key
    trainer = quiet_trainer(max_epochs=1, callbacks=[a, b], default_root_dir=tmp_path, enable_checkpointing=True,
                            **REGISTRY[name].trainer)
    trainer.fit(TinyClassifier())
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert a.state_key != b.state_key and {a.state_key, b.state_key} <= set(ckpt["callbacks"])


def _cli_args(tmp_path, callbacks_yaml):
    config = {
        "model": {"class_path": "tests.helpers.TinyClassifier"},
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
        "trainer": {"callbacks": callbacks_yaml, "max_steps": 1, "logger": False, "accelerator": "cpu"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--config", str(path)]  # run=False: no subcommand


@pytest.mark.parametrize("name", NAMES)
def test_lightning_cli_builds_from_yaml(name, tmp_path):
    entry = REGISTRY[name]
    cli = build_cli(_cli_args(tmp_path, entry.yaml), run=False)
    built = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    for item in entry.yaml:
        cls_name = item["class_path"].rsplit(".", 1)[1]
        assert cls_name in built
        for key, value in item.get("init_args", {}).items():
            got = getattr(built[cls_name], key)
            if isinstance(value, dict) and "class_path" in value:  # a nested object (CoTuning's source_head)
                assert type(got).__name__ == value["class_path"].rsplit(".", 1)[1]
                assert all(getattr(got, k) == v for k, v in value.get("init_args", {}).items())
            else:
                assert got == value


@pytest.mark.parametrize("name", NAMES)
def test_cli_help_and_wrong_type(name, tmp_path):
    class_path = REGISTRY[name].yaml[-1]["class_path"]
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        build_cli([f"--trainer.callbacks.help={class_path}"], run=False)
    text = out.getvalue()
    cls = class_path.rsplit(".", 1)[1]
    params = [p for p in __import__("inspect").signature(getattr(__import__("lightning_transfer"), cls)).parameters]
    assert all(p in text for p in params), text[:2000]
    first = params[0]
    bad = [{"class_path": class_path, "init_args": {first: {"not": "a valid value"}}}]
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        build_cli(_cli_args(tmp_path, bad), run=False)
    assert first in err.getvalue()


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].bad])
def test_bad_input_fails_before_the_first_step(name):
    for make, exc, match in REGISTRY[name].bad:
        model = TinyClassifier()
        with pytest.raises(exc, match=match):
            quiet_trainer(max_epochs=REGISTRY[name].max_epochs, callbacks=make(), **REGISTRY[name].trainer).fit(model)
        assert model.global_step == 0


def _architectures():
    import torchvision

    from lightning_transfer.model import build_backbone

    def plain():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3),
        )

    archs = {
        "torchvision_resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=3), Model(None, ("net.layer1", "net.layer2"))),
        "efficientnet_lite0": (lambda: build_backbone("efficientnet_lite0", 3, pretrained=False)[0], Model(None, ("net._blocks.2", "net._blocks.5"))),
        "plain_module": (plain, Model("net.7", ("net.1", "net.3"))),
    }
    try:
        import timm

        archs["timm_resnet18"] = (lambda: timm.create_model("resnet18", pretrained=False, num_classes=3), Model(None, ("net.layer1",)))
    except ImportError:  # pragma: no cover - timm is in the test extra
        pass
    return archs


ARCHS = _architectures()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", SINGLE)
def test_works_across_architectures(name, arch):
    make_net, info = ARCHS[arch]
    module = ImageModule(make_net())
    start = params_of(module)
    callbacks = REGISTRY[name].make(info)
    if any(type(cb).__name__ == "RIFLE" for cb in callbacks):
        callbacks = [type(callbacks[0])(points=[1], min_epochs_after=1, head=info.head)]
        quiet_trainer(max_epochs=3, callbacks=callbacks).fit(module)
    else:
        quiet_trainer(max_steps=2, callbacks=callbacks).fit(module)
    end = params_of(module)
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert all(torch.isfinite(v).all() for v in end.values())



@pytest.mark.parametrize("name", NAMES)
def test_an_instance_reused_for_a_second_fit_acts_like_a_new_one(name):
    """Notebooks and sweeps reuse callback objects: the second fit must equal a fit with fresh ones."""
    reused = REGISTRY[name].make(Model())
    _fit_with(name, reused)
    again = _fit_with(name, reused)
    fresh = _fit_with(name, REGISTRY[name].make(Model()))
    assert_params_close(again, fresh, rtol=1e-6, atol=1e-7)


def _fit_with(name, callbacks):
    model = _model(name, batch_size=16)
    quiet_trainer(max_epochs=REGISTRY[name].max_epochs, limit_train_batches=2, callbacks=callbacks,
                  **REGISTRY[name].trainer).fit(model)
    return params_of(model)


def test_regularizer_reused_without_dtnh_adds_its_gradient_again():
    l2sp = L2SP(alpha=5.0)
    quiet_trainer(max_steps=2, callbacks=[l2sp, DTNH()]).fit(TinyClassifier())
    alone, fresh = TinyClassifier(), TinyClassifier()
    quiet_trainer(max_steps=3, callbacks=[l2sp]).fit(alone)
    quiet_trainer(max_steps=3, callbacks=[L2SP(alpha=5.0)]).fit(fresh)
    assert_params_close(params_of(alone), params_of(fresh), rtol=0, atol=0)


RESUME_POINTS = [(name, epoch) for name in COMBINATIONS for t in COMBINATIONS[name].transitions
                 for epoch in (t - 1, t) if 0 <= epoch < COMBINATIONS[name].max_epochs - 1]


@pytest.mark.parametrize("name,epoch", sorted(set(RESUME_POINTS)))
def test_combination_resume_at_each_transition(name, epoch, tmp_path):
    """Resume from the checkpoint written at the end of ``epoch`` (just before or just after a transition):
    the run must end exactly where the uninterrupted run ends."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    entry = REGISTRY[name]
    full = _model(name, batch_size=16, n=48)  # 3 batches per epoch
    every = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    quiet_trainer(max_epochs=entry.max_epochs, callbacks=[*entry.make(Model()), every], enable_checkpointing=True,
                  **entry.trainer).fit(full)
    resumed = _model(name, batch_size=16, n=48, seed=123)  # another init: everything must come from the checkpoint
    quiet_trainer(max_epochs=entry.max_epochs, callbacks=entry.make(Model()), **entry.trainer).fit(
        resumed, ckpt_path=tmp_path / f"epoch={epoch}.ckpt")
    assert_params_close(params_of(resumed), params_of(full), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accumulate", [1, 2])  # 2 with 3 batches per epoch: a partial last window
@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].reference is not None])
def test_combination_equals_its_independent_reference(name, accumulate):
    """The regularizer's gradient, combined with a schedule, equals its penalty put in the loss."""
    entry = REGISTRY[name]
    kwargs, ref_callbacks = entry.reference()
    cls = kwargs.pop("cls", TinyClassifier)
    runs = []
    for model, callbacks in ((_model(name, batch_size=16, n=48), entry.make(Model())),
                             (cls(batch_size=16, n=48, **kwargs), ref_callbacks)):
        quiet_trainer(max_epochs=entry.max_epochs, callbacks=callbacks, accumulate_grad_batches=accumulate,
                      **entry.trainer).fit(model)
        runs.append(params_of(model))
    assert_params_close(runs[0], runs[1], rtol=1e-4, atol=1e-6)
