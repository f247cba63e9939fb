"""Anatomy of ``torch.compile``-d networks: plain names, both spellings accepted, a compiled alias counted once.

``torch.compile(net)`` puts ``net`` under ``_orig_mod``; nothing here is called, so nothing compiles.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from lightning_transfer import AnatomyError, build_param_groups, find_head, list_blocks
from lightning_transfer.anatomy import plain_name, relative_name, resolve_module
from lightning_transfer.callbacks.base import select_parameters
from tests.helpers import ImageModule, TinyClassifier


def _names(blocks):
    return [n for n, _ in blocks]


def _tiny(compiled: bool) -> TinyClassifier:
    model = TinyClassifier()
    if compiled:
        model.backbone, model.head = torch.compile(model.backbone), torch.compile(model.head)
    return model


class Aliased(ImageModule):
    """The network and its compiled alias, as a user keeps both (``self.fwd`` for speed)."""

    def __init__(self, net: nn.Module, alias_first: bool = False):
        super().__init__(net)
        if alias_first:  # the alias registered first: named_parameters() spell it
            del self.net
            self.fwd = torch.compile(net)
            self.net = net
        else:
            self.fwd = torch.compile(net)


NETS = {
    "tiny": lambda: (_tiny(False), _tiny(True)),
    "resnet18": lambda: (ImageModule(torchvision.models.resnet18(num_classes=3)),
                         ImageModule(torch.compile(torchvision.models.resnet18(num_classes=3)))),
    "timm_resnet18": lambda: (ImageModule(timm.create_model("resnet18", num_classes=3)),
                              ImageModule(torch.compile(timm.create_model("resnet18", num_classes=3)))),
    "compiled_itself": lambda: (torchvision.models.resnet18(num_classes=3),
                                torch.compile(torchvision.models.resnet18(num_classes=3))),
    "alias": lambda: (ImageModule(torchvision.models.resnet18(num_classes=3)),
                      Aliased(torchvision.models.resnet18(num_classes=3))),
}


@pytest.mark.parametrize("net", list(NETS))
def test_a_compiled_network_has_the_head_and_blocks_of_the_plain_one(net):
    plain, compiled = NETS[net]()
    assert find_head(compiled)[0] == find_head(plain)[0]
    blocks = _names(list_blocks(plain))
    assert _names(list_blocks(compiled)) == blocks
    # the names round-trip, and the wrapped spelling of a block names the same parameters
    again = list_blocks(compiled, blocks=blocks[:-1])
    assert _names(again) == blocks
    if net in ("tiny", "resnet18"):
        prefix = "backbone" if net == "tiny" else "net"
        wrapped = [b.replace(f"{prefix}.", f"{prefix}._orig_mod.") for b in blocks[:-1]]
        spelled = list_blocks(compiled, blocks=wrapped)
        assert _names(spelled) == blocks
        assert [[id(p) for p in m.parameters()] for _, m in spelled] == [[id(p) for p in m.parameters()] for _, m in again]


def test_either_spelling_resolves_to_the_same_layer_and_errors_list_plain_names():
    model = ImageModule(torch.compile(torchvision.models.resnet18(num_classes=3)))
    assert resolve_module(model, "net.layer1") is resolve_module(model, "net._orig_mod.layer1")
    with pytest.raises(AnatomyError, match="Unknown layer 'net.layer9'") as err:
        resolve_module(model, "net.layer9", "layer")
    assert "'net.layer4'" in str(err.value) and "_orig_mod" not in str(err.value)
    with pytest.raises(AnatomyError, match="match no parameter") as err:
        list_blocks(_tiny(True), blocks=["backbone.7"])
    assert "'backbone.1'" in str(err.value) and "_orig_mod" not in str(err.value)


@pytest.mark.parametrize("alias_first", [False, True])
def test_a_compiled_alias_is_the_same_head_once(alias_first):
    """``self.net = net; self.fwd = torch.compile(net)``: one network, not two heads."""
    model = Aliased(torchvision.models.resnet18(num_classes=3), alias_first)
    name, head = find_head(model)
    assert head is model.net.fc and name == ("fwd.fc" if alias_first else "net.fc")
    blocks = list_blocks(model)
    assert len(blocks) == 6 and blocks[-1][1] is model.net.fc
    assert sum(p.numel() for _, b in blocks for p in b.parameters()) == sum(p.numel() for p in model.net.parameters())


def test_layer_decay_of_a_compiled_timm_model_is_timms():
    plain = ImageModule(timm.create_model("resnet18", num_classes=3))
    compiled = ImageModule(torch.compile(timm.create_model("resnet18", num_classes=3)))
    groups = [(g["name"], g["lr"]) for g in build_param_groups(plain, 1.0, 0.0, layer_decay=0.5)]
    assert [(g["name"], g["lr"]) for g in build_param_groups(compiled, 1.0, 0.0, layer_decay=0.5)] == groups


def test_exclude_regexes_match_the_plain_names_of_a_compiled_model():
    transferred, _, head = select_parameters(_tiny(True), exclude=[r"backbone\.0\."])
    assert head == "head"
    assert [plain_name(n) for n, _ in transferred] == ["backbone.1.0.weight", "backbone.1.0.bias"]
    with pytest.raises(AnatomyError, match="Parameter names look like: backbone.0.0.weight"):
        select_parameters(_tiny(True), exclude=["zzz"])


def test_relative_names_ignore_the_wrapper():
    assert relative_name("net.layer1.0", "net._orig_mod") == "layer1.0"
    assert relative_name("net._orig_mod.layer1", "net") == "layer1"
    assert relative_name("net.layer1", "") == "net.layer1"
    assert relative_name("net", "net") is None and relative_name("head.fc", "net") is None
    assert plain_name("net._orig_mod.conv1|net._orig_mod.bn1") == "net.conv1|net.bn1"
