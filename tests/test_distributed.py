"""Two gloo ranks on the CPU against one process, and bf16 AMP on the CPU. torchrun itself runs
Part 1's DDP training and the tests of how a failing rank ends the job; the other tests fork their
ranks from a warm process with torchrun's environment (ranks.py): the same script, run as its
``__main__``, without importing torch three times per test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import part1_classify
import part2_segment
import runfiles
from conftest import HANG_GUARD_S, REPO, make_fashion_set
from ranks import run_ranks

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# the synthetic facade set's train / val / test images
P2_RANGES = "--train-range 0 7 --val-range 8 10 --test-range 0 2".split()


# the scripts' flags for a rank: one thread each (two ranks share the 2-core CPU), no bars
RANK_FLAGS = ["--threads", "1", "--no-progress"]


def torchrun_proc(script, *args: str) -> subprocess.CompletedProcess:
    """``script args`` on two gloo ranks under torchrun itself."""
    return subprocess.run([*TORCHRUN, str(script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)  # fmt: skip


def forked_proc(script, *args: str) -> subprocess.CompletedProcess:
    """The same, each rank forked from a warm process with torchrun's environment (ranks.py)."""
    return run_ranks(script, *args, timeout=HANG_GUARD_S)


def assert_finished(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def torchrun(script: str, *args: str) -> None:
    assert_finished(torchrun_proc(script, *args, *RANK_FLAGS))


def two_ranks(script: str, *args: str) -> None:
    assert_finished(forked_proc(script, *args, *RANK_FLAGS))


def run_on_two_ranks(
    tmp_path, name: str, body: str, launch=forked_proc
) -> subprocess.CompletedProcess:
    """``body`` (the code of a ``main(args)`` that may use torch, dist and utils) run by
    utils.run_cli on two gloo ranks, forked or under torchrun (``launch=torchrun_proc``)."""
    script = tmp_path / f"{name}.py"
    script.write_text(
        f"import argparse, atexit, sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "import torch\nimport torch.distributed as dist\nimport utils\n\n"
        f"{body}\nutils.run_cli(main, argparse.ArgumentParser())\n"
    )
    return launch(script)


def part1(*args: str) -> dict:
    return part1_classify.main(
        part1_classify.get_args_parser().parse_args([*args, "--no-progress"])
    )


def part2(*args: str) -> dict:
    return part2_segment.main(part2_segment.get_args_parser().parse_args([*args, "--no-progress"]))


def assert_rows_close(rows_a, rows_b, keys, tol):
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b):
        for k in keys:
            assert a[k] == pytest.approx(b[k], abs=tol), (k, a, b)


@pytest.fixture(scope="module")
def part1_runs(fashion_root, tmp_path_factory):
    """The same training as 2 processes x batch 100 and as 1 process x batch 200."""
    base = tmp_path_factory.mktemp("ddp1")
    flags = "--train-limit 1000 --epochs 2 --eval-batch-size 300 --no-amp".split()  # fp32: exact
    common = ["--data-root", str(fashion_root), *flags]
    torchrun("part1_classify.py", *common, "--batch-size", "100", "--output-dir", str(base / "ddp"))
    part1(*common, "--batch-size", "200", "--output-dir", str(base / "single"), "--threads", "2")
    return base, common


def test_part1_ddp_training_matches_single_process(part1_runs):
    base, _ = part1_runs
    ddp, single = (
        runfiles.read_csv(base / "ddp" / "metrics.csv"),
        runfiles.read_csv(base / "single" / "metrics.csv"),
    )
    assert_rows_close(ddp, single, ["train_loss", "val_loss", "lr"], 1e-4)
    assert_rows_close(
        ddp, single, ["train_accuracy", "val_accuracy"], 2e-3
    )  # a sample may flip at a tie
    assert "global batch 200" in (base / "ddp" / "log.txt").read_text()


def test_part1_ddp_evaluation_equals_single_process(part1_runs, tmp_path):
    base, common = part1_runs
    ddp = runfiles.read_json(base / "ddp" / "results.json")
    best = base / "ddp" / "checkpoints" / "best.pt"
    single_eval = part1(*common, "--eval-only", str(best), "--output-dir", str(tmp_path))
    assert ddp["confusion_matrix"] == single_eval["confusion_matrix"]
    assert (
        sum(map(sum, ddp["confusion_matrix"])) == 10000
    )  # every test image once, no sampler padding
    assert ddp["test_accuracy"] == single_eval["test_accuracy"]


def test_part1_resume_under_torchrun(part1_runs, tmp_path):
    base, common = part1_runs
    run = tmp_path / "resumed"
    ddp = ["part1_classify.py", *common, "--batch-size", "100"]
    two_ranks(*ddp, "--output-dir", str(run), "--stop-after-epochs", "1")
    assert len(runfiles.read_csv(run / "metrics.csv")) == 1
    two_ranks(*ddp, "--resume", str(run / "checkpoints" / "last.pt"))
    resumed, straight = (
        runfiles.read_csv(run / "metrics.csv"),
        runfiles.read_csv(base / "ddp" / "metrics.csv"),
    )
    assert_rows_close(
        resumed, straight, ["train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr"], 1e-9
    )
    assert (
        runfiles.read_json(run / "results.json")["test_accuracy"]
        == runfiles.read_json(base / "ddp" / "results.json")["test_accuracy"]
    )


def test_part2_ddp_matches_single_process(synthetic_facade, tmp_path):
    flags = [*P2_RANGES, *"--epochs 2 --eval-batch-size 2 --no-amp".split()]  # fp32: exact
    common = ["--data", str(synthetic_facade), *flags]
    # the 2 processes also compute their batches one image at a time (DDP reduces once per batch)
    ddp_flags = ["--batch-size", "2", "--micro-batch", "1", "--output-dir", str(tmp_path / "ddp")]
    two_ranks("part2_segment.py", *common, *ddp_flags)
    part2(*common, "--batch-size", "4", "--output-dir", str(tmp_path / "single"), "--threads", "2")
    ddp_rows, single_rows = (
        runfiles.read_csv(tmp_path / "ddp" / "metrics.csv"),
        runfiles.read_csv(tmp_path / "single" / "metrics.csv"),
    )
    assert_rows_close(ddp_rows, single_rows, ["train_loss", "val_loss"], 1e-4)
    ddp = runfiles.read_json(tmp_path / "ddp" / "results.json")
    best = tmp_path / "ddp" / "checkpoints" / "best.pt"
    again = part2(*common, "--eval-only", str(best), "--output-dir", str(tmp_path / "eval"))
    assert ddp["confusion_matrix"] == again["confusion_matrix"]
    assert list(ddp["ap"].values()) == pytest.approx(
        list(again["ap"].values()), abs=1e-6, nan_ok=True
    )
    assert ddp["mean_ap"] == pytest.approx(again["mean_ap"], abs=1e-6)


def test_bf16_amp_on_cpu(fashion_root, synthetic_facade, tmp_path):
    flags = "--train-limit 1000 --epochs 1 --amp --channels-last".split()
    r1 = part1("--data-root", str(fashion_root), *flags, "--output-dir", str(tmp_path / "p1"))
    assert 0.05 < r1["test_accuracy"] <= 1
    ckpt = torch.load(tmp_path / "p1" / "checkpoints" / "last.pt", weights_only=False)
    assert "scaler" in ckpt and ckpt["args"]["effective"]["amp_dtype"] == "bf16"
    rows = runfiles.read_csv(tmp_path / "p1" / "metrics.csv")
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    flags = [*P2_RANGES, *"--epochs 1 --batch-size 4 --amp".split()]
    r2 = part2("--data", str(synthetic_facade), *flags, "--output-dir", str(tmp_path / "p2"))
    assert 0 < r2["mean_ap"] <= 1


def test_user_error_on_one_rank_ends_every_rank(tmp_path):
    """Rank 0 alone looks for the data (the other rank waits at a barrier): its one-line error
    must end the whole job, with the error's exit code, instead of leaving rank 1 hanging."""
    data, run = str(tmp_path / "absent"), str(tmp_path / "run")
    proc = torchrun_proc(
        "part1_classify.py", "--data-root", data, "--no-download", "--output-dir", run, *RANK_FLAGS
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "Fashion-MNIST not found" in ours[0], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_sync_bn_on_cpu_is_a_clear_error(make_fashion_root, tmp_path):
    root = make_fashion_root(tmp_path / "fm")
    flags = "--no-download --model fashion_net --sync-bn".split()
    proc = forked_proc("part1_classify.py", "--data-root", str(root), *flags, *RANK_FLAGS,
                       "--output-dir", str(tmp_path / "r"))  # fmt: skip
    assert proc.returncode != 0
    assert any(line.startswith("error: --sync-bn needs CUDA") for line in proc.stderr.splitlines())
    assert not (tmp_path / "r").exists()


def test_empty_shard_and_time_limit_under_torchrun(synthetic_facade, tmp_path):
    """One validation and one test image for two ranks (rank 1's shards are empty) and a time
    limit that passes during epoch 1: both ranks stop together, and the test numbers equal one
    process's evaluation of the same checkpoint."""
    flags = (
        "--train-range 0 7 --val-range 8 8 --test-range 0 0 --epochs 3 --time-limit 0.0001"
        " --model unet --width 4 --crop 32"
    )
    common = ["--data", str(synthetic_facade), *flags.split()]
    two_ranks("part2_segment.py", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "d"))
    part2(*common, "--batch-size", "4", "--output-dir", str(tmp_path / "s"), "--threads", "2")
    ddp, single = (runfiles.read_csv(tmp_path / n / "metrics.csv") for n in ("d", "s"))
    assert len(ddp) == len(single) == 1
    assert torch.isfinite(torch.tensor(ddp[0]["val_loss"]))
    assert "time limit" in (tmp_path / "d" / "log.txt").read_text()
    best = tmp_path / "d" / "checkpoints" / "best.pt"
    ddp_eval = part2(*common, "--eval-only", str(best), "--output-dir", str(tmp_path / "e"))
    ddp_res = runfiles.read_json(tmp_path / "d" / "results.json")
    assert ddp_eval["test_loss"] == pytest.approx(ddp_res["test_loss"], rel=1e-6)
    assert ddp_eval["confusion_matrix"] == ddp_res["confusion_matrix"]
    assert ddp_eval["mean_ap"] == pytest.approx(ddp_res["mean_ap"], abs=1e-9)


def test_any_exception_on_one_rank_ends_that_rank_through_os_exit(tmp_path):
    """A plain RuntimeError on rank 1 while rank 0 waits at a barrier: the traceback is printed
    once, rank 1 leaves through os._exit(1) (its atexit handlers, where gloo's teardown could
    abort or hang, never run) and torchrun ends the job."""
    proc = run_on_two_ranks(
        tmp_path,
        "fails_on_rank_1",
        "def main(args):\n"
        "    rt = utils.settled_runtime(device='cpu')\n"
        "    atexit.register(print, 'interpreter teardown on rank', rt.rank, file=sys.stderr)\n"
        "    if rt.rank == 1:\n"
        "        raise RuntimeError('boom on rank 1')\n"
        "    dist.barrier()  # waits for rank 1, which never comes\n",
        launch=torchrun_proc,  # torchrun's own ending of the job
    )
    assert proc.returncode != 0
    assert proc.stderr.count("RuntimeError: boom on rank 1") == 1, proc.stderr[-3000:]
    assert "interpreter teardown on rank 1" not in proc.stderr


# ----------------------------------------------------------------------------- one policy
FAKE_HARDWARE = """import json, os, sys
sys.path.insert(0, {repo!r})
import hardware, utils, part1_classify
facts = json.loads(os.environ["FAKE_HARDWARE"])[int(os.environ["RANK"])]
hardware.read_hardware = lambda: hardware.Hardware(**facts)
setup_runtime = utils.setup_runtime

def recording(*args, **kwargs):
    rt = setup_runtime(*args, **kwargs)
    with open(os.environ["RECORD"] + str(rt.rank), "w") as f:
        json.dump(rt.settings.record(), f)
    return rt

utils.setup_runtime = recording
utils.run_cli(part1_classify.main, part1_classify.get_args_parser())
"""
NATIVE_BF16 = {"cpu_bf16_units": True, "onednn_avx512": True}
NO_BF16 = {"cpu_bf16_units": False, "onednn_avx512": False}


def run_with_hardware(tmp_path, per_rank: list[dict]) -> subprocess.CompletedProcess:
    """Part 1 on two forked ranks (ranks.py), each seeing the hardware facts given for it."""
    script = tmp_path / "fake_hardware.py"
    script.write_text(FAKE_HARDWARE.format(repo=str(REPO)))
    data = make_fashion_set(tmp_path / "fm", n_train=60, n_test=20)
    env = {"FAKE_HARDWARE": json.dumps(per_rank), "RECORD": str(tmp_path / "rank")}
    argv = ["--data-root", str(data), "--no-download", "--batch-size", "16", "--epochs", "1",
            "--output-dir", str(tmp_path / "run"), *RANK_FLAGS]  # fmt: skip
    return run_ranks(script, *argv, env=env, timeout=HANG_GUARD_S)


def test_rank_0_decides_the_settings_and_every_rank_follows(tmp_path):
    """Rank 1 alone would pick bf16 (native there) and rank 0 fp32: both run fp32, as
    args.json (rank 0's) says."""
    proc = run_with_hardware(tmp_path, [NO_BF16, NATIVE_BF16])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    assert [r["amp_dtype"] for r in ranks] == [None, None]
    assert ranks[1]["reasons"] == ranks[0]["reasons"]
    assert runfiles.read_json(tmp_path / "run" / "args.json")["effective"]["amp_dtype"] is None


def test_a_rank_whose_hardware_cannot_follow_stops_with_one_line(tmp_path):
    """Rank 0 picks bf16 by policy (native there); rank 1 would emulate it, many times slower,
    holding every rank back: it stops with one line and torchrun ends the job."""
    proc = run_with_hardware(tmp_path, [NATIVE_BF16, NO_BF16])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: rank 1 cannot follow rank 0's bf16 autocast: this CPU has no native bf16 "
        "(no AVX512-BF16 or AMX) (run every process with --no-amp, or on machines of one kind)"
    ], proc.stderr[-3000:]
    assert not (tmp_path / "rank1").exists()


def test_collectives_under_inference_mode(tmp_path):
    """Evaluation runs under inference_mode; torch 2.3 refused collectives on the tensors made
    there ("Inplace update to inference tensor outside InferenceMode")."""
    proc = run_on_two_ranks(
        tmp_path,
        "collectives",
        "def main(args):\n"
        "    rt = utils.settled_runtime(device='cpu')\n"
        "    r = rt.rank\n"
        "    with torch.inference_mode():\n"
        "        total = utils.all_reduce_sum(torch.full((2,), r + 1.0), rt)\n"
        "        gathered = utils.all_gather_cat(torch.arange(r + 1.0), rt)\n"
        "        ordered = utils.gather_in_dataset_order(torch.tensor([r, r + 2]), rt)\n"
        "        word = utils.broadcast_object(f'rank {r}', rt)\n"
        "    assert total.tolist() == [3.0, 3.0], total\n"
        "    assert gathered.tolist() == [0.0, 0.0, 1.0], gathered\n"
        "    assert ordered.tolist() == [0, 1, 2, 3], ordered\n"
        "    assert word == 'rank 0', word\n"
        "    utils.cleanup_runtime(rt)\n",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
