"""BatchNorm statistics re-estimation: exact averages, frozen layers untouched, nothing leaks out."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_transfer import ArrayDataModule, TransferClassifier
from lightning_transfer.batchnorm import batchnorm_state_kept, reestimate_batchnorm


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))


def test_statistics_are_exact_over_all_samples_whatever_the_batch_sizes():
    net = _net().train()
    batches = [torch.randn(n, 3, 8, 8) * 3 + 1 for n in (6, 6, 1)]  # a small last batch counts as 1 image
    net[1].running_mean.fill_(123.0)
    assert reestimate_batchnorm(net, batches) == 2
    # reference: the first BatchNorm's input over all 13 images at once, its mean and unbiased variance
    feats = torch.cat([net[0](x) for x in batches]).detach()
    torch.testing.assert_close(net[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, feats.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-5)
    assert net[1].momentum == 0.1 and not net[1]._forward_pre_hooks  # nothing left behind


def test_eval_mode_layers_keep_their_statistics_and_max_batches_counts():
    net = _net().train()
    net[1].eval()  # a frozen block: training used these statistics
    before = net[1].running_mean.clone()
    assert reestimate_batchnorm(net, [(torch.randn(4, 3, 8, 8), 0)] * 5, max_batches=2) == 1
    assert torch.equal(net[1].running_mean, before)
    assert int(net[5].num_batches_tracked) == 2  # each forward counted its batch
    with pytest.raises(ValueError, match="no batches"):
        reestimate_batchnorm(net, [])


def test_state_kept_restores_statistics_modes_and_rng():
    net = _net().train()
    net[1].eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with batchnorm_state_kept(net):
        reestimate_batchnorm(net, [torch.randn(4, 3, 8, 8) for _ in range(2)])
        net.eval()
        assert not torch.equal(net[5].running_mean, state["5.running_mean"])
    assert torch.equal(torch.rand(3), expected)  # the RNG stream training would see is untouched
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert net.training and net[5].training and not net[1].training


def test_array_data_module_checks_its_input_and_splits_per_class():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 8, 8), dtype=np.uint8)
    labels = np.repeat([0, 1, 2], 20)
    dm = ArrayDataModule(images, labels, per_class=4, val_per_class=3, test_per_class=5, image_size=16)
    dm.setup()
    assert dm.num_classes == 3
    assert [len(dm._splits[s]) for s in ("train", "val", "test")] == [12, 9, 15]
    assert dm._splits["train"].images.shape[-2:] == (16, 16)
    with pytest.raises(ValueError, match="classes 0..C-1"):
        ArrayDataModule(images, labels + 1)
    with pytest.raises(ValueError, match="per_class must be at least 1"):
        ArrayDataModule(images, labels, per_class=0)
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataModule(images.astype(np.float32), labels)


def test_transfer_classifier_takes_a_users_pretrained_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))
    conv = net[0].weight.detach().clone()
    model = TransferClassifier(net, num_classes=3)
    assert model.backbone[4].out_features == 3  # new head
    assert torch.equal(model.backbone[0].weight, conv)  # transferred weights kept
    # the module itself is not saved as a hyperparameter (it would be pickled): only what it was
    assert model.hparams["backbone"] == "module:torch.nn.modules.container.Sequential"
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model(x), model.backbone(x))  # no normalization for a user's module
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        TransferClassifier(net, num_classes=1)
