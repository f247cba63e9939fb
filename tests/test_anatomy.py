"""The anatomy contract, enforced across architectures: find the head, list the blocks in forward order."""

import pytest
import torch
import torchvision
from torch import nn

from lightning_transfer.anatomy import AnatomyError, BlockGroup, final_linear, find_head, list_blocks
from lightning_transfer.model import build_backbone

NUM_CLASSES = 7


def _tv(name, **kw):
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kw)


def _timm(name):
    def make():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)

    return make


ARCHITECTURES = {
    "resnet18": (_tv("resnet18"), 64),
    "resnet50": (_tv("resnet50"), 64),
    "efficientnet_b0": (_tv("efficientnet_b0"), 64),
    "mobilenet_v2": (_tv("mobilenet_v2"), 64),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64),
    "convnext_tiny": (_tv("convnext_tiny"), 64),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(weights=None, num_classes=NUM_CLASSES, image_size=32), 32),
    "swin_t": (_tv("swin_t"), 64),
    "vgg11": (_tv("vgg11"), 64),
    "densenet121": (_tv("densenet121"), 64),
    "googlenet_no_aux": (_tv("googlenet", aux_logits=False, init_weights=False), 64),
    "inception_v3_no_aux": (_tv("inception_v3", aux_logits=False, init_weights=False), 80),
    "efficientnet_lite0": (lambda: build_backbone("efficientnet_lite0", NUM_CLASSES, pretrained=False)[0], 64),
    "timm_resnet18": (_timm("resnet18"), 64),
    "timm_vit_tiny": (_timm("vit_tiny_patch16_224"), 224),
    "timm_convnext_atto": (_timm("convnext_atto"), 64),
}


def _forward_order(model: nn.Module, size: int) -> list[int]:
    """Ids of parametrized leaf modules in the order their forward first ran."""
    order: list[int] = []
    hooks = []
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            hooks.append(m.register_forward_hook(lambda mod, i, o: order.append(id(mod)) if id(mod) not in order else None))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    for h in hooks:
        h.remove()
    return order, out


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_head_and_blocks_contract(arch):
    make, size = ARCHITECTURES[arch]
    model = make()
    name, head = find_head(model)
    assert model.get_submodule(name) is head

    # the head is what produces the logits: its output is the model's output
    captured = {}
    handle = head.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    order, logits = _forward_order(model, size)
    handle.remove()
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.equal(captured["out"].flatten(1), logits)

    blocks = list_blocks(model)
    assert blocks[-1][1] is head and blocks[-1][0] == name
    assert len({n for n, _ in blocks}) == len(blocks), "block names are unique"

    # every parameter belongs to exactly one block
    seen: dict[int, str] = {}
    for bname, block in blocks:
        for p in block.parameters():
            assert id(p) not in seen, f"parameter in both {seen[id(p)]} and {bname}"
            seen[id(p)] = bname
    assert set(seen) == {id(p) for p in model.parameters()}

    # blocks follow forward order: the first leaf of each block runs after the previous block's first
    position = {mid: i for i, mid in enumerate(order)}
    firsts = []
    for bname, block in blocks:
        leaves = [position[id(m)] for m in block.modules() if id(m) in position]
        assert leaves, f"block {bname} never ran in forward"
        firsts.append(min(leaves))
    assert firsts == sorted(firsts), [n for n, _ in blocks]


def test_known_block_names():
    assert [n for n, _ in list_blocks(torchvision.models.resnet18(weights=None))] == [
        "stem", "layer1", "layer2", "layer3", "layer4", "fc"
    ]
    lite = build_backbone("efficientnet_lite0", NUM_CLASSES, pretrained=False)[0]
    assert [n for n, _ in list_blocks(lite)] == ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["conv_head", "_fc"]
    assert find_head(torchvision.models.mobilenet_v3_small(weights=None))[0] == "classifier.3"


def test_wrapped_model_gets_prefixed_names():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18(weights=None, num_classes=3)
            self.loss = nn.CrossEntropyLoss()

    w = Wrapper()
    assert find_head(w)[0] == "net.fc"
    assert [n for n, _ in list_blocks(w)][:2] == ["net.stem", "net.layer1"]


def test_explicit_names_and_regexes():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    blocks = list_blocks(model, blocks=["0", r"[2]"], head="3")
    assert [n for n, _ in blocks] == ["0", "[2]", "3"]
    assert blocks[1][1] is model[2]
    # a regex spanning several modules becomes a group of references, not copies
    blocks = list_blocks(model, blocks=[r"[02]"], head="3")
    group = blocks[0][1]
    assert isinstance(group, BlockGroup)
    assert {id(p) for p in group.parameters()} == {id(p) for p in [*model[0].parameters(), *model[2].parameters()]}


def test_explicit_head_wins_and_mlp_final_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    name, head = find_head(model, "1")
    assert name == "1" and final_linear(head) is model[1][2]


def test_unknown_head_lists_candidates():
    with pytest.raises(AnatomyError, match=r"Unknown head 'fcc'.*'fc'"):
        find_head(torchvision.models.resnet18(weights=None), "fcc")


def test_unknown_block_lists_candidates():
    with pytest.raises(AnatomyError, match=r"match no parameter.*Candidates: .*'layer1'"):
        list_blocks(torchvision.models.resnet18(weights=None), blocks=["layer9", "conv1", "bn1", "layer1"])


def test_uncovered_parameters_are_an_error():
    with pytest.raises(AnatomyError, match="belong to no listed block"):
        list_blocks(torchvision.models.resnet18(weights=None), blocks=["layer1"])


def test_aux_heads_are_rejected_with_the_fix():
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    with pytest.raises(AnatomyError, match="aux_logits=False"):
        list_blocks(model)


def test_model_without_linear_needs_explicit_head():
    with pytest.raises(AnatomyError, match="head="):
        find_head(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
