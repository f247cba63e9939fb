"""CKA and neighbourhood overlap against references, RepresentationSimilarity, and the depth scan."""

import csv

import pytest
import torch
import yaml

from lightning_transfer.callbacks.similarity import RepresentationSimilarity
from lightning_transfer.functional.similarity import linear_cka, neighbourhood_overlap
from lightning_transfer.scan import depth_scan, summarize
from tests.helpers import StopAfter, TinyClassifier, TinyDataModule, quiet_trainer


def feature_space_cka(x, y):
    """Reference: Kornblith et al.'s feature-space form ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())


def test_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)
    y = torch.randn(40, 7, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(linear_cka(x, 5.0 * x @ q)) == pytest.approx(1.0, abs=1e-6)  # orthogonal + isotropic scaling
    assert float(linear_cka(x, y)) == pytest.approx(float(feature_space_cka(x, y)), abs=1e-6)
    assert 0.0 <= float(linear_cka(x, y)) < 0.5
    # not invariant to arbitrary (non-orthogonal) linear maps, as the measure intends
    a = torch.randn(12, 12, generator=g, dtype=torch.float64) * torch.logspace(0, 2, 12, dtype=torch.float64)
    assert float(linear_cka(x, x @ a)) < 0.99
    # feature maps of any shape are flattened
    fm = torch.randn(10, 3, 4, 4, generator=g)
    assert float(linear_cka(fm, fm.flip(1))) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, y[:5])


def test_neighbourhood_overlap():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 5, generator=g)
    assert float(neighbourhood_overlap(x, x[:, torch.randperm(5, generator=g)] * 3, k=5)) == 1.0
    unrelated = float(neighbourhood_overlap(x, torch.randn(60, 5, generator=g), k=5))
    assert unrelated < 0.4
    with pytest.raises(ValueError, match="k must be"):
        neighbourhood_overlap(x, x, k=60)


def test_similarity_callback_logs_per_block_and_draws_heatmap(tmp_path):
    frozen_lr = TinyClassifier(lr=0.0, norm=False)  # nothing moves (no BatchNorm statistics either)
    cb = RepresentationSimilarity(probe_size=32, measures=["cka", "overlap"], k=5, heatmap=str(tmp_path / "cka.png"))
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], limit_val_batches=None)
    trainer.fit(frozen_lr, datamodule=TinyDataModule())
    assert cb.epochs == [0, 1]
    for name in ("backbone.0", "backbone.1", "head"):
        assert cb.history[f"cka/{name}"] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert f"cka/{name}" in trainer.callback_metrics
    assert (tmp_path / "cka.png").stat().st_size > 1000
    moving = RepresentationSimilarity(probe_size=32)
    quiet_trainer(max_epochs=3, callbacks=[moving], limit_val_batches=None).fit(TinyClassifier(lr=1.0), datamodule=TinyDataModule())
    assert moving.history["cka/head"][-1] < 0.999


def _probe_features(model, probe, names):
    """Reference: each block's output on the probe, by plain forward hooks on a model in eval mode."""
    out, handles = {}, [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o))
                        for n in names]
    model.eval()
    with torch.no_grad():
        model(probe)
    for h in handles:
        h.remove()
    return out


def test_similarity_equals_cka_with_a_copy_of_the_pretrained_model_and_keeps_no_copy():
    """The logged values are those of the pre-trained model (a deep copy taken here, independently) against
    the trained one; the callback holds only probe-sized summaries, not a copy of the model."""
    import copy

    torch.manual_seed(0)
    model, data = TinyClassifier(lr=0.5, norm=False), TinyDataModule()
    pretrained = copy.deepcopy(model)
    cb = RepresentationSimilarity(probe_size=24, measures=["cka", "overlap"], k=4)
    quiet_trainer(max_epochs=3, callbacks=[cb], limit_val_batches=None).fit(model, datamodule=data)
    probe = torch.cat([x for x, _ in data.val_dataloader()])[:24]
    names = ["backbone.0", "backbone.1", "head"]
    before, after = _probe_features(pretrained, probe, names), _probe_features(model, probe, names)
    for n in names:
        assert cb.history[f"cka/{n}"][-1] == pytest.approx(float(linear_cka(after[n], before[n])), abs=1e-6)
        assert cb.history[f"overlap/{n}"][-1] == pytest.approx(float(neighbourhood_overlap(after[n], before[n], 4)))
    assert cb.history["cka/head"][-1] < 0.999  # it trained
    held = [t for blocks in cb._reference.values() for t in blocks.values()]
    assert all(isinstance(t, torch.Tensor) and t.shape[0] == 24 and t.numel() <= 24 * 24 for t in held)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(cb).values())


def test_similarity_resumed_compares_with_the_pretrained_model_not_the_resumed_weights(tmp_path):
    """A resume into a model built with another seed logs the uninterrupted run's history: the pre-trained
    summaries come from the checkpoint (the weights restored before on_fit_start are not pre-trained)."""
    def run(callbacks, seed=0, ckpt_path=None, **kw):
        trainer = quiet_trainer(max_epochs=4, callbacks=callbacks, limit_val_batches=None, **kw)
        trainer.fit(TinyClassifier(lr=0.5, norm=False, seed=seed), datamodule=TinyDataModule(), ckpt_path=ckpt_path)
        return trainer

    full = RepresentationSimilarity(probe_size=24, measures=["cka", "overlap"], k=4)
    run([full])
    first = RepresentationSimilarity(probe_size=24, measures=["cka", "overlap"], k=4)
    t1 = run([first, StopAfter(2)], default_root_dir=tmp_path, enable_checkpointing=True)
    resumed = RepresentationSimilarity(probe_size=24, measures=["cka", "overlap"], k=4)
    run([resumed], seed=123, ckpt_path=t1.checkpoint_callback.best_model_path)  # another init: all from the checkpoint
    assert resumed.epochs == full.epochs == [0, 1, 2, 3]
    for key, values in full.history.items():
        assert resumed.history[key] == pytest.approx(values, abs=1e-6), key
    assert full.history["cka/head"][-1] < 0.999
    # a checkpoint of an earlier version (no summaries) is refused with the way out
    with pytest.raises(ValueError, match="earlier version.*Resume without RepresentationSimilarity"):
        RepresentationSimilarity().load_state_dict({"history": {}, "epochs": []})


def test_similarity_bad_input():
    with pytest.raises(ValueError, match="measures"):
        RepresentationSimilarity(measures=["svcca"])
    with pytest.raises(ValueError, match="probe_size"):
        RepresentationSimilarity(probe_size=1)


def _scan_config(tmp_path):
    config = {
        "model": {"class_path": "tests.helpers.TinyClassifier", "init_args": {"seed": None}},
        "data": {"class_path": "tests.helpers.TinyDataModule"},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "num_sanity_val_steps": 0},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_depth_scan_same_start_resume_and_selection(tmp_path, capsys):
    cfg, out = _scan_config(tmp_path), tmp_path / "scan"
    rows = depth_scan([cfg], depths=[0, 1], seeds=[0, 1], out_dir=out, plot=False)
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], set()).add(r["init_sha"])
    assert all(len(shas) == 1 for shas in by_seed.values()), "runs of one seed must start from identical weights"
    assert by_seed["0"] != by_seed["1"]
    first = {(r["seed"], r["depth"]): r["seconds"] for r in rows}
    capsys.readouterr()
    rows = depth_scan([cfg], depths=[0, 1, 2], seeds=[0, 1], out_dir=out, plot=True)
    printed = capsys.readouterr().out
    assert printed.count("done before, skipped") == 4 and printed.count(": running") == 2
    assert {(r["seed"], r["depth"]): r["seconds"] for r in rows if r["depth"] != "2"} == first
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (out / "depth_scan.png").is_file() and "chosen on val" in (out / "results.md").read_text()


def test_selection_uses_validation_not_test():
    rows = [
        {"per_class": "10", "seed": "0", "depth": "0", "val_acc": "0.9", "test_acc": "0.1"},
        {"per_class": "10", "seed": "0", "depth": "1", "val_acc": "0.5", "test_acc": "0.99"},
    ]
    md = summarize(rows)
    assert "| 0 **(chosen on val)**" in md and "| 1 **" not in md


def test_depth_scan_rejects_out_of_range_depths(tmp_path):
    with pytest.raises(ValueError, match=r"depths \[7\] out of range.*2 blocks"):
        depth_scan([_scan_config(tmp_path)], depths=[0, 7], out_dir=tmp_path / "scan")
    assert not (tmp_path / "scan" / "results.csv").exists()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"blocks": "backbone.0"}, TypeError, "blocks must be a list of strings"),
        ({"blocks": [0, 1]}, TypeError, "blocks must be a list of strings"),
        ({"blocks": []}, ValueError, "blocks must not be empty"),
        ({"probe_size": 1}, ValueError, "probe_size must be an integer >= 2"),
        ({"probe_size": -8}, ValueError, "probe_size must be an integer >= 2"),
        ({"probe_size": 32.0}, TypeError, "probe_size must be an integer"),
        ({"probe_size": float("nan")}, TypeError, "probe_size must be an integer"),
        ({"probe_size": float("inf")}, TypeError, "probe_size must be an integer"),
        ({"probe_size": True}, TypeError, "probe_size must be an integer"),
        ({"measures": "cka"}, TypeError, "measures must be a list of strings"),
        ({"measures": []}, ValueError, "measures must not be empty"),
        ({"measures": ["cka", "svcca"]}, ValueError, "measures must be one of"),
        ({"k": 0}, ValueError, "k must be an integer >= 1"),
        ({"k": -3}, ValueError, "k must be an integer >= 1"),
        ({"k": 2.0}, TypeError, "k must be an integer"),
        ({"k": float("nan")}, TypeError, "k must be an integer"),
        ({"k": float("inf")}, TypeError, "k must be an integer"),
        ({"k": True}, TypeError, "k must be an integer"),
        ({"k": 16, "probe_size": 16, "measures": ["overlap"]}, ValueError, "k must be < probe_size"),
        ({"heatmap": 1}, TypeError, "heatmap must be a string or None"),
        ({"heatmap": ""}, ValueError, "heatmap must not be empty"),
    ],
)
def test_similarity_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=f"RepresentationSimilarity: {match}"):
        RepresentationSimilarity(**kwargs)
