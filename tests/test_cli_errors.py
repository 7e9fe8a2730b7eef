"""Command-line error behaviour: exit 2, one 'error:' line, no traceback, and (Part 2) no run
folder left behind. Most run in this process as the scripts' ``__main__`` does (run_in_process);
one per entry point runs as a real subprocess (run_script; Part 1's is in test_trust.py)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from conftest import (
    assert_one_line_error,
    run_in_process,
    run_script,
    save_label_png,
    write_idx,
)

no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA is available here: --device cuda is valid"
)


# ----------------------------------------------------------------------------- Part 1
def _part1(*args, tmp_path):
    return run_in_process(
        "part1_classify.py", *args, "--output-dir", str(tmp_path / "run"), "--no-progress"
    )


def test_part1_missing_data_root(tmp_path):
    proc = _part1("--data-root", str(tmp_path / "absent"), "--no-download", tmp_path=tmp_path)
    assert_one_line_error(proc, mentions=str(tmp_path / "absent"))


def _damage(root, how):
    img = root / (datasets.FASHION_FILES["test"][0] + ".gz")
    lbl = root / (datasets.FASHION_FILES["test"][1] + ".gz")
    if how == "truncated_gzip":
        blob = img.read_bytes()
        img.write_bytes(blob[: len(blob) // 2])
        return img
    if how == "bad_magic":
        img.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + b"\x00" * 20))
        return img
    if how == "wrong_size":
        raw = gzip.decompress(img.read_bytes())
        img.write_bytes(gzip.compress(raw[:-5]))
        return img
    if how == "count_mismatch":
        write_idx(lbl, np.zeros(7, np.uint8))
        return lbl
    if how == "label_out_of_range":
        write_idx(lbl, np.full(20, 12, np.uint8))
        return lbl
    if how == "corrupt_deflate":  # damaged (not truncated) gzip body: zlib.error
        blob = bytearray(img.read_bytes())
        blob[10] = 0xFF
        img.write_bytes(bytes(blob))
        return img
    raise ValueError(how)


# (wrong_size / count_mismatch are covered in-process by test_idx.py; each subprocess costs ~2 s)
@pytest.mark.parametrize(
    "how", ["truncated_gzip", "bad_magic", "label_out_of_range", "corrupt_deflate"]
)
def test_part1_corrupt_data_root(tmp_path, make_fashion_root, how):
    root = make_fashion_root(tmp_path / "fm")
    bad_file = _damage(root, how)
    proc = _part1("--data-root", str(root), "--no-download", "--epochs", "1", tmp_path=tmp_path)
    assert_one_line_error(proc, mentions=bad_file.name)


@no_cuda
def test_part1_device_cuda_without_cuda(tmp_path, make_fashion_root):
    root = make_fashion_root(tmp_path / "fm")
    proc = _part1("--data-root", str(root), "--device", "cuda", tmp_path=tmp_path)
    assert_one_line_error(proc, mentions="CUDA")


def test_part1_bad_checkpoint(tmp_path, make_fashion_root):
    root = make_fashion_root(tmp_path / "fm")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    proc = _part1("--data-root", str(root), "--eval-only", str(garbage), tmp_path=tmp_path)
    assert_one_line_error(proc, mentions="garbage.pt")
    proc = _part1(
        "--data-root", str(root), "--resume", str(tmp_path / "missing.pt"), tmp_path=tmp_path
    )
    assert_one_line_error(proc, mentions="missing.pt")


def test_part1_rejects_segmentation_checkpoint(tmp_path, make_fashion_root):
    """A Part 2 checkpoint given to Part 1 must be a one-line user error, not a KeyError
    traceback."""
    root = make_fashion_root(tmp_path / "fm")
    ckpt = tmp_path / "seg.pt"
    torch.save(
        {
            "model": {},
            "model_name": "facade_fcn",
            "model_kwargs": {"num_classes": 5},
            "task": "segmentation",
            "epoch": 1,
            "normalization": {"mean": [0.5] * 3, "std": [0.2] * 3},
        },
        ckpt,
    )
    proc = _part1("--data-root", str(root), "--eval-only", str(ckpt), tmp_path=tmp_path)
    assert_one_line_error(proc)


def test_part1_report_only_not_a_run(tmp_path):
    (tmp_path / "empty_run").mkdir()
    proc = run_in_process("part1_classify.py", "--report-only", str(tmp_path / "empty_run"))
    assert_one_line_error(proc, mentions="results.json")


def test_part1_width_without_a_width_model(tmp_path):
    """--width means nothing to sigmoid_cnn: refused before the data is read."""
    proc = _part1("--width", "8", "--data-root", str(tmp_path / "absent"), tmp_path=tmp_path)
    assert_one_line_error(proc, mentions="--width applies to fashion_net only")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- Part 2
def _part2(data, tmp_path, *extra):
    run_dir = tmp_path / "run"
    flags = "--train-range 0 9 --val-range 10 11 --test-range 0 3 --epochs 1".split()
    argv = ["--data", str(data), *flags, "--output-dir", str(run_dir), "--no-progress", *extra]
    proc = run_in_process("part2_segment.py", *argv)
    return proc, run_dir


def _check_part2_error(proc, run_dir, mentions=None):
    line = assert_one_line_error(proc, mentions=mentions)
    assert not run_dir.exists(), (
        f"bad data left a run folder behind: {sorted(p.name for p in run_dir.iterdir())}"
    )
    return line


def test_part2_missing_data_folder(tmp_path):
    proc, run_dir = _part2(tmp_path / "absent", tmp_path)
    _check_part2_error(proc, run_dir, mentions=str(tmp_path / "absent"))


def test_part2_missing_file_in_range(tmp_path, synthetic_facade):
    victim = synthetic_facade / "train" / "eecs442_0005.png"
    victim.unlink()
    proc, run_dir = _part2(synthetic_facade, tmp_path)
    _check_part2_error(proc, run_dir, mentions="eecs442_0005.png")


def test_part2_range_past_the_end(tmp_path, synthetic_facade):
    proc, run_dir = _part2(
        synthetic_facade, tmp_path, "--test-range", "0", "4"
    )  # test_dev has 0..3
    _check_part2_error(proc, run_dir, mentions="eecs442_0004")


def test_part2_reversed_range(tmp_path, synthetic_facade):
    proc, run_dir = _part2(synthetic_facade, tmp_path, "--train-range", "5", "2")
    _check_part2_error(proc, run_dir, mentions="5 2")


def test_part2_label_value_too_large(tmp_path, synthetic_facade):
    png = synthetic_facade / "train" / "eecs442_0003.png"
    label = np.asarray(Image.open(png)).copy()
    label[0, 0] = 7
    save_label_png(png, label)
    proc, run_dir = _part2(synthetic_facade, tmp_path)
    line = _check_part2_error(proc, run_dir, mentions="eecs442_0003.png")
    assert "7" in line


def test_part2_rgb_label_rejected(tmp_path, synthetic_facade):
    png = synthetic_facade / "test_dev" / "eecs442_0001.png"
    Image.open(png).convert("RGB").save(png)
    proc, run_dir = _part2(synthetic_facade, tmp_path)
    _check_part2_error(proc, run_dir, mentions="eecs442_0001.png")


def test_part2_image_label_size_mismatch(tmp_path, synthetic_facade):
    jpg = synthetic_facade / "train" / "eecs442_0002.jpg"
    Image.open(jpg).resize((30, 32)).save(jpg, format="JPEG")
    proc, run_dir = _part2(synthetic_facade, tmp_path)
    _check_part2_error(proc, run_dir, mentions="eecs442_0002")


def test_part2_truncated_jpg(tmp_path, synthetic_facade):
    jpg = synthetic_facade / "train" / "eecs442_0007.jpg"
    blob = jpg.read_bytes()
    jpg.write_bytes(blob[: len(blob) // 2])
    proc, run_dir = _part2(synthetic_facade, tmp_path)
    _check_part2_error(proc, run_dir, mentions="eecs442_0007.jpg")


def test_part2_size_not_divisible_for_model(tmp_path, make_facade):
    """40x40 images cannot go through a depth-4 U-Net (needs multiples of 16): a one-line error
    naming 16, and, as for any bad data, the size check comes before the run folder is created, so
    none is left."""
    data = make_facade(tmp_path / "syn40", size=40)
    proc, run_dir = _part2(data, tmp_path, "--model", "unet", "--width", "4", "--crop", "32")
    _check_part2_error(proc, run_dir, mentions="16")


def test_part2_width_without_a_width_model(tmp_path, synthetic_facade):
    proc, run_dir = _part2(synthetic_facade, tmp_path, "--width", "8")  # facade_fcn
    _check_part2_error(proc, run_dir, mentions="--width applies to unet only")


def test_part2_downsample_without_a_unet_or_at_a_factor_it_lacks(tmp_path, synthetic_facade):
    proc, run_dir = _part2(synthetic_facade, tmp_path, "--downsample", "2")  # facade_fcn
    _check_part2_error(proc, run_dir, mentions="--downsample applies to unet only")
    proc, run_dir = _part2(synthetic_facade, tmp_path, "--model", "unet", "--downsample", "3")
    _check_part2_error(proc, run_dir, mentions="--downsample")


def test_part2_downsampled_unet_needs_crops_of_twice_the_multiple(tmp_path, synthetic_facade):
    """--downsample 2 doubles the U-Net's size multiple (16 -> 32): a 16-px crop is refused."""
    flags = ("--model", "unet", "--width", "4", "--downsample", "2", "--crop", "16")
    proc, run_dir = _part2(synthetic_facade, tmp_path, *flags)
    _check_part2_error(proc, run_dir, mentions="--crop 16 is not a multiple of 32")


@no_cuda
def test_part2_device_cuda_without_cuda(tmp_path, synthetic_facade):
    proc, run_dir = _part2(synthetic_facade, tmp_path, "--device", "cuda")
    _check_part2_error(proc, run_dir, mentions="CUDA")


def test_part2_rejects_classification_checkpoint(tmp_path, synthetic_facade):
    """A Part 1 checkpoint given to Part 2 must be a one-line user error, not a KeyError
    traceback."""
    ckpt = tmp_path / "cls.pt"
    torch.save(
        {
            "model": {},
            "model_name": "sigmoid_cnn",
            "model_kwargs": {"num_classes": 10},
            "task": "classification",
            "epoch": 1,
            "normalization": {"mean": [0.3], "std": [0.3]},
        },
        ckpt,
    )
    proc, run_dir = _part2(synthetic_facade, tmp_path, "--eval-only", str(ckpt))
    _check_part2_error(proc, run_dir)


def test_predict_bad_checkpoint(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    missing, out = str(tmp_path / "missing.pt"), str(tmp_path / "out")
    proc = run_script(
        "part2_segment.py", "predict", "--checkpoint", missing, str(img), "--output-dir", out
    )
    assert_one_line_error(proc, mentions="missing.pt")
    assert not (tmp_path / "out").exists()
