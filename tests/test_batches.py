"""Batches, outputs and data sources: the set-ups users bring (issue 14 #6).

Loaders passed to ``trainer.fit``, a DataModule, or the module's own hooks; ``(x, y)`` and dict
batches; modules returning a tensor or a ``ModelOutput``: MaxEntropyHeadInit, RepresentationSimilarity
and RIFLE must work on each, checked against references computed here independently.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from lightning_transfer.batches import (
    batch_inputs,
    batch_labels,
    batch_size_of,
    call_model,
    concat_inputs,
    logits_of,
    slice_inputs,
    train_loader_of,
    val_loader_of,
)
from lightning_transfer.callbacks import RIFLE, MaxEntropyHeadInit
from lightning_transfer.callbacks.similarity import RepresentationSimilarity
from lightning_transfer.functional.similarity import block_features
from tests.helpers import TinyClassifier, TinyDataModule, make_data, params_of, quiet_trainer

BERT_BLOCKS = ["model.bert.embeddings", "model.bert.encoder.layer.0", "model.bert.encoder.layer.1", "model.bert.pooler"]


class Bert(LightningModule):
    """A tiny Hugging Face classifier: dict batches in, ``ModelOutput`` out, no *_dataloader hooks."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, num_labels=3)
        self.model = BertForSequenceClassification(config)
        self.lr = lr

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def text_rows(n: int = 24, seed: int = 0, labels=None) -> list[dict]:
    """Dict examples with padding: example i has 3 + i % 5 real tokens out of 8."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 3 + i % 5
        ids = torch.randint(1, 50, (8,), generator=g)
        mask = (torch.arange(8) < length).long()
        label = torch.tensor(labels[i] if labels is not None else i % 3)
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": label})
    return rows


class NoHooks(TinyClassifier):
    """TinyClassifier without *_dataloader hooks: data only through ``trainer.fit(model, train, val)``."""

    train_dataloader = LightningModule.train_dataloader
    val_dataloader = LightningModule.val_dataloader


def tiny_loaders():
    return DataLoader(make_data(), batch_size=16), DataLoader(make_data(32, seed=1), batch_size=16)


class LoaderSpy(Callback):
    def __init__(self):
        self.seen = {}

    def setup(self, trainer, pl_module, stage):
        self.seen["setup"] = (train_loader_of(trainer), val_loader_of(trainer))

    def on_fit_start(self, trainer, pl_module):
        self.seen["fit_start"] = (train_loader_of(trainer), val_loader_of(trainer))


# ---------------------------------------------------------------- helpers of lightning_transfer.batches


def test_batch_helpers_on_tuple_and_dict_batches():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert batch_inputs((x, y)) is x and torch.equal(batch_labels((x, y)), y)
    batch = {"input_ids": torch.ones(4, 5, dtype=torch.long), "attention_mask": torch.ones(4, 5), "labels": y}
    assert set(batch_inputs(batch)) == {"input_ids", "attention_mask"}
    assert torch.equal(batch_labels(batch), y) and batch_size_of(batch_inputs(batch)) == 4
    part = slice_inputs(batch_inputs(batch), 2)
    assert part["input_ids"].shape == (2, 5)
    assert concat_inputs([part, part])["attention_mask"].shape == (4, 5)
    with pytest.raises(ValueError, match="without labels"):
        batch_labels({"input_ids": x})
    with pytest.raises(ValueError, match="different shapes.*Pad to one length"):
        concat_inputs([{"input_ids": torch.ones(2, 5)}, {"input_ids": torch.ones(2, 7)}])
    bert = Bert().model
    rows = text_rows(4)
    inputs = batch_inputs(torch.utils.data.default_collate(rows))
    out = call_model(bert, inputs)
    assert logits_of(out).shape == (4, 3) and logits_of((out.logits,)) is out.logits


@pytest.mark.parametrize("source", ["fit_loaders", "datamodule", "module_hooks"])
def test_loaders_of_fit_are_found_from_setup_on(source):
    """Lightning builds its own loaders only in fit_loop.run(), after on_fit_start: the helpers read the source."""
    spy = LoaderSpy()
    trainer = quiet_trainer(max_steps=1, callbacks=[spy])
    if source == "fit_loaders":
        train, val = tiny_loaders()
        trainer.fit(NoHooks(), train, val)
        assert spy.seen["setup"] == (train, val) and spy.seen["fit_start"] == (train, val)
        return
    if source == "datamodule":
        data = TinyDataModule()
        trainer.fit(TinyClassifier(), datamodule=data)
        expected = data.train_dataloader(), data.val_dataloader()
    else:
        model = TinyClassifier()
        trainer.fit(model)
        expected = model.train_dataloader(), model.val_dataloader()
    for stage in ("setup", "fit_start"):
        for found, ref in zip(spy.seen[stage], expected):
            assert isinstance(found, DataLoader)
            assert torch.equal(found.dataset.tensors[0], ref.dataset.tensors[0])


def test_loaders_of_fit_none_and_several():
    spy = LoaderSpy()
    train, val = tiny_loaders()
    quiet_trainer(max_steps=1, callbacks=[spy]).fit(NoHooks(), train)
    assert spy.seen["fit_start"] == (train, None)
    spy = LoaderSpy()
    second = DataLoader(make_data(16, seed=5), batch_size=8)
    quiet_trainer(max_steps=1, callbacks=[spy]).fit(NoHooks(), train, [val, second])
    assert spy.seen["fit_start"][1] is val  # dataloader_idx 0


def test_block_features_pool_tokens_without_padding_and_flatten_maps():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    expected = torch.stack([h[0].mean(0), h[1, :2].mean(0), h[2, :1].mean(0)])
    torch.testing.assert_close(block_features(h, mask), expected)
    torch.testing.assert_close(block_features(h), h.mean(1))
    fm = torch.randn(3, 2, 4, 4, generator=g)
    assert torch.equal(block_features(fm), fm.reshape(3, 32))
    assert block_features(torch.randn(3, 7)).shape == (3, 7)


# ---------------------------------------------------------------- MaxEntropyHeadInit


def _prior(labels: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=k).float()
    return counts / counts.sum()


class TargetsDataset(torch.utils.data.Dataset):
    """A torchvision-style dataset with ``targets``: MEI must read them, not iterate the images."""

    def __init__(self):
        self.data = make_data(40)
        self.targets = [0] * 25 + [1] * 5 + [2] * 6 + [3] * 4  # differs from the batches' labels on purpose

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i][0], self.targets[i]


@pytest.mark.parametrize("source", ["fit_loaders", "fit_loaders_targets", "datamodule"])
def test_mei_log_prior_counts_the_loaders_of_fit(source):
    model, cb = NoHooks(), MaxEntropyHeadInit(bias="log_prior")
    trainer = quiet_trainer(max_steps=1, callbacks=[cb], enable_model_summary=False)
    bias_at_start = {}

    class Peek(Callback):
        def on_train_start(self, trainer, pl_module):
            bias_at_start["b"] = pl_module.head.bias.detach().clone()

    trainer.callbacks.append(Peek())
    if source == "datamodule":
        data = TinyDataModule()
        trainer.fit(model, datamodule=data)
        labels = torch.cat([b[1] for b in data.train_dataloader()])
    elif source == "fit_loaders":
        train = DataLoader(make_data(48, seed=3), batch_size=16)
        trainer.fit(model, train)
        labels = torch.cat([b[1] for b in train])
    else:
        dataset = TargetsDataset()
        trainer.fit(model, DataLoader(dataset, batch_size=8))
        labels = torch.tensor(dataset.targets)
    torch.testing.assert_close(torch.softmax(bias_at_start["b"], -1), _prior(labels, 4))


def test_mei_on_dict_batches_and_model_output():
    labels = [0] * 12 + [1] * 8 + [2] * 4
    train = DataLoader(text_rows(24, labels=labels), batch_size=8, shuffle=True)
    seen = {}

    class Peek(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "logits" not in seen:
                with torch.no_grad():
                    seen["logits"] = logits_of(pl_module(**batch_inputs(batch)))
                seen["weight"] = pl_module.model.classifier.weight.detach().clone()

    quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit(bias="log_prior"), Peek()]).fit(Bert(), train)
    assert torch.count_nonzero(seen["weight"]) == 0
    prior = _prior(torch.tensor(labels), 3)
    torch.testing.assert_close(torch.softmax(seen["logits"], -1), prior.expand_as(seen["logits"]))
    seen.clear()
    quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit(), Peek()]).fit(Bert(), train)
    torch.testing.assert_close(torch.softmax(seen["logits"], -1), torch.full_like(seen["logits"], 1 / 3))


def test_mei_log_prior_clear_errors_before_any_step():
    model = NoHooks()
    one_hot = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 16), torch.eye(4)[torch.arange(8) % 4]),
                         batch_size=4)
    with pytest.raises(ValueError, match="integer class labels.*class_counts"):
        quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit(bias="log_prior")]).fit(model, one_hot)
    too_many = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 16), torch.arange(8)), batch_size=4)
    with pytest.raises(ValueError, match="labels go up to 7 but the head has 4 outputs"):
        quiet_trainer(max_steps=1, callbacks=[MaxEntropyHeadInit(bias="log_prior")]).fit(model, too_many)
    assert model.global_step == 0


# ---------------------------------------------------------------- RepresentationSimilarity


@pytest.mark.parametrize("source", ["fit_loaders", "datamodule", "module_hooks"])
def test_similarity_probe_from_each_source(source):
    cb = RepresentationSimilarity(probe_size=20, measures=["cka", "overlap"], k=3)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb], limit_val_batches=None)
    model = TinyClassifier(lr=0.0, norm=False)
    if source == "fit_loaders":
        train, val = tiny_loaders()
        trainer.fit(NoHooks(lr=0.0, norm=False), train, val)
        expected = val.dataset.tensors[0][:20]
    elif source == "datamodule":
        data = TinyDataModule()
        trainer.fit(model, datamodule=data)
        expected = data.val_dataloader().dataset.tensors[0][:20]
    else:
        trainer.fit(model)
        expected = model.val_dataloader().dataset.tensors[0][:20]
    assert torch.equal(torch.cat(cb._probe), expected)
    assert cb.history["cka/head"] == pytest.approx([1.0], abs=1e-5)
    assert cb.history["overlap/backbone.0"] == [1.0]


def _reference_cka(x, y):
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_similarity_on_dict_batches_and_model_output_matches_reference():
    train = DataLoader(text_rows(16), batch_size=8)
    val = DataLoader(text_rows(12, seed=1), batch_size=5)  # probe of 10 over two batches (5 + 5)
    model = Bert(lr=0.5)
    start = copy.deepcopy(model.model).eval()
    cb = RepresentationSimilarity(blocks=BERT_BLOCKS, probe_size=10, measures=["cka", "overlap"], k=3)
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], limit_val_batches=2)
    trainer.fit(model, train, val)
    assert set(cb.history) == {f"{m}/{b}" for m in ("cka", "overlap") for b in BERT_BLOCKS + ["model.classifier"]}
    assert cb.epochs == [0, 1] and f"cka/{BERT_BLOCKS[1]}" in trainer.callback_metrics
    # independent reference: layer 1's hidden states, mean over the real (unpadded) tokens, by hand
    batch = torch.utils.data.default_collate(text_rows(12, seed=1)[:10])
    mask = batch["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        def pooled(bert):
            hidden = bert.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states[2]
            return (hidden * mask).sum(1) / mask.sum(1)

        expected = _reference_cka(pooled(model.model.eval()), pooled(start))
    assert cb.history[f"cka/{BERT_BLOCKS[2]}"][-1] == pytest.approx(expected, abs=1e-5)
    assert expected < 0.999, "the model did not move: the reference proves nothing"


def test_similarity_without_validation_data_is_a_clear_error():
    model = NoHooks()
    train, _ = tiny_loaders()
    with pytest.raises(ValueError, match="pass val_dataloaders to trainer.fit"):
        quiet_trainer(max_steps=1, callbacks=[RepresentationSimilarity(probe_size=8)]).fit(model, train)
    small = DataLoader(make_data(4, seed=1), batch_size=4)
    with pytest.raises(ValueError, match="at least 6 validation inputs.*holds 4"):
        quiet_trainer(max_steps=1, callbacks=[RepresentationSimilarity(probe_size=8, measures=["overlap"], k=5)]).fit(
            model, train, small)
    assert model.global_step == 0


# ---------------------------------------------------------------- RIFLE


def test_rifle_on_dict_batches_model_output_and_fit_loaders():
    trace = {}

    class Trace(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            trace[("start", trainer.current_epoch)] = params_of(pl_module.model)

        def on_train_epoch_end(self, trainer, pl_module):
            trace[("end", trainer.current_epoch)] = params_of(pl_module.model)

    rifle = RIFLE(points=[2], min_epochs_after=1)
    quiet_trainer(max_epochs=3, callbacks=[rifle, Trace()]).fit(Bert(), DataLoader(text_rows(8), batch_size=8))
    assert rifle.done == [2]
    for epoch in (1, 2):
        before, after = trace[("end", epoch - 1)], trace[("start", epoch)]
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == ({"classifier.weight", "classifier.bias"} if epoch == 2 else set()), epoch


# ---------------------------------------------------------------- sharded strategies


@pytest.mark.parametrize("make", [MaxEntropyHeadInit, lambda: RIFLE(points=[1]), RepresentationSimilarity])
def test_sharded_strategy_refused_at_setup(make):
    class FSDPStrategy:  # check_strategy reads the class names of the strategy's MRO
        pass

    trainer = SimpleNamespace(strategy=FSDPStrategy(), max_epochs=10, max_steps=-1)
    with pytest.raises(ValueError, match="does not support FSDPStrategy"):
        make().setup(trainer, TinyClassifier(), "fit")
