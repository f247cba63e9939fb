"""L2SP against the reference: the penalty in the loss, differentiated by autograd, in a real Trainer."""

import types
import warnings

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from lightning_transfer import AnatomyError, TransferClassifier, build_backbone
from lightning_transfer.callbacks import L2SP
from lightning_transfer.callbacks.base import select_parameters
from lightning_transfer.functional import estimate_fisher, match_fisher, save_fisher
from tests.helpers import (
    ImageModule,
    TinyClassifier,
    assert_params_close,
    make_data,
    params_of,
    quiet_trainer,
)
from tests.test_penalties import reference_penalty


def _reference_loss(alpha, beta, norm="l2", fisher=None, exclude=()):
    """Penalty added to each micro-batch loss, w0 captured from the model at the first call."""
    state = {}

    def extra(module):
        named = [(n, p) for n, p in module.named_parameters() if not n.startswith("head.") and n not in exclude]
        if "w0" not in state:
            state["w0"] = [p.detach().clone() for _, p in named]
        params = [p for _, p in named]
        fish = [fisher[n] for n, _ in named] if fisher is not None else None
        head = list(module.head.parameters())
        return reference_penalty(params, state["w0"], alpha, norm, fish) + reference_penalty(head, None, beta, "l2")

    return extra


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("norm", ["l2", "l1", "group_lasso"])
@pytest.mark.parametrize("accumulate,clip", [(1, None), (2, 0.5)])
def test_equals_penalty_in_the_loss(optimizer, norm, accumulate, clip):
    alpha, beta = 0.3, 0.05
    runs = {}
    for kind in ("callback", "reference"):
        extra = _reference_loss(alpha, beta, norm) if kind == "reference" else None
        model = TinyClassifier(optimizer=optimizer, lr=0.05, extra_loss=extra, batch_size=8)
        callbacks = [L2SP(alpha=alpha, beta=beta, norm=norm)] if kind == "callback" else []
        trainer = quiet_trainer(max_steps=6, callbacks=callbacks, accumulate_grad_batches=accumulate,
                                gradient_clip_val=clip)
        trainer.fit(model)
        runs[kind] = params_of(model)
    start = params_of(TinyClassifier())
    assert any(not torch.equal(start[k], runs["callback"][k]) for k in start), "training moved nothing"
    assert_params_close(runs["callback"], runs["reference"], rtol=1e-5, atol=1e-6)


def test_pull_toward_w0_is_real():
    """With a huge alpha the transferred weights barely move; with alpha=0 they move freely."""
    moved = {}
    for alpha in (0.0, 50.0):
        model = TinyClassifier(lr=0.01)
        start = params_of(model)
        quiet_trainer(max_steps=10, callbacks=[L2SP(alpha=alpha, beta=0.0)]).fit(model)
        end = params_of(model)
        moved[alpha] = sum((end[k] - start[k]).norm() for k in start if k.startswith("backbone"))
    assert moved[50.0] < 0.5 * moved[0.0]


def test_fisher_weighting_equals_reference(tmp_path):
    model = TinyClassifier()
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters() if not n.startswith("head.")}
    path = tmp_path / "fisher.pt"
    save_fisher({n.removeprefix("backbone."): f for n, f in fisher.items()}, path)  # suffix matching
    runs = {}
    for kind in ("callback", "reference"):
        m = TinyClassifier(extra_loss=_reference_loss(0.2, 0.0, "l2", fisher) if kind == "reference" else None)
        cbs = [L2SP(alpha=0.2, beta=0.0, fisher=str(path))] if kind == "callback" else []
        quiet_trainer(max_steps=4, callbacks=cbs).fit(m)
        runs[kind] = params_of(m)
    assert_params_close(runs["callback"], runs["reference"], rtol=1e-5, atol=1e-6)


class HandDecoupled(TinyClassifier):
    """Reference: w <- w - lr*alpha*(w - w0) written by hand in the module's own hook."""

    def __init__(self, alpha, beta, **kw):
        super().__init__(**kw)
        self.alpha, self.beta, self.w0 = alpha, beta, None

    def on_before_optimizer_step(self, optimizer):
        if self.w0 is None:
            self.w0 = {n: p.detach().clone() for n, p in self.backbone.named_parameters()}
        lr = optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            for n, p in self.backbone.named_parameters():
                p -= lr * self.alpha * (p - self.w0[n])
            for p in self.head.parameters():
                p -= lr * self.beta * p


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_decoupled_pull_matches_hand_update(optimizer):
    alpha, beta = 0.5, 0.1
    ref = HandDecoupled(alpha, beta, optimizer=optimizer, lr=0.05)
    quiet_trainer(max_steps=5).fit(ref)
    model = TinyClassifier(optimizer=optimizer, lr=0.05)
    quiet_trainer(max_steps=5, callbacks=[L2SP(alpha=alpha, beta=beta, decoupled=True)]).fit(model)
    assert_params_close(params_of(model), params_of(ref), rtol=1e-5, atol=1e-6)


def test_decoupled_differs_from_coupled_under_adam():
    ends = {}
    for decoupled in (False, True):
        model = TinyClassifier(optimizer="adamw", lr=0.05)
        quiet_trainer(max_steps=5, callbacks=[L2SP(alpha=1.0, decoupled=decoupled)]).fit(model)
        ends[decoupled] = params_of(model)
    assert any(not torch.allclose(ends[False][k], ends[True][k]) for k in ends[False])


def test_anchor_is_a_detached_fp32_copy_and_bf16_option():
    model = TinyClassifier()
    cb = L2SP(anchor_dtype="bfloat16")
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model)
    for n, a in cb.anchors.items():
        assert a.dtype == torch.bfloat16 and not a.requires_grad
        assert a.data_ptr() != model.get_parameter(n).data_ptr()
    cb32 = L2SP()
    quiet_trainer(max_steps=2, callbacks=[cb32]).fit(TinyClassifier())
    assert all(a.dtype == torch.float32 for a in cb32.anchors.values())
    assert not any(n.startswith("head.") for n in cb32.anchors)


def test_weight_decay_on_anchored_parameters_warns():
    with pytest.warns(UserWarning, match="moves the effective anchor"):
        quiet_trainer(max_steps=1, callbacks=[L2SP()]).fit(TinyClassifier(weight_decay=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        try:
            quiet_trainer(max_steps=1, callbacks=[L2SP()]).fit(TinyClassifier(weight_decay=0.0))
        except UserWarning as w:  # only our warning counts; Lightning's own data-loader hints are fine
            assert "anchor" not in str(w)


def test_penalty_is_logged():
    model = TinyClassifier()
    trainer = quiet_trainer(max_steps=3, callbacks=[L2SP(alpha=0.1, norm="l1")])
    trainer.fit(model)
    assert "l1sp/penalty" in trainer.callback_metrics
    assert float(trainer.callback_metrics["l1sp/penalty"]) > 0


def test_exclude_and_norm_bias_selection():
    cb = L2SP(exclude=[r"backbone\.1\."], include_norm_and_bias=False)
    quiet_trainer(max_steps=1, callbacks=[cb]).fit(TinyClassifier())
    assert set(cb.anchors) == {"backbone.0.0.weight"}


def test_bad_input_fails_before_training():
    with pytest.raises(ValueError, match="L2SP: alpha must be >= 0"):
        L2SP(alpha=-1)
    with pytest.raises(FileNotFoundError, match="Fisher file"):
        L2SP(fisher="/nonexistent/fisher.pt")
    model = TinyClassifier()
    with pytest.raises(AnatomyError, match="Unknown head 'haed'.*'head'"):
        quiet_trainer(max_steps=1, callbacks=[L2SP(head="haed")]).fit(model)
    with pytest.raises(AnatomyError, match="matches no parameter"):
        quiet_trainer(max_steps=1, callbacks=[L2SP(exclude=["nothing_like_this"])]).fit(model)
    assert model.global_step == 0


def test_mismatched_fisher_file_is_an_error(tmp_path):
    path = tmp_path / "f.pt"
    save_fisher({"backbone.0.0.weight": torch.ones(3, 3)}, path)
    model = TinyClassifier()
    with pytest.raises(ValueError, match="does not match the model"):
        quiet_trainer(max_steps=1, callbacks=[L2SP(fisher=str(path))]).fit(model)
    assert model.global_step == 0


def test_fisher_is_per_example_not_batch_mean():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x = torch.randn(10, 5)
    fisher = estimate_fisher(net, [x], chunk_size=4, seed=3, normalize=False)
    # reference: one backward pass per example with the same sampled labels
    gen = torch.Generator().manual_seed(3)
    ref = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    labels = []
    for chunk in x.split(4):
        probs = torch.softmax(net(chunk), -1).detach()
        labels += torch.multinomial(probs, 1, generator=gen).squeeze(1).tolist()
    for xi, yi in zip(x, labels):
        net.zero_grad()
        torch.log_softmax(net(xi[None]), -1)[0, yi].backward()
        for n, p in net.named_parameters():
            ref[n] += p.grad.square() / len(x)
    for n in ref:
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-4, atol=1e-7)
    # the squared batch-mean gradient is a different (smaller) quantity
    net.zero_grad()
    torch.stack([torch.log_softmax(net(xi[None]), -1)[0, yi] for xi, yi in zip(x, labels)]).mean().backward()
    assert net[0].weight.grad.square().sum() < 0.5 * fisher["0.weight"].sum()
    normalized = estimate_fisher(net, DataLoader(make_data(10, 5, 3), batch_size=5), seed=3)
    assert abs(float(torch.cat([f.flatten() for f in normalized.values()]).mean()) - 1.0) < 1e-5


def _distinct_fisher(module: nn.Module) -> dict[str, torch.Tensor]:
    """One constant per tensor (its index): a wrong match shows even where shapes agree."""
    return {n: torch.full_like(p, float(i + 1)) for i, (n, p) in enumerate(module.named_parameters())}


def test_fisher_takes_the_longest_suffix_torchvision_resnet(tmp_path):
    """``net.layer1.0.bn1.weight`` must get ``layer1.0.bn1.weight``, not the stem's ``bn1.weight`` (same shape)."""
    import torchvision

    model = ImageModule(torchvision.models.resnet18(num_classes=3))
    fisher = _distinct_fisher(model.net)  # estimated on the bare network: names lack the "net." prefix
    save_fisher(fisher, tmp_path / "fisher.pt")
    cb = L2SP(alpha=0.1, fisher=str(tmp_path / "fisher.pt"))
    quiet_trainer(max_steps=1, callbacks=[cb]).fit(model)
    assert "net.layer1.0.bn1.weight" in cb._names
    for name, f in zip(cb._names, cb._fisher):
        torch.testing.assert_close(f, fisher[name.removeprefix("net.")], rtol=0, atol=0, msg=name)


def test_fisher_of_the_bare_backbone_fits_transfer_classifier():
    """The README recipe: a Fisher estimated on build_backbone(..., num_classes=None) for TransferClassifier."""
    source, _ = build_backbone("efficientnet_lite0", num_classes=None, pretrained=False)
    fisher = _distinct_fisher(source)
    model = TransferClassifier("efficientnet_lite0", pretrained=False, num_classes=3)
    transferred, _, _ = select_parameters(model)
    matched = match_fisher(fisher, transferred)
    assert any(n == "backbone._blocks.0._bn1.weight" for n, _ in transferred)
    for (name, _), f in zip(transferred, matched):
        torch.testing.assert_close(f, fisher[name.removeprefix("backbone.")], rtol=0, atol=0)


def test_fisher_missing_an_entry_is_not_filled_by_a_shorter_one():
    params = [("backbone.conv1.weight", torch.zeros(2)), ("backbone.layer1.0.bn1.weight", torch.zeros(2))]
    with pytest.raises(ValueError, match=r"only a shorter entry fits.*layer1\.0\.bn1\.weight got 'bn1\.weight'"):
        match_fisher({"conv1.weight": torch.ones(2), "bn1.weight": torch.ones(2)}, params)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
    ({"alpha": float("inf")}, ValueError, "alpha must be a finite number"),
    ({"alpha": -0.1}, ValueError, "alpha must be >= 0"),
    ({"alpha": True}, TypeError, "alpha must be a real number"),
    ({"alpha": "0.1"}, TypeError, "alpha must be a real number"),
    ({"beta": float("nan")}, ValueError, "beta must be a finite number"),
    ({"beta": -1.0}, ValueError, "beta must be >= 0"),
    ({"norm": "l3"}, ValueError, "norm must be one of 'l2', 'l1', 'group_lasso'"),
    ({"anchor_dtype": "float16"}, ValueError, "anchor_dtype must be one of"),
    ({"exclude": "backbone"}, TypeError, "exclude must be a list of strings"),
    ({"exclude": [1]}, TypeError, "exclude must be a list of strings"),
    ({"include_norm_and_bias": 0}, TypeError, "include_norm_and_bias must be True or False"),
    ({"decoupled": "yes"}, TypeError, "decoupled must be True or False"),
    ({"fused": None}, TypeError, "fused must be True or False"),
    ({"fisher": 3}, TypeError, "fisher must be a string or None"),
    ({"fisher": "/nonexistent/fisher.pt"}, FileNotFoundError, "Fisher file"),
    ({"head": 5}, TypeError, "head must be a string or None"),
])
def test_every_argument_is_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        L2SP(**kwargs)


def test_nan_alpha_no_longer_trains_to_nan():
    with pytest.raises(ValueError, match="finite"):
        quiet_trainer(max_steps=2, callbacks=[L2SP(alpha=float("nan"))]).fit(TinyClassifier())


def test_sharded_strategy_is_refused_at_setup():
    trainer = types.SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(ValueError, match="L2SP does not support FSDPStrategy"):
        L2SP().setup(trainer, TinyClassifier(), "fit")
