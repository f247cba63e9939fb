"""The anatomy contract, enforced across architectures: find the head, list the blocks in forward order."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader

from lightning_transfer import MaxEntropyHeadInit
from lightning_transfer.anatomy import AnatomyError, BlockGroup, final_linear, find_head, list_blocks
from lightning_transfer.model import build_backbone
from lightning_transfer.optim import build_param_groups
from tests.helpers import make_data, quiet_trainer

NUM_CLASSES = 7


def _tv(name, **kw):
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kw)


def _timm(name, **kw):
    def make():
        import timm
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw)

    return make


def _hf(model_cls, config_cls, **config):
    def make():
        import transformers  # imported on first use: it takes seconds
        transformers.logging.set_verbosity_error()  # tiny vocabularies make it warn about special tokens
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=NUM_CLASSES, **config))

    return make


def _images(size):
    return lambda: torch.randn(2, 3, size, size)


def _tokens():
    return torch.randint(1, 50, (2, 6))  # no pad token (0): a decoder's logits are its last position's


_TEXT = dict(vocab_size=50, num_attention_heads=2, max_position_embeddings=32, pad_token_id=0)
ARCHITECTURES = {
    "resnet18": (_tv("resnet18"), _images(64)),
    "resnet50": (_tv("resnet50"), _images(64)),
    "efficientnet_b0": (_tv("efficientnet_b0"), _images(64)),
    "mobilenet_v2": (_tv("mobilenet_v2"), _images(64)),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), _images(64)),
    "convnext_tiny": (_tv("convnext_tiny"), _images(64)),
    "vit_tiny": (lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=NUM_CLASSES
    ), _images(32)),
    "swin_tiny": (lambda: torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2], num_classes=NUM_CLASSES
    ), _images(32)),
    "vgg11": (_tv("vgg11"), _images(64)),
    "densenet121": (_tv("densenet121"), _images(64)),
    "googlenet_no_aux": (_tv("googlenet", aux_logits=False, init_weights=False), _images(64)),
    "inception_v3_no_aux": (_tv("inception_v3", aux_logits=False, init_weights=False), _images(80)),
    "efficientnet_lite0": (lambda: build_backbone("efficientnet_lite0", NUM_CLASSES, pretrained=False)[0], _images(64)),
    "timm_resnet18": (_timm("resnet18"), _images(64)),
    "timm_vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), _images(32)),
    "timm_convnext_atto": (_timm("convnext_atto"), _images(64)),
    "hf_bert": (_hf("BertForSequenceClassification", "BertConfig", hidden_size=16, num_hidden_layers=2,
                    intermediate_size=32, **_TEXT), _tokens),
    "hf_roberta": (_hf("RobertaForSequenceClassification", "RobertaConfig", hidden_size=16, num_hidden_layers=2,
                       intermediate_size=32, **{**_TEXT, "pad_token_id": 1}), _tokens),
    "hf_deberta_v2": (_hf("DebertaV2ForSequenceClassification", "DebertaV2Config", hidden_size=16, num_hidden_layers=2,
                          intermediate_size=32, **_TEXT), _tokens),
    "hf_gpt2": (_hf("GPT2ForSequenceClassification", "GPT2Config", n_embd=16, n_layer=2, n_head=2, n_positions=32,
                    vocab_size=50, pad_token_id=0), _tokens),
    "hf_llama": (_hf("LlamaForSequenceClassification", "LlamaConfig", hidden_size=16, intermediate_size=32,
                     num_hidden_layers=2, num_key_value_heads=1, **_TEXT), _tokens),
    "hf_vit": (_hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=16,
                   num_hidden_layers=2, num_attention_heads=2, intermediate_size=32), _images(32)),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch_model(request):
    """Each architecture built once for all the tests that use it (none of them changes the model)."""
    make, inputs = ARCHITECTURES[request.param]
    return make(), inputs


def _forward_order(model: nn.Module, inputs) -> tuple[list[int], torch.Tensor]:
    """Ids of parametrized leaf modules in the order their forward first ran, and the logits."""
    order: list[int] = []
    hooks = []
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            hooks.append(m.register_forward_hook(lambda mod, i, o: order.append(id(mod)) if id(mod) not in order else None))
    model.eval()
    with torch.no_grad():
        out = model(inputs())
    for h in hooks:
        h.remove()
    return order, getattr(out, "logits", out)


def test_head_and_blocks_contract(arch_model):
    model, inputs = arch_model
    name, head = find_head(model)
    assert model.get_submodule(name) is head

    # the head is what produces the logits: its output is the model's output
    captured = {}
    handle = head.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    order, logits = _forward_order(model, inputs)
    handle.remove()
    assert logits.shape == (2, NUM_CLASSES)
    out = captured["out"]
    out = out[:, -1] if out.ndim == 3 else out.flatten(1)  # a decoder scores every token, keeps the last
    assert torch.equal(out, logits)

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


def _param_ids(blocks):
    return [{id(p) for p in block.parameters()} for _, block in blocks]


def test_block_names_are_real_and_round_trip(arch_model):
    """Issue 14 #12: every name is a real module (or the |-join of real modules and parameters), and
    the names given back as ``blocks=`` give the same blocks in the same order."""
    model, _ = arch_model
    blocks = list_blocks(model)
    for bname, block in blocks:
        if isinstance(block, BlockGroup):
            assert "|" in bname or bname in dict(model.named_parameters()), bname
            for part in bname.split("|"):
                try:
                    model.get_submodule(part)
                except AttributeError:
                    model.get_parameter(part)  # a loose parameter (a class token): a real name too
        else:
            assert model.get_submodule(bname) is block, bname
    again = list_blocks(model, blocks=[n for n, _ in blocks][:-1])
    assert [n for n, _ in again] == [n for n, _ in blocks]
    assert _param_ids(again) == _param_ids(blocks)


def test_layer_decay_groups_on_every_architecture(arch_model):
    """build_param_groups (which uses list_blocks) covers each parameter once, lr decaying towards the input."""
    model, _ = arch_model
    groups = build_param_groups(model, 1.0, 0.01, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    lrs = [g["lr"] for g in groups]
    assert lrs == sorted(lrs) and lrs[-1] == 1.0  # decaying from the head down (exact scales: test_layer_decay.py)
    depth = len(list_blocks(model, fine=True)) - 1  # timm: its fine groups, as timm's layer decay
    assert lrs[0] in (0.5**depth, 0.5 ** (depth - 1))  # timm: a head norm (head.norm, fc_norm) shares the head's level


def _names(model, **kw):
    return [n for n, _ in list_blocks(model, **kw)]


def test_known_block_names():
    assert _names(torchvision.models.resnet18(weights=None)) == ["conv1|bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    lite = build_backbone("efficientnet_lite0", NUM_CLASSES, pretrained=False)[0]
    stages = ["_blocks.0", "_blocks.1|_blocks.2", "_blocks.3|_blocks.4", "_blocks.5|_blocks.6|_blocks.7",
              "_blocks.8|_blocks.9|_blocks.10", "_blocks.11|_blocks.12|_blocks.13|_blocks.14", "_blocks.15"]
    assert _names(lite) == ["_conv_stem|_bn0", *stages, "_conv_head|_bn1", "_fc"]
    assert find_head(torchvision.models.mobilenet_v3_small(weights=None))[0] == "classifier.3"


def test_block_names_issue_examples():
    """Issue 14 #12: the names the issue found wrong are now the real module names."""
    vit = ARCHITECTURES["vit_tiny"][0]()
    assert _names(vit) == ["class_token|conv_proj|encoder.pos_embedding", "encoder.layers.encoder_layer_0",
                           "encoder.layers.encoder_layer_1", "encoder.ln", "heads.head"]
    timm_vit = ARCHITECTURES["timm_vit_tiny"][0]()
    assert _names(timm_vit) == ["cls_token|pos_embed|patch_embed", "blocks.0", "blocks.1|norm", "head"]
    for arch, head in (("convnext_tiny", "classifier.2"), ("mobilenet_v3_small", "classifier.3")):
        model = torchvision.models.get_model(arch, weights=None)
        names = _names(model)
        assert names[-2:] == ["classifier.0", head]
        assert dict(list_blocks(model))["classifier.0"] is model.classifier[0]


HF_BLOCKS = {
    "hf_bert": ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler", "classifier"],
    "hf_roberta": ["roberta.embeddings", "roberta.encoder.layer.0", "roberta.encoder.layer.1", "classifier.dense",
                   "classifier.out_proj"],
    "hf_deberta_v2": ["deberta.embeddings", "deberta.encoder.layer.0", "deberta.encoder.layer.1", "pooler", "classifier"],
    "hf_gpt2": ["transformer.wte|transformer.wpe", "transformer.h.0", "transformer.h.1", "transformer.ln_f", "score"],
    "hf_llama": ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "score"],
    "hf_vit": ["vit.embeddings", "vit.layers.0", "vit.layers.1", "vit.layernorm", "classifier"],
}


class Wrapper(LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.loss = nn.CrossEntropyLoss()


@pytest.mark.parametrize("arch", list(HF_BLOCKS))
def test_hugging_face_head_and_blocks(arch):
    """Embeddings, each layer in order, final norm / pooler, then the head; also inside a LightningModule."""
    model = ARCHITECTURES[arch][0]()
    expected = HF_BLOCKS[arch]
    assert find_head(model)[0] == expected[-1]
    assert isinstance(find_head(model)[1], nn.Linear)
    assert _names(model) == expected
    wrapped = Wrapper(model)
    assert find_head(wrapped)[0] == f"model.{expected[-1]}"
    assert _names(wrapped) == ["|".join(f"model.{p}" for p in n.split("|")) for n in expected]


def test_wrapped_model_gets_prefixed_names():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18(weights=None, num_classes=3)
            self.loss = nn.CrossEntropyLoss()

    w = Wrapper()
    assert find_head(w)[0] == "net.fc"
    assert _names(w)[:2] == ["net.conv1|net.bn1", "net.layer1"]


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


# --- a frozen teacher or EMA copy next to the trained network (issue 14 #9) --------------------------


class Net(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x)))


class TwoNetworks(LightningModule):
    """A trained network and a copy of it (frozen unless ``frozen=False``), registered in the given order."""

    def __init__(self, trained="student", copy_name="teacher", copy_first=False, frozen=True, make=Net):
        super().__init__()
        torch.manual_seed(0)
        net = make()
        twin = copy.deepcopy(net).requires_grad_(not frozen)
        for name, module in ([(copy_name, twin), (trained, net)] if copy_first else [(trained, net), (copy_name, twin)]):
            self.add_module(name, module)
        self.trained = trained

    def forward(self, x):
        return getattr(self, self.trained)(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def train_dataloader(self):
        return DataLoader(make_data(), batch_size=16)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(), "student.fc"),  # the teacher registered after the student: was picked before the fix
        (dict(copy_first=True), "student.fc"),
        (dict(trained="model", copy_name="ema_model"), "model.fc"),
        (dict(trained="model", copy_name="ema_model", make=lambda: torchvision.models.resnet18(num_classes=3)), "model.fc"),
    ],
)
def test_frozen_copy_head_is_ignored(kwargs, expected):
    module = TwoNetworks(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_head(module)[0] == expected
        assert _names(module)[-1] == expected


def test_two_trainable_heads_are_ambiguous():
    with pytest.raises(AnatomyError, match=r"'student\.fc', 'teacher\.fc'.*head="):
        find_head(TwoNetworks(frozen=False))
    assert find_head(TwoNetworks(frozen=False), "teacher.fc")[0] == "teacher.fc"  # the way out


def test_explicit_frozen_head_warns():
    module = TwoNetworks()
    with pytest.warns(UserWarning, match=r"'teacher\.fc'.*no trainable parameter.*head="):
        find_head(module, "teacher.fc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_head(module, "student.fc")


def test_fallback_skips_a_frozen_last_linear_with_a_warning():
    module = TwoNetworks(make=lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
    with pytest.warns(UserWarning, match=r"'teacher\.2', is frozen; taking 'student\.2'"):
        assert find_head(module)[0] == "student.2"


def test_fallback_on_a_trainable_mlp_is_silent():
    """The last Linear of a wholly trainable MLP is its head, without a warning about frozen layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_head(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))[0] == "2"


def test_a_single_frozen_network_keeps_its_head():
    """A wholly frozen model (RepresentationSimilarity's reference copy) still has its head, silently."""
    model = torchvision.models.resnet18(weights=None).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_head(model)[0] == "fc"


def test_mei_zeroes_the_trained_head_not_the_teacher():
    """MEI after a run: the teacher's head untouched; the student's, zeroed then stepped once, has the
    bias of one SGD step from a uniform softmax: b = -lr * (1/K - class frequency of the batch)."""
    module = TwoNetworks()
    teacher = {n: p.clone() for n, p in module.teacher.named_parameters()}
    quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit()]).fit(module)
    assert all(torch.equal(p, teacher[n]) for n, p in module.teacher.named_parameters())
    y = make_data().tensors[1][:16]
    freq = torch.bincount(y, minlength=4).float() / len(y)
    torch.testing.assert_close(module.student.fc.bias.detach(), -0.1 * (0.25 - freq))
