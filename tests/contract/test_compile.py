"""The compile column of the contract: every callback on a ``torch.compile``-d network (see REGISTRY).

A network compiled before fit (``self.backbone = torch.compile(backbone)``) must train to the
parameters of the uncompiled run, named by the compiled model's own layer names (``_orig_mod``), and
after a first compiled fit in the same process: dynamo keeps graphs per code object, and a graph
compiled without a callback's forward hooks would run without them. A block thawed mid-run trains
as uncompiled and the network stays compiled to the end. The matrix runs dynamo with ``aot_eager``
(dynamo's guards, hooks and AOT autograd, without inductor's compile time); DELTA and
RepresentationSimilarity run once with the default inductor backend.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_transfer import FeatureMapRegularization, FreezeSchedule, RepresentationSimilarity
from lightning_transfer.anatomy import plain_name
from tests.contract.registry import REGISTRY, Model
from tests.helpers import TinyClassifier, assert_params_close, params_of, quiet_trainer

BACKEND = "aot_eager"
COMPILED = Model(layers=("backbone._orig_mod.0", "backbone._orig_mod.1"))  # the compiled model's names


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts from an empty dynamo cache (as a fresh process) and leaves none behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(name: str, **kwargs) -> TinyClassifier:
    return TinyClassifier(**{**REGISTRY[name].module, "batch_size": 16, "n": 48, **kwargs})


def _compile(model: TinyClassifier, backend=BACKEND) -> TinyClassifier:
    model.backbone = torch.compile(model.backbone, backend=backend)
    model.head = torch.compile(model.head, backend=backend)
    return model


def _plain_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {plain_name(k): v for k, v in params_of(model).items()}


def _fit(name: str, model: TinyClassifier, info: Model) -> dict[str, torch.Tensor]:
    entry = REGISTRY[name]
    quiet_trainer(max_epochs=entry.max_epochs, callbacks=entry.make(info), **entry.trainer).fit(model)
    return _plain_params(model)


def _first_compiled_fit(model: TinyClassifier) -> None:
    """A fit without callbacks: compiles the train and eval graphs of this network's code, hook-free."""
    quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(model)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_compiled_network_trains_like_the_plain_one(name):
    expected = _fit(name, _model(name), Model())
    _first_compiled_fit(_compile(_model(name, seed=1)))
    got = _fit(name, _compile(_model(name)), COMPILED)
    assert_params_close(got, expected, rtol=1e-5, atol=1e-6)


class _GraphRuns:
    """A dynamo backend that runs graphs eagerly and counts them, and their executions epoch by epoch."""

    def __init__(self) -> None:
        self.runs, self.compiled, self.per_epoch = 0, 0, []

    def __call__(self, gm, example_inputs):
        self.compiled += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run

    def callback(self) -> Callback:
        graphs = self

        class Count(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                graphs.per_epoch.append(graphs.runs)

        return Count()


def _deep(compiled_with=None) -> TinyClassifier:
    """TinyClassifier with a 10-block backbone: gradual unfreezing makes 10 transitions."""
    model = TinyClassifier(batch_size=16, n=32)
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16 if i == 0 else 32, 32), nn.ReLU()) for i in range(10)]
    model.backbone = nn.Sequential(*blocks)
    if compiled_with is not None:
        model.backbone = torch.compile(model.backbone, backend=compiled_with)
    return model


def test_blocks_thawed_mid_run_train_as_uncompiled_and_stay_compiled():
    """Ten freeze transitions (more than dynamo's recompile_limit of 8 graphs per code object): every
    thawed block trains exactly as uncompiled, and compiled graphs still run in the last epoch."""
    plain = _deep()
    start = _plain_params(plain)
    quiet_trainer(max_epochs=11, callbacks=[FreezeSchedule.gradual(every=1)], limit_val_batches=1).fit(plain)
    graphs = _GraphRuns()
    compiled = _deep(compiled_with=graphs)
    quiet_trainer(max_epochs=11, callbacks=[FreezeSchedule.gradual(every=1), graphs.callback()],
                  limit_val_batches=1).fit(compiled)
    expected, got = _plain_params(plain), _plain_params(compiled)
    assert_params_close(got, expected, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(start[k], got[k]) for k in got), "every block is thawed by the last epoch"
    last_epoch_runs = graphs.runs - graphs.per_epoch[-1]
    assert last_epoch_runs > 0, "dynamo fell back to eager: the network is no longer compiled"


def test_attention_measurement_compiles_no_graph_per_channel():
    """DELTA's attention zeroes one channel per pass through a hook: compiled, each pass would be a new
    graph (32 channels: dynamo's recompile_limit, then the network runs uncompiled). It runs eagerly."""
    def graphs_compiled(attention: bool) -> int:
        torch._dynamo.reset()
        graphs = _GraphRuns()
        model = TinyClassifier(batch_size=16, n=48)
        model.backbone = torch.compile(model.backbone, backend=graphs)
        delta = FeatureMapRegularization(list(COMPILED.layers), alpha=1.0, attention=attention, attention_epoch=1)
        quiet_trainer(max_epochs=2, callbacks=[delta], limit_val_batches=1).fit(model)
        assert attention == (delta.channel_weights is not None)
        return graphs.compiled

    assert graphs_compiled(True) == graphs_compiled(False)


def test_delta_on_a_second_inductor_model_with_either_root_spelling():
    """The reported case: after a compiled fit, a new compiled model with DELTA (default backend), its
    layers named plainly and its root named through the wrapper, as the old error advised."""
    layers = ["backbone.0", "backbone.1"]
    expected = TinyClassifier(batch_size=16, n=32)
    quiet_trainer(max_epochs=2, callbacks=[FeatureMapRegularization(layers, alpha=1.0)]).fit(expected)
    _first_compiled_fit(_compile(TinyClassifier(batch_size=16, n=32, seed=1), backend="inductor"))
    model = _compile(TinyClassifier(batch_size=16, n=32), backend="inductor")
    delta = FeatureMapRegularization(layers, alpha=1.0, root="backbone._orig_mod")
    quiet_trainer(max_epochs=2, callbacks=[delta]).fit(model)
    assert_params_close(_plain_params(model), _plain_params(expected), rtol=1e-4, atol=1e-5)


def test_similarity_on_an_inductor_model_at_every_epoch():
    """Each validation probes with hooks added for that pass only; the compiled eval graph must not hide them."""
    def history(model):
        cka = RepresentationSimilarity(probe_size=16, measures=["cka", "overlap"], k=3)
        quiet_trainer(max_epochs=3, callbacks=[cka], limit_val_batches=2).fit(model)
        return cka.history

    expected = history(TinyClassifier(batch_size=16, n=32))
    got = history(_compile(TinyClassifier(batch_size=16, n=32), backend="inductor"))
    assert got.keys() == expected.keys() and all(len(v) == 3 for v in got.values())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def _compiled_in(form: str, model: TinyClassifier):
    """``model`` compiled as users do it: a wrapped submodule, in place, or the LightningModule for fit."""
    if form == "wrapped":
        return _compile(model)
    if form == "in_place":
        model.backbone.compile(backend=BACKEND)
        model.head.compile(backend=BACKEND)
        return model
    return torch.compile(model, backend=BACKEND)  # Lightning compiles forward and the steps


@pytest.mark.parametrize("form", ["wrapped", "in_place", "lightning"])
def test_references_of_a_compiled_model_are_the_pretrained_weights(form):
    """DELTA with its root at the LightningModule (``root=""``) and RepresentationSimilarity copy the whole
    module as their pre-trained reference: the copy must not call back into the live model."""
    def run(compiled: bool):
        model = TinyClassifier(batch_size=16, n=32)
        delta = FeatureMapRegularization(["backbone.0", "backbone.1"], alpha=1.0, root="")
        cka = RepresentationSimilarity(probe_size=16)
        quiet_trainer(max_epochs=2, callbacks=[delta, cka], limit_val_batches=2).fit(
            _compiled_in(form, model) if compiled else model)
        return _plain_params(model), cka.history

    (expected, expected_cka), (got, got_cka) = run(False), run(True)
    assert_params_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got_cka.keys() == expected_cka.keys()
    for key in expected_cka:
        torch.testing.assert_close(got_cka[key], expected_cka[key], rtol=1e-5, atol=1e-6, msg=key)
