"""The rules of devices this machine lacks, emulated on its CPU on every test run: MPS has no
float64, GPUs without bf16 train in fp16 with a gradient scaler. Each path a user can reach
either runs right or stops with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import part1_classify
import part2_segment
import runfiles
from conftest import assert_one_line_error, make_fashion_set, run_in_process
from errors import UserError

SYN_P2 = ["--train-range", "0", "7", "--val-range", "8", "10", "--test-range", "0", "3"]
# Functions that work on the host alone, where exact metrics stay in float64: each gets its
# tensors from the device first (.cpu(), .tolist()) and hands nothing back to it.
HOST_SIDE = {
    ("metrics.py", "compute"),
    ("metrics.py", "precision_recall_steps"),
    ("metrics.py", "ap_from_steps"),
    ("metrics.py", "subsample_curve"),
    ("engine.py", "host_totals"),
    ("engine.py", "pass_summary"),
}


def host_side() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if (Path(frame.f_code.co_filename).name, frame.f_code.co_name) in HOST_SIDE:
            return True
        frame = frame.f_back
    return False


class NoFloat64OnTheDevice(TorchDispatchMode):
    """MPS's rule on the CPU: any op that makes a float64 tensor outside HOST_SIDE fails."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float64 for t in made) and not host_side():
            raise AssertionError(f"{func} made a float64 tensor on the training device")
        return out


def test_the_guard_catches_float64_made_on_the_device():
    with pytest.raises(AssertionError, match="float64"), NoFloat64OnTheDevice():
        torch.ones(3).double()
    with NoFloat64OnTheDevice():
        torch.ones(3).float().sum()


def test_both_parts_run_end_to_end_under_the_rules_of_mps(
    make_fashion_root, synthetic_facade_ro, tmp_path
):
    """As the policy runs them on a Mac (fp32, standard layout), with no float64 tensor made on
    the training device: from the normalisation and class weights to losses and metrics."""
    mps_like = ["--device", "cpu", "--no-amp", "--no-channels-last", "--no-progress"]
    fm = make_fashion_root(tmp_path / "fm", n_train=60, n_test=20)
    p1 = ["--data-root", fm, "--no-download", "--batch-size", 16, "--epochs", 2]
    p2 = ["--data", synthetic_facade_ro, *SYN_P2, "--epochs", 2, "--val-ap-every", 1]
    with NoFloat64OnTheDevice():
        for script, argv, name in (
            (part1_classify, p1, "p1"),
            (part2_segment, p2, "p2"),
            (part2_segment, [*p2, "--model", "unet", "--width", 4, "--tta"], "unet"),
        ):
            args = [*map(str, argv), *mps_like, "--output-dir", str(tmp_path / name)]
            results = script.main(script.get_args_parser().parse_args(args))
            assert results["task"] in ("classification", "segmentation")


# ----------------------------------------------------------------------------- fp16
def run(script, *argv):
    """The script's main in this process, as its command line would run it."""
    return script.main(script.get_args_parser().parse_args([*map(str, argv), "--no-progress"]))


def part1(*argv):
    return run(part1_classify, *argv)


def part2(*argv):
    return run(part2_segment, *argv)


def effective(folder: Path) -> dict:
    return runfiles.read_json(folder / "args.json")["effective"]


@pytest.fixture(scope="module")
def fm16(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    data = make_fashion_set(root / "fm", n_train=60, n_test=20)
    common = ["--data-root", data, "--no-download", "--batch-size", 16, "--epochs", 2]
    return root, common


def test_fp16_trains_stops_resumes_and_is_tested_in_fp16(fm16):
    """fp16 asked for alone (--amp-dtype fp16): a gradient scaler, a time-boxed first half, a
    resume that keeps fp16 and restores the scaler, and --eval-only in fp16 unless told."""
    root, common = fm16
    run_dir = root / "fp16"
    part1(*common, "--amp-dtype", "fp16", "--stop-after-epochs", 1, "--output-dir", run_dir)
    assert effective(run_dir)["amp_dtype"] == "fp16" and effective(run_dir)["scaler"]
    assert not (run_dir / "results.json").exists()  # unfinished: it continues with --resume
    ckpt = torch.load(run_dir / "checkpoints/last.pt", map_location="cpu", weights_only=False)
    assert ckpt["scaler"]["scale"] > 0  # a real scaler state, not an empty one
    part1("--resume", run_dir / "checkpoints/last.pt")
    assert "'amp_dtype': 'fp16'" in (run_dir / "log.txt").read_text().replace('"', "'")
    assert len(runfiles.read_csv(run_dir / "metrics.csv")) == 2
    data = common[:3]  # --data-root DIR --no-download: eval-only reads the test set anew
    part1("--eval-only", run_dir / "checkpoints/best.pt", *data, "--output-dir", root / "ev16")
    assert effective(root / "ev16")["amp_dtype"] == "fp16"
    part1("--eval-only", run_dir / "checkpoints/best.pt", *data, "--no-amp", "--output-dir",
          root / "ev32")  # fmt: skip
    assert effective(root / "ev32")["amp_dtype"] is None


def test_precision_flags_on_resume_repeat_the_checkpoints_or_stop_in_one_line(fm16):
    root, common = fm16
    for name, flags in (("bf16", ["--amp"]), ("fp32", ["--no-amp"])):
        run_dir = root / f"half-{name}"
        part1(*common, *flags, "--stop-after-epochs", 1, "--output-dir", run_dir)
        last = run_dir / "checkpoints/last.pt"
        for other in (["--amp-dtype", "fp16"], ["--no-amp"] if name == "bf16" else ["--amp"]):
            with pytest.raises(UserError, match="differs from the checkpoint's precision"):
                part1("--resume", last, *other)
        assert not (run_dir / "results.json").exists()
    # the same refusal from the command line: one line, exit code 2
    last_bf16 = str(root / "half-bf16/checkpoints/last.pt")
    proc = run_in_process("part1_classify.py", "--resume", last_bf16, "--no-amp")
    assert_one_line_error(proc, mentions="precision")
    part1("--resume", root / "half-fp32/checkpoints/last.pt", "--no-amp")
    assert runfiles.read_json(root / "half-fp32/results.json")["checkpoint_epoch"] >= 1


def test_an_older_checkpoint_that_recorded_fp16_but_ran_bf16_resumes_in_bf16(fm16):
    """Before the settled settings, --amp-dtype fp16 without --amp was recorded (amp True,
    amp_dtype fp16) while bf16 ran and the scaler state stayed empty; its resume stopped with
    "source state dict is empty"."""
    root, common = fm16
    run_dir = root / "old"
    part1(*common, "--amp", "--stop-after-epochs", 1, "--output-dir", run_dir)
    path = run_dir / "checkpoints/last.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    del ckpt["args"]["effective"]
    ckpt["args"] |= {"amp": True, "amp_dtype": "fp16"}
    ckpt["scaler"] = {}
    torch.save(ckpt, path)
    part1("--resume", path)
    assert "'amp_dtype': 'bf16'" in (run_dir / "log.txt").read_text().replace('"', "'")


# ----------------------------------------------------------------------------- time-boxed
def test_a_time_boxed_run_chooses_from_the_same_epochs_and_counts_the_same_compute(
    synthetic_facade_ro, tmp_path
):
    """--val-every 2 over 3 epochs validates epochs 2 and 3; cut after epoch 1, the first
    invocation must not validate (nor be chosen, nor count validation compute) at its end."""
    common = ["--data", synthetic_facade_ro, *SYN_P2, "--epochs", 3, "--val-every", 2]
    straight, boxed = tmp_path / "straight", tmp_path / "boxed"
    part2(*common, "--output-dir", straight)
    for extra in (["--output-dir", boxed], ["--resume", boxed / "checkpoints/last.pt"]):
        part2(*common, "--stop-after-epochs", 1, *extra)
    part2("--resume", boxed / "checkpoints/last.pt")
    a, b = (runfiles.read_json(f / "results.json") for f in (straight, boxed))
    assert a["checkpoint_epoch"] == b["checkpoint_epoch"]
    assert a["val_tflop"] == pytest.approx(b["val_tflop"], rel=1e-12)
    assert a["train_tflop"] == pytest.approx(b["train_tflop"], rel=1e-12)
    rows = runfiles.read_csv(boxed / "metrics.csv")
    assert [r["val_tflop"] > 0 for r in rows] == [False, True, True]


def test_a_second_resume_across_the_compute_recording_change(synthetic_facade_ro, tmp_path):
    """Rows from before compute was recorded read back empty; the sum must skip, not fail."""
    run_dir = tmp_path / "run"
    part2("--data", synthetic_facade_ro, *SYN_P2, "--epochs", 3, "--stop-after-epochs", 1,
          "--output-dir", run_dir)  # fmt: skip
    rows = runfiles.read_csv(run_dir / "metrics.csv")
    runfiles.write_csv(run_dir / "metrics.csv", [
        {k: v for k, v in r.items() if not k.endswith("tflop")} for r in rows])  # fmt: skip
    for _ in range(2):
        part2("--resume", run_dir / "checkpoints/last.pt", "--stop-after-epochs", 1)
    results = runfiles.read_json(run_dir / "results.json")
    assert "train_tflop" not in results and results["checkpoint_epoch"] >= 1


def test_args_json_records_the_micro_batch_used_not_the_one_refused(synthetic_facade_ro, tmp_path):
    run_dir = tmp_path / "unet"
    part2("--data", synthetic_facade_ro, *SYN_P2, "--model", "unet", "--width", 4, "--epochs", 1,
          "--micro-batch", 2, "--output-dir", run_dir)  # fmt: skip
    recorded = runfiles.read_json(run_dir / "args.json")
    assert recorded["micro_batch"] == 2  # the flag as given
    assert recorded["effective"]["micro_batch"] == 0  # batch norm: whole batches were used
    assert "refused" in recorded["effective"]["reasons"]["micro_batch"]
    assert "refused" in (run_dir / "log.txt").read_text().splitlines()[0]
