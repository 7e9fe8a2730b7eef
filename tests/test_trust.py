"""Runs that cannot end wrong without saying so: flags checked at parse time, resume that keeps
the run's arguments, run folders that never mix, checkpoints that cannot run code, metrics from
fp32 scores, a validation loss independent of batching, predict that keeps outputs apart."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import engine
import hardware
import losses
import models
import part1_classify
import part2_segment
import runfiles
import utils
from conftest import assert_one_line_error, run_in_process, run_script

SYN_P2 = ["--train-range", "0", "7", "--val-range", "8", "10", "--test-range", "0", "3"]


def part1(*argv):
    return part1_classify.main(
        part1_classify.get_args_parser().parse_args([*map(str, argv), "--no-progress"])
    )


def part2(*argv):
    return part2_segment.main(
        part2_segment.get_args_parser().parse_args([*map(str, argv), "--no-progress"])
    )


def digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def fm_root(make_fashion_root, tmp_path):
    return make_fashion_root(tmp_path / "fm", n_train=60, n_test=20)


def p1_common(root):
    return ["--data-root", root, "--no-download", "--batch-size", 16, "--eval-batch-size", 16]


# ----------------------------------------------------------------------------- 2. flags
BAD_FLAGS = [
    (part1_classify, ["--batch-size", "-5"], "--batch-size"),
    (part1_classify, ["--batch-size", "0"], "--batch-size"),
    (part1_classify, ["--eval-batch-size", "0"], "--eval-batch-size"),
    (part1_classify, ["--epochs", "0"], "--epochs"),
    (part1_classify, ["--lr", "0"], "--lr"),
    (part1_classify, ["--lr", "nan"], "--lr"),
    (part1_classify, ["--weight-decay", "-1e-4"], "--weight-decay"),
    (part1_classify, ["--val-fraction", "1"], "--val-fraction"),
    (part1_classify, ["--val-fraction", "-0.1"], "--val-fraction"),
    (part1_classify, ["--label-smoothing", "1.5"], "--label-smoothing"),
    (part1_classify, ["--warmup-epochs", "-1"], "--warmup-epochs"),
    (part1_classify, ["--threads", "0"], "--threads"),
    (part1_classify, ["--train-limit", "0"], "--train-limit"),
    (part1_classify, ["--max-steps", "0"], "--max-steps"),
    (part1_classify, ["--stop-after-epochs", "0"], "--stop-after-epochs"),
    (part1_classify, ["--time-limit", "0"], "--time-limit"),
    (part1_classify, ["--seed", "-1"], "--seed"),
    (part1_classify, ["--batch-size", "ten"], "--batch-size"),
    (part2_segment, ["--crop", "0"], "--crop"),
    (part2_segment, ["--width", "0"], "--width"),
    (part2_segment, ["--num-examples", "0"], "--num-examples"),
    (part2_segment, ["--train-range", "-1", "5"], "--train-range"),
]


@pytest.mark.parametrize(
    "script, argv, flag", BAD_FLAGS, ids=[" ".join(a) for _, a, _ in BAD_FLAGS]
)
def test_bad_flag_is_one_line_at_parse_time(script, argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        script.get_args_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0], err


def test_bad_flag_subprocess_writes_nothing(tmp_path):
    """One real start of the script, then the same check in-process (run_in_process)."""
    for run, argv in ((run_script, ["--batch-size", "-5"]), (run_in_process, ["--epochs", "0"])):
        proc = run("part1_classify.py", *argv, "--output-dir", str(tmp_path / "run"))
        assert_one_line_error(proc, mentions=argv[0])
        assert not (tmp_path / "run").exists()


def test_crop_must_suit_the_model(synthetic_facade, tmp_path):
    flags = [*SYN_P2, *"--model unet --crop 20".split()]
    with pytest.raises(utils.UserError, match="--crop 20 is not a multiple of 16"):
        part2("--data", synthetic_facade, *flags, "--output-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_predict_max_size_below_the_model_multiple(tmp_path, synthetic_facade, capsys):
    out = tmp_path / "unet"
    flags = [*SYN_P2, *"--model unet --width 4 --crop 32 --epochs 1 --max-steps 1".split()]
    part2("--data", synthetic_facade, *flags, "--output-dir", out)
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(img)
    ckpt, pred = str(out / "checkpoints/best.pt"), str(tmp_path / "p")
    argv = ["predict", "--checkpoint", ckpt, str(img), "--max-size", "8", "--output-dir", pred]
    with pytest.raises(SystemExit) as info:
        part2_segment.cli_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-size 8" in err[0]
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------- 3. resume
@pytest.fixture
def half_run(fm_root, tmp_path):
    """A 2-epoch Part 1 run stopped after epoch 1, and the same run uninterrupted."""
    common = [*p1_common(fm_root), "--epochs", 2, "--seed", 3, "--no-amp"]
    part1(*common, "--output-dir", tmp_path / "full")
    part1(*common, "--output-dir", tmp_path / "half", "--stop-after-epochs", 1)
    return tmp_path, tmp_path / "half" / "checkpoints" / "last.pt"


def test_resume_alone_reproduces_the_uninterrupted_run(half_run):
    base, ckpt = half_run
    part1("--resume", ckpt)  # no other flag: the checkpoint's arguments (seed 3, data, recipe)
    full, resumed = (runfiles.read_csv(base / n / "metrics.csv") for n in ("full", "half"))
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if "time" not in k and "per_s" not in k} == {
            k: v for k, v in b.items() if "time" not in k and "per_s" not in k
        }
    res_full, res_resumed = (
        runfiles.read_json(base / n / "results.json") for n in ("full", "half")
    )
    assert res_full["confusion_matrix"] == res_resumed["confusion_matrix"]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--seed", "0"], "--seed"),
        (["--lr", "0.5"], "--lr"),
        (["--val-fraction", "0.5"], "--val-fraction"),
        (["--amp"], "--amp"),
        (["--epochs", "5"], "--epochs"),
    ],
)
def test_resume_refuses_a_flag_that_changes_the_run(half_run, argv, flag):
    base, ckpt = half_run
    before = digest(base / "half")
    with pytest.raises(utils.UserError, match=flag):
        part1("--resume", ckpt, *argv)
    assert digest(base / "half") == before


def test_resume_accepts_speed_flags_and_a_longer_constant_schedule(fm_root, tmp_path):
    run = tmp_path / "const"
    part1(*p1_common(fm_root), "--epochs", 1, "--schedule", "constant", "--output-dir", run)
    flags = "--epochs 2 --threads 1 --eval-batch-size 7 --tta".split()  # --tta: test-time only
    part1("--resume", run / "checkpoints" / "last.pt", *flags)
    assert [r["epoch"] for r in runfiles.read_csv(run / "metrics.csv")] == [1, 2]
    assert runfiles.read_json(run / "results.json")["tta"] is True


# ----------------------------------------------------------------------------- 4. run folders
def test_new_run_into_a_run_folder_is_refused(fm_root, tmp_path):
    run = tmp_path / "run"
    part1(*p1_common(fm_root), "--epochs", 1, "--output-dir", run)
    before = digest(run)
    with pytest.raises(utils.UserError, match="already holds a run"):
        part1(*p1_common(fm_root), "--epochs", 1, "--output-dir", run)
    assert digest(run) == before


def test_eval_only_writes_its_own_folder(fm_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    part1(*p1_common(fm_root), "--epochs", 1, "--output-dir", run)
    before = digest(run)
    part1("--eval-only", run / "checkpoints" / "best.pt", "--data-root", fm_root)
    evals = [p for p in run.iterdir() if p.name.startswith("eval-")]
    assert len(evals) == 1 and (evals[0] / "results.json").is_file()
    assert {k: v for k, v in digest(run).items() if not k.startswith("eval-")} == before
    # a checkpoint outside a run folder: a new folder under outputs/, not the checkpoint's parent
    loose = tmp_path / "loose" / "best.pt"
    loose.parent.mkdir()
    loose.write_bytes((run / "checkpoints" / "best.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    part1("--eval-only", loose, "--data-root", fm_root)
    assert sorted(p.name for p in loose.parent.iterdir()) == ["best.pt"]
    assert len(list((tmp_path / "outputs" / "part1").glob("*-eval-sigmoid_cnn"))) == 1


def test_default_run_folders_do_not_collide(tmp_path):
    first = runfiles.new_run_dir(tmp_path, "20260101-000000-unet")
    second = runfiles.new_run_dir(tmp_path, "20260101-000000-unet")
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == "20260101-000000-unet-2"


# ----------------------------------------------------------------------------- 5. checkpoints
class RunsCode:
    """Unpickling this calls os.makedirs(marker): what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, fm_root):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(
        {
            "model": {},
            "model_name": "sigmoid_cnn",
            "task": "classification",
            "payload": RunsCode(marker),
        },
        evil,
    )
    with pytest.raises(utils.UserError, match="refusing"):
        runfiles.load_checkpoint(evil)
    data, out = str(fm_root), str(tmp_path / "out")
    proc = run_in_process(
        "part1_classify.py", "--eval-only", str(evil), "--data-root", data, "--output-dir", out
    )
    assert_one_line_error(proc, mentions="evil.pt")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_our_checkpoints_load_with_weights_only(tmp_path, fm_root):
    run = tmp_path / "run"
    part1(*p1_common(fm_root), "--epochs", 1, "--output-dir", run)
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 1 and ckpt["args"]["seed"] == 0


def test_best_written_before_last_and_fsynced(tmp_path, monkeypatch):
    order, synced = [], []
    real_save, real_fsync = torch.save, os.fsync
    monkeypatch.setattr(
        torch, "save", lambda obj, f: (order.append(obj["name"]), real_save(obj, f))
    )
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    runfiles.save_epoch_checkpoints({"name": "epoch 3"}, tmp_path, is_best=True)
    assert order == ["epoch 3", "epoch 3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    assert len(synced) == 4  # each file and the folder after each rename
    order.clear()
    runfiles.save_epoch_checkpoints({"name": "epoch 4"}, tmp_path, is_best=False)
    assert torch.load(tmp_path / "best.pt")["name"] == "epoch 3"
    assert torch.load(tmp_path / "last.pt")["name"] == "epoch 4"


# ----------------------------------------------------------------------------- 6. fp32 scores
def test_amp_metrics_come_from_fp32_scores(synthetic_facade, tmp_path):
    run = tmp_path / "run"
    part2(
        "--data", synthetic_facade, *SYN_P2, "--epochs", 3, "--batch-size", 4, "--output-dir", run
    )
    ckpt = runfiles.load_checkpoint(run / "checkpoints" / "best.pt")
    net = models.from_checkpoint(ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = net(x)
    assert scores.dtype == torch.float32
    distinct = scores.unique().numel()
    assert distinct > 2 * scores.bfloat16().float().unique().numel()  # not bf16 values cast up
    evaluate = ["--eval-only", run / "checkpoints" / "best.pt", "--data", synthetic_facade, *SYN_P2]
    fp32 = part2(*evaluate, "--no-amp", "--output-dir", tmp_path / "fp32")
    amp = part2(*evaluate, "--amp", "--output-dir", tmp_path / "amp")
    assert abs(fp32["mean_ap"] - amp["mean_ap"]) < 0.005
    for name in datasets.FACADE_CLASSES:
        assert abs(fp32["ap"][name] - amp["ap"][name]) < 0.01, name


# ----------------------------------------------------------------------------- 9. selection metric
def test_validation_loss_independent_of_batching():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 5, (7, 16, 16))
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 1.0])
    net = models.build_model("unet", num_classes=5, width=4, depth=2).eval()
    rt = utils.Runtime(device=torch.device("cpu"), progress=False)
    values = []
    ce_smooth = losses.CrossEntropy(label_smoothing=0.1)
    z_dice = losses.WithZLoss(losses.CrossEntropyDice(weight, 5), 0.1)
    for loss_fn in (losses.CrossEntropyDice(weight, 5), ce_smooth, losses.OneVsRest(5), z_dice):
        for batch in (1, 2, 3, 7):
            loader = datasets.TensorLoader(
                images, labels, batch, mean=[0.5] * 3, std=[0.25] * 3, train=False
            )
            values.append(engine.evaluate(net, loader, loss_fn, rt)["loss"])
        # the whole split in one batch is the definition: the loss of all pixels together
        with torch.no_grad():
            x = datasets.normalize(images, [0.5] * 3, [0.25] * 3)
            whole = loss_fn(net(x), labels).item()
        assert values[-4:] == pytest.approx([whole] * 4, rel=1e-6)


# ----------------------------------------------------------------------------- 8. predict
def test_predict_keeps_same_named_inputs_apart_and_skips_too_large(
    tmp_path, synthetic_facade, monkeypatch, capsys
):
    run = tmp_path / "run"
    part2("--data", synthetic_facade, *SYN_P2, "--epochs", 1, "--max-steps", 1, "--output-dir", run)
    rng = np.random.default_rng(0)
    paths = []
    for folder, size in (("a", (20, 24)), ("b", (30, 18)), ("c", (64, 64))):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "x.jpg")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 2 x 1000: too large
    out = tmp_path / "pred"
    ckpt = str(run / "checkpoints/best.pt")
    argv = ["predict", "--checkpoint", ckpt, *map(str, paths), "--output-dir", str(out)]
    with pytest.raises(SystemExit) as info:
        part2_segment.cli_main(argv)
    assert info.value.code == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "a__x_mask.png",
        "a__x_overlay.png",
        "b__x_mask.png",
        "b__x_overlay.png",
    ]
    with Image.open(out / "a__x_mask.png") as a, Image.open(out / "b__x_mask.png") as b:
        assert a.size == (24, 20) and b.size == (18, 30)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "c/x.jpg" in err[0]


def test_the_policy_decides_precision_and_layout_and_args_json_records_why(
    fm_root, tmp_path, monkeypatch
):
    """Patched hardware facts, not today's machine: a CPU with and without native bf16, the
    flags that override the policy, and --eval-only keeping the checkpoint's precision."""
    avx512_bf16 = hardware.Hardware(cpu_bf16_units=True, onednn_avx512=True)
    avx2 = hardware.Hardware(cpu_bf16_units=False, onednn_avx512=False)
    for hw, flags, expect_amp, why in (
        (avx512_bf16, [], True, "bf16 autocast: this CPU computes bf16 natively"),
        (avx512_bf16, ["--no-amp"], False, "fp32 (--no-amp)"),
        (avx2, [], False, "fp32: this CPU has no native bf16"),
        (avx2, ["--amp"], True, "bf16 autocast (asked for)"),
    ):
        monkeypatch.setattr(hardware, "read_hardware", lambda hw=hw: hw)
        run = tmp_path / f"run_{hw.cpu_bf16_units}_{len(flags)}"
        part1(*p1_common(fm_root), "--epochs", 1, "--max-steps", 1, *flags, "--output-dir", run)
        recorded = runfiles.read_json(run / "args.json")
        effective = recorded["effective"]  # apart from the flags as given
        assert recorded["amp"] == {(): None, ("--no-amp",): False, ("--amp",): True}[tuple(flags)]
        assert (effective["amp_dtype"] == "bf16") is expect_amp and effective["channels_last"]
        assert recorded["channels_last"] is None  # not given: the policy chose
        assert effective["reasons"]["precision"].startswith(why)
        assert effective["reasons"]["memory_format"].startswith("channels-last")
        first_line = (run / "log.txt").read_text().splitlines()[0]
        assert why in first_line and "channels-last" in first_line
        assert (
            effective["allocator"].startswith("allocator:") and effective["allocator"] in first_line
        )
        emulated = "warning: bf16 autocast was asked for" in (run / "log.txt").read_text()
        assert emulated is (hw is avx2 and expect_amp)
    # --eval-only tests in the checkpoint's precision unless told: an fp32 run stays fp32 on
    # bf16 hardware
    monkeypatch.setattr(hardware, "read_hardware", lambda: avx512_bf16)
    fp32_run = tmp_path / "run_False_0"
    part1("--eval-only", fp32_run / "checkpoints" / "best.pt", *p1_common(fm_root))
    (evaluation,) = fp32_run.glob("eval-*")
    assert runfiles.read_json(evaluation / "args.json")["effective"]["amp_dtype"] is None


def test_eval_only_records_the_checkpoints_run_and_refuses_contradictions(fm_root, tmp_path):
    """args.json of an --eval-only folder describes the checkpoint's run (seed, recipe, model
    width), not today's defaults; a flag that contradicts the checkpoint is one line."""
    run = tmp_path / "run"
    flags = "--model fashion_net --width 8 --seed 3 --lr 0.005 --epochs 1 --max-steps 2".split()
    part1(*p1_common(fm_root), *flags, "--output-dir", run)
    best = run / "checkpoints" / "best.pt"
    part1("--eval-only", best, "--data-root", fm_root, "--tta")
    (evaluation,) = run.glob("eval-*")
    recorded = runfiles.read_json(evaluation / "args.json")
    assert (recorded["seed"], recorded["lr"], recorded["width"]) == (3, 0.005, 8)
    assert (recorded["epochs"], recorded["val_fraction"], recorded["tta"]) == (1, 0.1, True)
    for flag, value in (("--width", "16"), ("--seed", "4"), ("--lr", "0.1")):
        with pytest.raises(utils.UserError, match=f"^{flag} {value} differs from the checkpoint"):
            part1("--eval-only", best, "--data-root", fm_root, flag, value)
