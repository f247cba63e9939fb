"""TransferClassifier on transformers: Hugging Face text and image models (by module or ``hf:<name>``), dict
batches, ModelOutputs, and no image normalization of token ids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from lightning_transfer import L2SP, TransferClassifier
from tests.helpers import params_of, quiet_trainer

BERT = {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 16, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
VIT = {"image_size": 16, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 32, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def token_batches(n: int = 32, length: int = 10, batch_size: int = 8) -> DataLoader:
    """Dict batches with padding; label 1 when token 7 occurs among the real (unpadded) tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 40, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    plant = torch.rand(n, generator=g) < 0.5
    ids[plant, 1] = 7
    ids = ids * mask  # pad id 0
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": plant[i].long()} for i in range(n)]
    return DataLoader(rows, batch_size=batch_size)


def _bert(num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT, num_labels=num_labels))


def test_bert_with_dict_batches_trains_on_the_unnormalized_token_ids():
    module = TransferClassifier(_bert(5), num_classes=2, optimizer="adamw", lr=1e-3)
    assert module.backbone.classifier.out_features == 2  # a new head for the target classes
    seen = []
    module.backbone.bert.embeddings.word_embeddings.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    loader = token_batches()
    start = params_of(module)
    quiet_trainer(max_epochs=2, callbacks=[L2SP(alpha=0.1)]).fit(module, train_dataloaders=loader)
    first = next(iter(loader))
    assert torch.equal(seen[0], first["input_ids"])  # token ids reach the embedding untouched
    end = params_of(module)
    assert all(not torch.equal(start[k], end[k]) for k in ("backbone.bert.encoder.layer.0.attention.self.query.weight",
                                                             "backbone.classifier.weight"))


def test_forward_returns_logits_of_the_model_output_and_uses_the_attention_mask():
    module = TransferClassifier(_bert(), num_classes=3).eval()
    batch = next(iter(token_batches()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = module(inputs)
    assert isinstance(logits, torch.Tensor) and logits.shape == (8, 3)
    expected = module.backbone(**inputs).logits
    assert torch.equal(logits, expected)
    unmasked = module({**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])})
    assert not torch.allclose(unmasked, logits)  # the mask reaches the model


def test_the_training_loss_is_cross_entropy_of_the_logits():
    module = TransferClassifier(_bert(), num_classes=2, label_smoothing=0.0).eval()
    batch = next(iter(token_batches()))
    logged = {}
    module.log = lambda name, value, **kw: logged.setdefault(name, value)
    loss = module.training_step(batch, 0)
    reference = F.cross_entropy(module.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])
    assert torch.allclose(loss, reference)


def _save_hf(tmp_path, model, processor=None) -> str:
    model.save_pretrained(tmp_path)
    if processor is not None:
        processor.save_pretrained(tmp_path)
    return f"hf:{tmp_path}"


def test_hf_name_builds_a_sequence_classifier_with_a_new_head(tmp_path):
    source = _bert(num_labels=5)
    name = _save_hf(tmp_path, source)
    module = TransferClassifier(name, num_classes=3, pretrained=True)
    assert type(module.backbone).__name__ == "BertForSequenceClassification" and module.mean is None
    assert module.backbone.classifier.out_features == 3
    loaded, saved = params_of(module.backbone), params_of(source)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if not k.startswith("classifier"))
    scratch = TransferClassifier(name, num_classes=3, pretrained=False)
    assert not torch.equal(params_of(scratch.backbone)["bert.encoder.layer.0.output.dense.weight"],
                           saved["bert.encoder.layer.0.output.dense.weight"])


def test_hf_image_model_is_normalized_by_its_image_processor(tmp_path):
    torch.manual_seed(0)
    source = ViTForImageClassification(ViTConfig(**VIT, num_labels=4))
    processor = ViTImageProcessor(image_mean=[0.2, 0.3, 0.4], image_std=[0.5, 0.6, 0.7])
    module = TransferClassifier(_save_hf(tmp_path, source, processor), num_classes=2).eval()
    assert type(module.backbone).__name__ == "ViTForImageClassification"
    images = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1), torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    expected = module.backbone(pixel_values=(images - mean) / std).logits
    assert torch.allclose(module(images), expected)
    assert torch.allclose(module({"pixel_values": images}), expected)


def test_hf_image_model_without_a_processor_is_refused(tmp_path):
    torch.manual_seed(0)
    name = _save_hf(tmp_path, ViTForImageClassification(ViTConfig(**VIT)))
    with pytest.raises(ValueError, match="without an image processor"):
        TransferClassifier(name, num_classes=2)


def test_token_ids_given_to_an_image_backbone_are_refused():
    module = TransferClassifier("timm:vit_tiny_patch16_224", num_classes=2, pretrained=False)
    with pytest.raises(TypeError, match="token ids"):
        module(torch.randint(0, 10, (2, 3, 224, 224)))
