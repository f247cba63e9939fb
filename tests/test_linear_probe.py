"""The converged linear probe: its math against scikit-learn, and its use on a model's own head features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader

from lightning_transfer.functional.linear_probe import fit_linear_probe, probe_accuracy, select_linear_probe
from lightning_transfer.probe import head_features, linear_probe, set_head_from_probe_
from tests.helpers import TinyClassifier, make_data


def _features(n=60, dim=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * torch.linspace(0.1, 20.0, dim) + 3.0  # uneven scales and offset
    y = (x @ torch.randn(dim, classes, generator=g) + torch.randn(n, classes, generator=g) * 5).argmax(1)
    return x, y


@pytest.mark.parametrize("l2", [1e-3, 1e-1, 1.0])
def test_probe_equals_sklearn_logistic_regression(l2):
    """Same objective as LogisticRegression(C=1/(l2·N)) on centred features divided by their RMS: same logits."""
    x, y = _features()
    weight, bias = fit_linear_probe(x, y, 3, l2)
    centred = x.double() - x.double().mean(0)
    z = (centred / centred.pow(2).mean().sqrt()).numpy()
    ref = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-12, max_iter=10_000).fit(z, y.numpy())
    ours = (x.double() @ weight.double().T + bias.double()).numpy()
    theirs = ref.decision_function(z)
    # logits are defined up to a per-row constant (softmax): compare centred logits
    centred = [a - a.mean(1, keepdims=True) for a in (ours, theirs)]
    np.testing.assert_allclose(centred[0], centred[1], atol=1e-3 * max(1.0, np.abs(centred[1]).max()))


def test_stronger_l2_shrinks_the_probe_and_weak_l2_fits_the_training_set():
    x, y = _features()
    w_weak, b_weak = fit_linear_probe(x, y, 3, 1e-4)
    w_strong, _ = fit_linear_probe(x, y, 3, 10.0)
    assert probe_accuracy(w_weak, b_weak, x, y) == 1.0  # 12 dims, 60 points, tiny penalty: separable fit
    assert w_strong.norm() < 0.2 * w_weak.norm()


def test_selection_keeps_the_best_validation_accuracy_and_breaks_ties_toward_stronger_l2():
    x, y = _features(n=80)
    vx, vy = _features(n=200, seed=1)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    fit = select_linear_probe(x, y, vx, vy, 3, grid)
    assert set(fit.val_acc_by_l2) == set(grid)
    assert fit.val_acc == max(fit.val_acc_by_l2.values()) == probe_accuracy(fit.weight, fit.bias, vx, vy)
    assert fit.l2 == max(l2 for l2, acc in fit.val_acc_by_l2.items() if acc == fit.val_acc)


@pytest.mark.parametrize(("call", "match"), [
    (lambda x, y: fit_linear_probe(x, y, 3, 0.0), "l2 must be > 0"),
    (lambda x, y: fit_linear_probe(x, y, 2, 1.0), "labels must lie in 0..1"),
    (lambda x, y: fit_linear_probe(x[:, 0], y, 3, 1.0), r"features must be \(N, D\)"),
    (lambda x, y: select_linear_probe(x, y, x, y, 3, ()), "l2_grid is empty"),
])
def test_bad_input_is_named(call, match):
    x, y = _features()
    with pytest.raises(ValueError, match=match):
        call(x, y)


def test_head_features_are_the_head_input_in_eval_mode_and_modes_are_restored():
    model = TinyClassifier()
    model.train()
    loader = DataLoader(make_data(40), batch_size=16)
    feats, labels = head_features(model, loader)
    assert model.training and model.backbone[0][1].training
    x, y = make_data(40).tensors
    model.eval()
    torch.testing.assert_close(model.head(feats), model(x))
    torch.testing.assert_close(labels, y)


def test_linear_probe_sets_a_head_with_the_probe_validation_accuracy():
    model = TinyClassifier()
    train, val = model.train_dataloader(), model.val_dataloader()
    fit = linear_probe(model, train, val, l2_grid=(1e-3, 1e-1))
    set_head_from_probe_(model, fit)
    model.eval()
    x, y = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
    assert float((model(x).argmax(1) == y).float().mean()) == pytest.approx(fit.val_acc)


def test_head_without_linear_layer_is_refused():
    model = TinyClassifier()
    model.head = torch.nn.Conv1d(32, 4, 1)
    with pytest.raises(TypeError, match="needs a Linear final head layer"):
        head_features(model, model.val_dataloader(), head="head")


def test_lite0_head_features_give_the_model_logits():
    """The benchmarks read accuracy off cached features: they must be exactly what the head sees."""
    from lightning_transfer import TransferClassifier

    torch.manual_seed(0)
    model = TransferClassifier("efficientnet_lite0", num_classes=3, pretrained=False)
    x = torch.rand(8, 3, 32, 32)
    feats, _ = head_features(model, [(x, torch.zeros(8, dtype=torch.long))])
    assert model.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.backbone._fc(feats), model(x), rtol=1e-5, atol=1e-5)


def test_probe_that_does_not_fit_the_head_and_empty_loaders_are_named():
    model = TinyClassifier()
    fit = linear_probe(model, model.train_dataloader(), model.val_dataloader(), l2_grid=(1e-1,))
    other = TinyClassifier(classes=3)
    with pytest.raises(ValueError, match=r"probe's weight \(4, 32\) does not fit the head layer's \(3, 32\)"):
        set_head_from_probe_(other, fit)
    with pytest.raises(ValueError, match="head_features: the loader yielded no batch"):
        head_features(model, [])
