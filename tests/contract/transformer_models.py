"""The contract suite's transformer families: tiny random-initialized models inside ``TransferClassifier``.

Seven families. Issue #16: a Hugging Face BERT on token ids (dict batches with padding), a Hugging Face
ViT, a timm ViT and a torchvision Swin on 3x32x32 float images. Issue #23: a Hugging Face Llama decoder
with a sequence-classification head on LEFT-padded token dicts (the decoder convention), and the same
tiny BERT wrapped by peft (``get_peft_model``, LoRA on query/value, the classifier in
``modules_to_save``) on right-padded token dicts; and the tiny Llama wrapped by peft the same way (LoRA
on q_proj/v_proj, the score head in ``modules_to_save``) on left-padded token dicts. Each is built from
a small config (the builders of tests/test_anatomy.py; nothing is downloaded), with dropout and stochastic depth off so that runs are
deterministic and gradient accumulation is exact. The data are learnable rules served by a
:class:`FamilyData` data module (``shuffle=False``: a resumed run sees the same batches).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_transfer import FeatureMapRegularization, TransferClassifier
from lightning_transfer.batches import batch_inputs, batch_labels
from tests.contract.registry import Entry, Model
from tests.test_anatomy import _TEXT, ARCHITECTURES, _hf, _timm

CLASSES = 3
VOCAB, SEQ = _TEXT["vocab_size"], 12
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
BERT = dict(hidden_size=16, num_hidden_layers=2, intermediate_size=32, **NO_DROPOUT, **_TEXT)
# the data draw token ids in [1, VOCAB) (0 pads), all inside Llama's vocabulary of 100
LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, attention_dropout=0.0)
LORA_PREFIX = "backbone.base_model.model."  # where peft puts the wrapped network


def _llama() -> nn.Module:
    """A tiny Llama sequence classifier whose pad token has a non-zero embedding, as when a tokenizer pads with
    its eos token: padded positions then carry hidden states that a callback must not count as features
    (with the zero row of ``padding_idx`` they would stay exactly 0 in every layer, and hide that)."""
    model = _hf("LlamaForSequenceClassification", "LlamaConfig", **LLAMA)()
    with torch.no_grad():
        model.model.embed_tokens.weight[LLAMA["pad_token_id"]].normal_()
    return model


def _lora_bert() -> nn.Module:
    """The hf_bert family's tiny BERT wrapped by peft: LoRA r=4 on query/value, the classifier trained in full."""
    import peft  # in the test extra: a missing peft fails here, never skips

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                             modules_to_save=["classifier"])
    return peft.get_peft_model(_hf("BertForSequenceClassification", "BertConfig", **BERT)(), config)


def _lora_llama() -> nn.Module:
    """The hf_llama family's tiny Llama (non-zero pad embedding) wrapped by peft: LoRA r=4 on q_proj/v_proj, the
    score head trained in full (``modules_to_save``)."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["score"])
    return peft.get_peft_model(_llama(), config)


def no_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout and stochastic-depth probability of ``model`` to 0 (deterministic training)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__ in ("StochasticDepth", "DropPath"):
            module.p = 0.0
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
    return model


@dataclass
class Family:
    """One transformer family: how to build its backbone, what its data are, what callbacks need to know."""

    make: Callable[[], nn.Module]
    text: bool
    model: Model  # head and two hidden-state layers (real module names inside TransferClassifier)
    channels: tuple[int, ...]  # size of each layer's channel (last) dim, for DELTA's attention
    padding: str = "right"  # token families: which side the padding goes (decoders pad on the left)


FAMILIES: dict[str, Family] = {
    "hf_bert": Family(
        _hf("BertForSequenceClassification", "BertConfig", **BERT),
        text=True, channels=(16, 16),
        model=Model("backbone.classifier", ("backbone.bert.encoder.layer.0", "backbone.bert.encoder.layer.1"))),
    # a decoder: causal attention, the score read at the last real token, LEFT padding
    "hf_llama": Family(
        _llama, text=True, channels=(32, 32), padding="left",
        model=Model("backbone.score", ("backbone.model.layers.0", "backbone.model.layers.1"))),
    # the head is the trained modules_to_save copy (TransferClassifier replaces it for CLASSES); the base is frozen
    "peft_lora_bert": Family(
        _lora_bert, text=True, channels=(16, 16),
        model=Model(f"{LORA_PREFIX}classifier.modules_to_save.default",
                    (f"{LORA_PREFIX}bert.encoder.layer.0", f"{LORA_PREFIX}bert.encoder.layer.1"))),
    # the LoRA decoder: hf_llama's model wrapped by peft, LEFT padding, the score head the modules_to_save copy
    "peft_lora_llama": Family(
        _lora_llama, text=True, channels=(32, 32), padding="left",
        model=Model(f"{LORA_PREFIX}score.modules_to_save.default",
                    (f"{LORA_PREFIX}model.layers.0", f"{LORA_PREFIX}model.layers.1"))),
    "hf_vit": Family(
        _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, **NO_DROPOUT),
        text=False, channels=(16, 16), model=Model("backbone.classifier", ("backbone.vit.layers.0", "backbone.vit.layers.1"))),
    "timm_vit": Family(
        _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=16, num_heads=2),
        text=False, channels=(16, 16), model=Model("backbone.head", ("backbone.blocks.0", "backbone.blocks.1"))),
    # (batch, H, W, channels) maps: channels last in 4-D (a stage, and the final LayerNorm). Not the first stage
    # (features.1, 8x8x16 from the patch embedding): there bf16-mixed moves DELTA's update by 21% (6% at lr 3e-4)
    "tv_swin": Family(ARCHITECTURES["swin_tiny"][0], text=False, channels=(32, 32),
                      model=Model("backbone.head", ("backbone.features.3", "backbone.norm"))),
}


class _TokenData(Dataset):
    """Hugging Face style examples ``{"input_ids", "attention_mask", "labels"}`` of unequal lengths, padded to
    ``SEQ`` tokens on the right or (``side="left"``) on the left."""

    def __init__(self, n: int, seed: int, side: str = "right") -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)
        real = torch.arange(SEQ) >= SEQ - lengths[:, None] if side == "left" else torch.arange(SEQ) < lengths[:, None]
        self.mask = real.long()
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g) * self.mask  # 0: the pad token
        # the label: which third of the vocabulary the real (unpadded) tokens fall in most often
        thirds = torch.div(self.ids - 1, (VOCAB - 1 + CLASSES - 1) // CLASSES, rounding_mode="floor").clamp(0, CLASSES - 1)
        counts = F.one_hot(thirds, CLASSES).mul(self.mask[..., None]).sum(1)
        self.labels = counts.argmax(1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _images(n: int, seed: int) -> TensorDataset:
    """3x32x32 images in [0, 1]; the label is the brightest channel (a rule the models can learn)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    return TensorDataset(x, x.mean((2, 3)).argmax(1))


class FamilyData(LightningDataModule):
    """A family's deterministic train/val data (``n`` training examples in batches of ``batch_size``)."""

    def __init__(self, family: str, n: int = 32, batch_size: int = 16) -> None:
        super().__init__()
        self.text, self.side, self.n, self.batch_size = FAMILIES[family].text, FAMILIES[family].padding, n, batch_size

    def _data(self, n: int, seed: int) -> Dataset:
        return _TokenData(n, seed, self.side) if self.text else _images(n, seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._data(self.n, 0), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._data(16, 1), batch_size=8)


LR, DELTA_LR = 0.02, 1e-3


def lr_for(entry: Entry) -> float:
    """The LR a registry entry trains at: ``LR``, large enough that a wrong regularizer gradient or state shows.

    DELTA gets ``DELTA_LR``: its penalty at the registry's ``alpha=1`` sums over every token and channel,
    and SGD with momentum diverges on it from LR ~5e-3 on these tiny random transformers (measured).
    """
    return DELTA_LR if any(isinstance(cb, FeatureMapRegularization) for cb in entry.make(Model())) else LR


def build(family: str, seed: int = 0, cls: type[TransferClassifier] = TransferClassifier, **kwargs: Any) -> TransferClassifier:
    """The family's tiny model in ``cls`` (TransferClassifier by default): SGD at a constant LR, no weight decay."""
    torch.manual_seed(seed)
    backbone = no_dropout(FAMILIES[family].make())
    args = dict(num_classes=CLASSES, optimizer="sgd", lr=LR, weight_decay=0.0, scheduler="constant")
    return cls(backbone, **{**args, **kwargs})


class LossReference(TransferClassifier):
    """TransferClassifier whose loss adds ``extra_loss(module)``: the reference a regularizer's gradient must equal."""

    def __init__(self, backbone: nn.Module, extra_loss: Callable | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.extra_loss = extra_loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss + self.extra_loss(self) if self.extra_loss is not None else loss


class FeaturePenaltyReference(TransferClassifier):
    """DELTA's penalty ``α/2·Σ_layers mean_batch ‖F − F0‖²`` put in the loss, for any backbone and batch.

    On token batches with an ``attention_mask``, ``‖F − F0‖²`` of a ``(B, T, C)`` output sums over the real
    tokens only (padding is no feature).

    ``F0`` comes from an eval-mode copy of the backbone taken at the first training step (the weights
    at fit start), run on the same inputs; a layer returning a tuple (Hugging Face) gives its first
    element, its hidden states. An independent implementation of FeatureMapRegularization.
    """

    def __init__(self, backbone: nn.Module, layers: tuple[str, ...] = (), alpha: float = 1.0, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.layers, self.alpha = layers, alpha
        self._frozen: list[nn.Module] = []  # a list: not registered as a submodule

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not self._frozen:
            self._frozen.append(copy.deepcopy(self.backbone).eval().requires_grad_(False))
        live: dict[str, torch.Tensor] = {}
        ref: dict[str, torch.Tensor] = {}

        def keep(into: dict, name: str) -> Callable:
            return lambda m, a, o: into.__setitem__(name, o[0] if isinstance(o, tuple) else o)

        hooks = [self.get_submodule(n).register_forward_hook(keep(live, n)) for n in self.layers]
        hooks += [self._frozen[0].get_submodule(n.split(".", 1)[1]).register_forward_hook(keep(ref, n))
                  for n in self.layers]
        inputs = batch_inputs(batch)
        logits = self(inputs)
        with torch.no_grad():
            self._frozen[0](**inputs) if isinstance(inputs, dict) else self._frozen[0](inputs)
        for h in hooks:
            h.remove()
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None

        def distance(f: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
            if mask is not None and f.ndim == 3 and f.shape[:2] == mask.shape:  # padding tokens are no features
                return (f - f0)[mask.bool()].square().sum() / f.shape[0]
            return (f - f0).square().flatten(1).sum(1).mean()

        penalty = sum(distance(live[n], ref[n]) for n in self.layers)
        return F.cross_entropy(logits, batch_labels(batch)) + self.alpha / 2 * penalty


class BSSReference(LossReference):
    """BSS's penalty ``η·Σ_{i≤k} σ_i²`` of the head's input, put in the loss and differentiated by autograd
    (through ``torch.linalg.svdvals``): an independent implementation of :class:`~lightning_transfer.BSS`
    (``extra_loss`` adds another callback's penalty, e.g. L2SP's, as in :class:`LossReference`)."""

    def __init__(self, backbone: nn.Module, head: str = "", eta: float = 0.5, k: int = 2, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        self.head_name, self.eta, self.k = head, eta, k

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        hook = self.get_submodule(self.head_name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        loss = super().training_step(batch, batch_idx)
        hook.remove()
        s = torch.linalg.svdvals(seen[0].reshape(seen[0].shape[0], -1).float())
        return loss + self.eta * s[-self.k:].square().sum()
