"""The wrong-kind column of the contract: module names that exist but name the wrong kind of module.

Every callback taking ``head=``, ``blocks=`` or ``layers=`` (found from the signatures, so a new one joins
without a new test) is given names of real modules of the wrong kind: a head that is a BatchNorm, a
backbone block or a parameter-free layer; a block that is the head, part of it, or holds no parameter;
a DELTA layer that is a dropout or a loss. Each must fail with an error that names the problem, before
the first training step. What must still be accepted is tried too: an MLP head, a 1x1-conv head.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import nn

import lightning_transfer.callbacks as callbacks_module
from lightning_transfer import AnatomyError, FeatureMapRegularization, find_head
from tests.contract.test_bad_arguments import COMPANIONS, REQUIRED
from tests.helpers import ImageModule, TinyClassifier, quiet_trainer

KINDS = ("head", "blocks", "layers")
CALLBACKS = [cls for cls in (getattr(callbacks_module, n) for n in callbacks_module.__all__)
             if any(k in inspect.signature(cls).parameters for k in KINDS)]


class Model(TinyClassifier):
    """TinyClassifier (``backbone.0`` = Linear, BatchNorm1d, ReLU; ``backbone.1`` = Linear, ReLU; ``head``)
    with a dropout at the end of the backbone (``backbone.1.2``) and a loss module (``loss``)."""

    def __init__(self, mlp_head: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backbone[1].append(nn.Dropout(0.1))
        self.loss = nn.CrossEntropyLoss()
        if mlp_head:
            self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, self.classes))


# argument -> [(value, the problem the message must name, a rejected name the candidates must not offer)]
NOT_A_HEAD = r"head='{}' is not a classifier layer \({}\)"
WRONG = {
    "head": [
        ("backbone.0.1", NOT_A_HEAD.format(r"backbone\.0\.1", "BatchNorm1d")
         + r": .*Linear.*Candidates: 'head' \(the auto-detected head", None),
        ("backbone.0", NOT_A_HEAD.format(r"backbone\.0", "Sequential ending in BatchNorm1d"), None),
        ("backbone.1.2", NOT_A_HEAD.format(r"backbone\.1\.2", "Dropout, with no parameter"), None),
    ],
    "blocks": [
        (["backbone.0", "head", "backbone.1"], r"The head is not a block: blocks entry 'head' names the head",
         None),
        (["backbone.0", "backbone.1", "head.weight"],
         r"The head is not a block: .*'head\.weight' names a part of the head 'head'", None),
        (["backbone.0.2", "backbone.0", "backbone.1"],
         r"'backbone\.0\.2' is a ReLU, which holds no parameter", "backbone.0.2"),
    ],
    "layers": [
        (["backbone.0", "backbone.1.2"],
         r"layers entry 'backbone\.1\.2' is a Dropout: .*noise.*layer before it", None),
        (["loss"], r"layers entry 'loss' is a loss \(CrossEntropyLoss\)", None),
    ],
}


def _cases():
    for cls in CALLBACKS:
        for arg in (k for k in KINDS if k in inspect.signature(cls).parameters):
            for value, problem, rejected in WRONG[arg]:
                yield pytest.param(cls, arg, value, problem, rejected, id=f"{cls.__name__}-{arg}-{value!r}")


def _kwargs(cls: type, arg: str, value) -> dict:
    required = REQUIRED.get(cls.__name__, {})
    return {**{k: v for k, v in required.items() if k != arg}, arg: value}


def test_every_callback_with_module_names_is_covered():
    names = {cls.__name__ for cls in CALLBACKS}
    assert {"L2SP", "FreezeSchedule", "RIFLE", "WiSEFT", "MaxEntropyHeadInit", "RepresentationSimilarity",
            "FeatureMapRegularization"} <= names


@pytest.mark.parametrize("cls,arg,value,problem,rejected", list(_cases()))
def test_wrong_kind_fails_before_the_first_step(cls, arg, value, problem, rejected):
    model = Model()
    callbacks = [cls(**_kwargs(cls, arg, value)), *COMPANIONS.get(cls.__name__, list)()]
    trainer = quiet_trainer(max_epochs=6, limit_val_batches=1, callbacks=callbacks)
    with pytest.raises(AnatomyError) as info:
        trainer.fit(model)
    message = str(info.value)
    assert re.search(problem, message), f"the error does not name the problem {problem!r}: {message}"
    if rejected is not None:  # the candidates offered instead never include the name just rejected
        assert f"{rejected!r}" not in message.split("Candidates:", 1)[1], message
    assert model.global_step == 0


@pytest.mark.parametrize("cls", [c for c in CALLBACKS if "head" in inspect.signature(c).parameters],
                         ids=lambda c: c.__name__)
def test_an_mlp_head_is_accepted(cls):
    """A head that is an MLP (a Sequential ending in its logit layer) is still a head."""
    model = Model(mlp_head=True)
    callback = cls(**_kwargs(cls, "head", "head"))
    callbacks = [callback, *COMPANIONS.get(cls.__name__, list)()]
    # 12 epochs: room for RIFLE's default re-inits
    quiet_trainer(max_epochs=12, limit_train_batches=1, limit_val_batches=1, callbacks=callbacks).fit(model)
    assert model.global_step == 12


def test_a_1x1_conv_head_and_a_head_of_ones_own_class_are_accepted():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert find_head(ImageModule(net), "net.3")[1] is net[3]
    with pytest.raises(AnatomyError, match=r"\(Conv2d with a 3x3 kernel\)"):  # a stem conv is no head
        find_head(ImageModule(net), "net.0")

    class CosineHead(nn.Module):  # no Linear inside: its own weight matrix
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(self.weight, dim=-1).t()

    model = nn.Sequential(nn.Linear(4, 8), CosineHead())
    assert find_head(model, "1")[1] is model[1]


def test_the_whole_network_is_no_head():
    model = Model(mlp_head=True)
    with pytest.raises(AnatomyError, match=r"head='' is not a classifier layer \(Model, the whole network"):
        find_head(model, "")
    model.backbone.requires_grad_(False)  # linear probing: the MLP head holds every trainable parameter
    assert find_head(model, "head")[1] is model.head


def test_delta_on_the_head_is_accepted_with_a_warning():
    """Not meaningless (a head trained by an earlier linear probe has a reference worth keeping), but for a
    new head the reference is its random initialization: said, not refused."""
    model = Model()
    with pytest.warns(UserWarning, match=r"layers entry 'head' is the model's head 'head'.*random init"):
        quiet_trainer(max_steps=1, callbacks=[FeatureMapRegularization(["backbone.1", "head"])]).fit(model)
    assert model.global_step == 1
