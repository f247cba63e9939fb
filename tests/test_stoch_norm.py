"""StochNorm: the functional forward against the rule written plainly, and the callback's swap and masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_transfer import StochNorm
from lightning_transfer.functional.stoch_norm import stoch_norm, stoch_norm_masks
from tests.helpers import StopAfter, TinyClassifier, destroy_process_group, quiet_trainer


def _plain_rule(x, mean, var, weight, bias, use_running, eps):
    """Per channel: normalize with (mean, var) given, or with the batch's mean and biased variance."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        xc = x[:, c]
        if use_running[c]:
            m, v = mean[c], var[c]
        else:
            m, v = xc.mean(), xc.var(unbiased=False)
        out[:, c] = (xc - m) / torch.sqrt(v + eps) * weight[c] + bias[c]
    return out


@pytest.mark.parametrize("shape", [(8, 5), (6, 5, 3, 4)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_forward_follows_the_rule_and_running_stats_update_as_batchnorm(shape, momentum):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 2
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(5, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    reference = nn.BatchNorm1d(5) if len(shape) == 2 else nn.BatchNorm2d(5)
    reference.load_state_dict(bn.state_dict())
    reference.momentum = momentum
    use_running = torch.tensor([True, False, False, True, False])
    expected = _plain_rule(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, use_running, bn.eps)
    factor = 0.1 if momentum is None else momentum  # the callback's layer passes 1/num_batches_tracked
    reference.momentum = factor
    out = stoch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, use_running, factor, bn.eps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    reference.train()(x)  # BatchNorm's own update of the running statistics, every channel
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    torch.testing.assert_close(bn.running_var, reference.running_var)


def test_gradient_flows_through_the_chosen_branch_only():
    x = torch.randn(16, 3, requires_grad=True)
    bn = nn.BatchNorm1d(3)
    all_running = stoch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, torch.ones(3, dtype=torch.bool),
                             0.1, bn.eps)
    (g,) = torch.autograd.grad(all_running.sum(), x)  # running statistics: an affine map of x
    torch.testing.assert_close(g, bn.weight.detach().expand(16, 3) / (1 + bn.eps) ** 0.5)
    all_batch = stoch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, torch.zeros(3, dtype=torch.bool),
                           0.1, bn.eps)
    (g,) = torch.autograd.grad(all_batch.sum(), x)  # batch statistics: the sum of a normalized column is constant
    assert g.abs().max() < 1e-5


def test_masks_are_a_function_of_seed_epoch_and_batch_with_rate_p():
    a = stoch_norm_masks([300, 200], 0.3, seed=1, epoch=0, batch=5)
    assert all(torch.equal(x, y) for x, y in zip(a, stoch_norm_masks([300, 200], 0.3, seed=1, epoch=0, batch=5)))
    for other in ((2, 0, 5), (1, 1, 5), (1, 0, 6)):
        assert not torch.equal(torch.cat(a), torch.cat(stoch_norm_masks([300, 200], 0.3, *other)))
    assert abs(float(torch.cat(a).float().mean()) - 0.3) < 0.06
    state = torch.get_rng_state()
    stoch_norm_masks([4], 0.5, 0, 0, 0)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_callback_swaps_in_fit_restores_after_and_keeps_state_dict_keys():
    model = TinyClassifier()
    keys = list(model.state_dict())
    seen = []

    class Probe(StopAfter):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            bn = pl_module.backbone[0][1]
            seen.append((type(bn).__name__, list(pl_module.state_dict()) == keys))

    cb = StochNorm(p=0.5, seed=3)
    quiet_trainer(max_epochs=1, callbacks=[cb, Probe(99)]).fit(model)
    assert seen and all(s == ("StochBatchNorm1d", True) for s in seen)
    assert type(model.backbone[0][1]) is nn.BatchNorm1d and list(model.state_dict()) == keys
    assert "stoch_mask" not in model.backbone[0][1].__dict__


def test_p_zero_is_batchnorm_and_p_one_normalizes_with_running_statistics():
    def fit(cbs):
        model = TinyClassifier()
        quiet_trainer(max_epochs=1, callbacks=cbs).fit(model)
        return model.state_dict()

    plain, zero, one = fit([]), fit([StochNorm(p=0.0, seed=0)]), fit([StochNorm(p=1.0, seed=0)])
    for k in plain:
        torch.testing.assert_close(zero[k], plain[k])
    assert not torch.allclose(one["backbone.0.0.weight"], plain["backbone.0.0.weight"])
    torch.testing.assert_close(one["backbone.0.1.num_batches_tracked"], plain["backbone.0.1.num_batches_tracked"])


def test_no_batchnorm_warns_and_changes_nothing():
    model = TinyClassifier(norm=False)
    with pytest.warns(UserWarning, match="found no BatchNorm"):
        quiet_trainer(max_epochs=1, callbacks=[StochNorm(seed=0)]).fit(model)


def test_sync_batchnorm_is_rejected_at_setup():
    model = TinyClassifier()
    try:
        with pytest.raises(ValueError, match="sync_batchnorm"):
            quiet_trainer(max_epochs=1, callbacks=[StochNorm()], strategy="ddp",
                          sync_batchnorm=True).fit(model)
    finally:
        destroy_process_group()  # the one-rank group Lightning initialized before setup
    assert model.global_step == 0
