"""utils: LR schedule, atomic writes, CSV/JSON helpers, checkpoint loading."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

import optimizers
import runfiles
import utils


def test_lr_factor_values():
    f = lambda s: optimizers.lr_factor(s, 100, "cosine", 10)  # noqa: E731
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)  # half-way through the cosine part
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(150) == pytest.approx(0.0, abs=1e-12)  # clamped after the end
    assert optimizers.lr_factor(37, 100, "constant", 10) == 1.0
    assert optimizers.lr_factor(55, 100, "linear", 10) == pytest.approx(0.5)
    assert optimizers.lr_factor(0, 100, "cosine", 0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        optimizers.lr_factor(20, 100, "step", 10)


def test_build_scheduler_warmup_then_cosine_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4)
    total, warm = 50, 5
    sched = optimizers.build_scheduler(opt, "cosine", total, warm)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:warm] == pytest.approx([0.4 * (s + 1) / warm for s in range(warm)])
    assert max(lrs) == pytest.approx(0.4) and lrs.index(max(lrs)) in (warm - 1, warm)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :]))  # monotone decay after warm-up
    assert lrs[-1] < 0.4 * 0.01  # last step nearly 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # after the final step: 0
    expected = [
        0.4 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        for s in range(warm, total)
    ]
    assert lrs[warm:] == pytest.approx(expected)


def test_scheduler_state_round_trip():
    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=1e-2)
        return opt, optimizers.build_scheduler(opt, "cosine", 20, 3)

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()  # noqa: E702
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_atomic_path_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with runfiles.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("hello")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "hello"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="boom"):
        with runfiles.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_old_content(tmp_path):
    target = tmp_path / "out.json"
    runfiles.write_json(target, {"a": 1})
    with pytest.raises(KeyError):
        with runfiles.atomic_path(target) as tmp:
            tmp.write_text("garbage")
            raise KeyError("x")
    assert runfiles.read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_save_checkpoint_failure_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt.pt"
    # a local lambda does not pickle: AttributeError before Python 3.14, PicklingError from 3.14
    with pytest.raises((AttributeError, pickle.PicklingError)):
        runfiles.save_checkpoint(
            {"model": {}, "model_name": "x", "bad": lambda: 0}, target
        )  # lambdas do not pickle
    assert list(tmp_path.iterdir()) == []


def test_csv_round_trip(tmp_path):
    rows = [
        {"epoch": 1, "loss": 0.5, "name": "a"},
        {"epoch": 2, "loss": 0.25, "name": "b", "extra": 3},
    ]
    runfiles.write_csv(tmp_path / "m.csv", rows)
    back = runfiles.read_csv(tmp_path / "m.csv")
    assert back[0] == {"epoch": 1, "loss": 0.5, "name": "a", "extra": ""}
    assert back[1] == {"epoch": 2, "loss": 0.25, "name": "b", "extra": 3}
    assert runfiles.read_csv(tmp_path / "missing.csv") == []


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(utils.UserError, match="not found"):
        runfiles.load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(utils.UserError, match="garbage.pt"):
        runfiles.load_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(utils.UserError, match="not a checkpoint"):
        runfiles.load_checkpoint(other)
    good = tmp_path / "good.pt"
    runfiles.save_checkpoint({"model": {"w": torch.ones(2)}, "model_name": "sigmoid_cnn"}, good)
    assert runfiles.load_checkpoint(good)["model"]["w"].tolist() == [1.0, 1.0]
