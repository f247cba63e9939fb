"""Greedy model soups: a hand-built expected soup, and BatchNorm statistics computed directly. Model Stock:
the rule written out per layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_transfer import greedy_soup, model_stock
from lightning_transfer.batchnorm import reestimate_batchnorm

# 1-D points 1, 2, 3, 4 with labels 0, 0, 1, 1. A candidate is Linear(1, 2) whose class-0 row is zero and
# whose class-1 row is (weight 1, bias c): it predicts class 1 for x > −c, so its accuracy is read off −c.
VAL = DataLoader(TensorDataset(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([0, 0, 1, 1])), batch_size=3)


def candidate(c: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.tensor([[0.0], [1.0]]), "bias": torch.tensor([0.0, c])}


def test_greedy_soup_equals_the_hand_built_soup():
    # D: threshold 0.5 (acc 0.5), B: 3.7 (0.75), A: 2.5 (1.0), C: 1.7 (0.75)
    candidates = [candidate(-0.5), candidate(-3.7), candidate(-2.5), candidate(-1.7)]
    model = nn.Linear(1, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    soup, log = greedy_soup(candidates, model, VAL)
    # by hand: start from A (1.0); A+B: threshold 3.1 -> 0.75, dropped; A+C: 2.1 -> 1.0, kept (ties keep);
    # A+C+D: 1.567 -> 0.75, dropped. B and C tie at 0.75: B, listed first, is tried first.
    assert [e["candidate"] for e in log] == [2, 1, 3, 0]
    assert [e["kept"] for e in log] == [True, False, True, False]
    assert [e["val_acc"] for e in log] == [1.0, 0.75, 0.75, 0.5]
    assert [e["soup_val_acc"] for e in log] == [1.0, 0.75, 1.0, 0.75]
    torch.testing.assert_close(soup["bias"], torch.tensor([0.0, -2.1]))
    torch.testing.assert_close(soup["weight"], torch.tensor([[0.0], [1.0]]))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the model is left as it was


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))


def test_batchnorm_is_reestimated_for_every_soup_and_checkpoints_load(tmp_path):
    torch.manual_seed(2)  # bn_net()'s initialization: both branches of the greedy step must run
    g = torch.Generator().manual_seed(0)
    x_train, x_val = torch.randn(40, 2, generator=g), torch.randn(30, 2, generator=g)
    y_val = (x_val[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x_train, torch.zeros(40, dtype=torch.long)), batch_size=16)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=8)
    base = bn_net().state_dict()
    states = []
    for _ in range(3):
        s = {k: (v + 0.8 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in base.items()}
        s["1.running_mean"], s["1.running_var"] = torch.full((3,), 5.0), torch.full((3,), 9.0)  # stale on purpose
        states.append(s)
    torch.save({"state_dict": states[0], "epoch": 3}, tmp_path / "run0.ckpt")  # a Lightning-style checkpoint

    def direct(state):  # accuracy with BN statistics computed directly over the whole training set
        s = dict(state)
        h = x_train @ s["0.weight"].T
        s["1.running_mean"], s["1.running_var"] = h.mean(0), h.var(0)
        net = bn_net()
        net.load_state_dict(s)
        with torch.no_grad():
            return float((net.eval()(x_val).argmax(1) == y_val).float().mean()), s

    def mean(sts):
        return {k: torch.stack([s[k].float() for s in sts]).mean(0).to(sts[0][k].dtype) if sts[0][k].is_floating_point()
                else sts[0][k] for k in sts[0]}

    soup, log = greedy_soup([tmp_path / "run0.ckpt", *states[1:]], bn_net(), val, train_loader=train)
    for entry in log[:1]:
        assert entry["val_acc"] == pytest.approx(direct(states[entry["candidate"]])[0])
    kept = [log[0]["candidate"]]
    for entry in log[1:]:
        assert entry["val_acc"] == pytest.approx(direct(states[entry["candidate"]])[0])
        assert entry["soup_val_acc"] == pytest.approx(direct(mean([states[i] for i in [*kept, entry["candidate"]]]))[0])
        if entry["kept"]:
            kept.append(entry["candidate"])
    expected = direct(mean([states[i] for i in kept]))[1]
    for k, v in soup.items():
        if not k.endswith("num_batches_tracked"):  # counts the re-estimation's forward passes
            torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert {e["kept"] for e in log} == {True, False}  # both branches of the greedy step ran
    assert not torch.equal(soup["1.running_var"], torch.full((3,), 9.0))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-empty list"):
        greedy_soup([], nn.Linear(1, 2), VAL)
    with pytest.raises(ValueError, match="pass train_loader"):
        greedy_soup([bn_net().state_dict()], bn_net(), VAL)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        greedy_soup(["nope.ckpt"], nn.Linear(1, 2), VAL)


def test_batchnorm_the_forward_never_reaches_keeps_its_statistics():
    class WithTeacher(nn.Module):  # a frozen copy registered beside the network, as distillation code does
        def __init__(self):
            super().__init__()
            self.net, self.teacher = bn_net(), bn_net()

        def forward(self, x):
            return self.net(x)

    model = WithTeacher().train()
    before = model.teacher[1].running_var.clone()
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(1))
    assert reestimate_batchnorm(model, DataLoader(TensorDataset(x, torch.zeros(12)), batch_size=5)) == 1
    assert torch.equal(model.teacher[1].running_var, before) and model.teacher.training
    torch.testing.assert_close(model.net[1].running_var, (x @ model.net[0].weight.T).var(0).detach())


# ---------------------------------------------------------------- Model Stock


def stock_runs(k: int, seed: int = 0):
    """w0 (two layers, a frozen one, a counter) and k runs from it: a shared drift plus run-specific noise."""
    g = torch.Generator().manual_seed(seed)
    w0 = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g), "frozen": torch.randn(2, generator=g),
          "n": torch.tensor(7)}
    drift = {n: 0.1 * torch.randn(w0[n].shape, generator=g) for n in ("a", "b")}
    runs = []
    for _ in range(k):
        run = {n: w0[n] + drift[n] + 0.1 * torch.randn(w0[n].shape, generator=g) for n in ("a", "b")}
        runs.append({**run, "frozen": w0["frozen"].clone(), "n": torch.tensor(9)})
    return w0, runs


@pytest.mark.parametrize("k", [2, 3, 4])
def test_model_stock_matches_the_rule_written_out_per_layer(k, tmp_path):
    w0, runs = stock_runs(k)
    torch.save({"state_dict": runs[0], "epoch": 1}, tmp_path / "run0.ckpt")  # a Lightning-style checkpoint
    torch.save(w0, tmp_path / "w0.pt")
    stock = model_stock([tmp_path / "run0.ckpt", *runs[1:]], tmp_path / "w0.pt")
    for name in ("a", "b"):
        d = [(r[name] - w0[name]).flatten().double() for r in runs]
        cosines = [float(d[i] @ d[j]) / math.sqrt(float(d[i] @ d[i]) * float(d[j] @ d[j]))
                   for i in range(k) for j in range(i + 1, k)]
        cos = sum(cosines) / len(cosines)
        t = min(1.0, max(0.0, k * cos / (1 + (k - 1) * cos))) if cos > 0 else 0.0
        assert 0 < t < 1  # the check can tell t from the plain mean and from w0
        expected = t * sum(r[name] for r in runs) / k + (1 - t) * w0[name]
        assert stock.cosine[name] == pytest.approx(cos) and stock.ratio[name] == pytest.approx(t)
        torch.testing.assert_close(stock.state_dict[name], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(stock.state_dict["frozen"], w0["frozen"]) and stock.state_dict["n"].item() == 7


def test_model_stock_clamps_opposite_updates_to_w0():
    w0 = {"w": torch.ones(2)}
    runs = [{"w": torch.tensor([1.5, 1.0])}, {"w": torch.tensor([0.5, 1.0])}]  # cos = -1: t = 0
    stock = model_stock(runs, w0)
    assert stock.ratio["w"] == 0.0 and torch.equal(stock.state_dict["w"], w0["w"])
    parallel = model_stock([{"w": torch.tensor([1.5, 1.0])}, {"w": torch.tensor([2.0, 1.0])}], w0)
    assert parallel.ratio["w"] == 1.0  # cos = 1: the plain mean
    torch.testing.assert_close(parallel.state_dict["w"], torch.tensor([1.75, 1.0]))


def test_model_stock_counts_a_zero_update_as_cosine_zero():
    w0 = {"w": torch.ones(2), "v": torch.zeros(2)}
    runs = [{"w": torch.tensor([2.0, 1.0]), "v": torch.tensor([1.0, 0.0])},
            {"w": torch.tensor([3.0, 1.0]), "v": torch.tensor([0.0, 1.0])},
            {"w": torch.ones(2), "v": torch.tensor([1.0, 1.0])}]  # run 2 leaves w at w0
    stock = model_stock(runs, w0, max_relative_update=float("inf"))
    assert stock.cosine["w"] == pytest.approx(1 / 3)  # pairs (0, 1): 1, (0, 2) and (1, 2): 0
    t = 3 * (1 / 3) / (1 + 2 * (1 / 3))
    assert stock.ratio["w"] == pytest.approx(t)
    torch.testing.assert_close(stock.state_dict["w"], t * torch.tensor([2.0, 1.0]) + (1 - t) * w0["w"])
    two = model_stock(runs[1:], w0, max_relative_update=float("inf"))  # k = 2 with a zero update: w0
    assert two.ratio["w"] == 0.0 and torch.equal(two.state_dict["w"], w0["w"])


def test_model_stock_refuses_runs_from_another_start(tmp_path):
    w0, runs = stock_runs(2)
    other, _ = stock_runs(2, seed=5)
    with pytest.raises(ValueError, match="did not start from them"):
        model_stock(runs, other)  # every weight differs by about sqrt(2)·‖w0‖
    moved = {**w0, "frozen": w0["frozen"] + 0.01}  # close, but the runs' shared frozen entry disagrees
    with pytest.raises(ValueError, match="'frozen' and the pre-trained state another value"):
        model_stock(runs, moved)
    with pytest.raises(ValueError, match="the runs are identical"):
        model_stock([runs[0], runs[0]], w0)
    with pytest.raises(ValueError, match="at least two"):
        model_stock(runs[:1], w0)
    with pytest.raises(KeyError, match="other entries"):
        model_stock([runs[0], {k: v for k, v in runs[1].items() if k != "b"}], w0)
    with pytest.raises(ValueError, match="shape"):
        model_stock([runs[0], {**runs[1], "b": torch.zeros(6)}], w0)
    with pytest.raises(ValueError, match="max_relative_update"):
        model_stock(runs, w0, max_relative_update=0)


class Opaque:  # any pickled object: refused unless trusted
    pass


def test_model_stock_reads_files_weights_only(tmp_path):
    w0, runs = stock_runs(2)

    torch.save({"state_dict": runs[0], "extra": Opaque()}, tmp_path / "run0.ckpt")
    with pytest.raises(Exception, match="trusted=True"):
        model_stock([tmp_path / "run0.ckpt", runs[1]], w0)
    assert "a" in model_stock([tmp_path / "run0.ckpt", runs[1]], w0, trusted=True).state_dict
