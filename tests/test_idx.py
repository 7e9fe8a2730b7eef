"""datasets.read_idx / load_fashion_split: exact round trips and one-line errors naming the file."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import datasets
import utils
from conftest import idx_bytes, write_idx


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 4), (2, 3, 4, 5)])
def test_read_idx_round_trip(tmp_path, gz, shape):
    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    path = write_idx(tmp_path / "x-idx", array, gz=gz)
    out = datasets.read_idx(path)
    assert out.dtype == torch.uint8
    assert tuple(out.shape) == shape
    assert np.array_equal(out.numpy(), array)


def test_read_idx_gz_detected_by_magic_not_name(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "no-suffix"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(datasets.read_idx(path).numpy(), array)


def _expect_user_error(path):
    with pytest.raises(utils.UserError) as info:
        datasets.read_idx(path)
    assert str(path) in str(info.value), f"message does not name the file: {info.value}"
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_bad_magic(tmp_path, gz):
    data = bytearray(idx_bytes(np.zeros((2, 2), np.uint8)))
    data[2] = 0x0D  # float type instead of unsigned byte
    path = tmp_path / "bad-magic"
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    assert "magic" in _expect_user_error(path)


def test_read_idx_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    _expect_user_error(path)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("delta", [-1, +3], ids=["short", "long"])
def test_read_idx_wrong_data_size(tmp_path, gz, delta):
    data = idx_bytes(np.ones((4, 5), np.uint8))
    data = data[:delta] if delta < 0 else data + b"\0" * delta
    path = tmp_path / "wrong-size"
    path.write_bytes(gzip.compress(data) if gz else data)
    msg = _expect_user_error(path)
    assert "20" in msg  # the header's expected byte count is reported


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "short-header"
    path.write_bytes(bytes([0, 0, 8, 3]) + b"\0\0\0\1")  # says 3 dims, holds one
    _expect_user_error(path)


def test_read_idx_truncated_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = tmp_path / "truncated.gz"
    path.write_bytes(blob[: len(blob) // 2])
    _expect_user_error(path)


def test_read_idx_gzip_crc_error(tmp_path):
    blob = bytearray(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8))))
    blob[-8:-4] = b"\0\0\0\0"  # wrong CRC32 in the trailer
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(blob))
    _expect_user_error(path)


def test_read_idx_corrupt_deflate_stream(tmp_path):
    """A damaged (not truncated) gzip body makes zlib raise zlib.error, which is not an OSError:
    read_idx must still turn it into a UserError naming the file."""
    blob = bytearray(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8))))
    blob[10] = 0xFF  # first deflate block header -> reserved block type 11
    path = tmp_path / "corrupt.gz"
    path.write_bytes(bytes(blob))
    _expect_user_error(path)


# ----------------------------------------------------------------------------- load_fashion_split
def _write_split(root, n_images, labels, gz=True):
    img_stem, lbl_stem = datasets.FASHION_FILES["train"]
    write_idx(
        root / (img_stem + (".gz" if gz else "")), np.zeros((n_images, 28, 28), np.uint8), gz=gz
    )
    write_idx(root / (lbl_stem + (".gz" if gz else "")), np.asarray(labels, np.uint8), gz=gz)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_load_fashion_split_ok(tmp_path, gz):
    _write_split(tmp_path, 10, np.arange(10) % 10, gz=gz)
    x, y = datasets.load_fashion_split(tmp_path, "train")
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == list(range(10))


def test_load_fashion_split_count_mismatch(tmp_path):
    _write_split(tmp_path, 10, np.zeros(9))
    with pytest.raises(utils.UserError) as info:
        datasets.load_fashion_split(tmp_path, "train")
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "10" in msg and "9" in msg


def test_load_fashion_split_label_out_of_range(tmp_path):
    _write_split(tmp_path, 5, [0, 1, 10, 2, 3])
    with pytest.raises(utils.UserError) as info:
        datasets.load_fashion_split(tmp_path, "train")
    assert "train-labels-idx1-ubyte" in str(info.value) and "10" in str(info.value)


def test_load_fashion_split_label_nine_is_valid(tmp_path):
    _write_split(tmp_path, 3, [9, 9, 0])
    _, y = datasets.load_fashion_split(tmp_path, "train")
    assert y.tolist() == [9, 9, 0]


def test_load_fashion_split_missing_file(tmp_path):
    _write_split(tmp_path, 3, [0, 1, 2])
    (tmp_path / (datasets.FASHION_FILES["train"][1] + ".gz")).unlink()
    with pytest.raises(utils.UserError, match="train-labels-idx1-ubyte"):
        datasets.load_fashion_split(tmp_path, "train")


def test_load_fashion_split_wrong_dims(tmp_path):
    img_stem, lbl_stem = datasets.FASHION_FILES["train"]
    write_idx(tmp_path / (img_stem + ".gz"), np.zeros((4, 28 * 28), np.uint8))  # 2-D images
    write_idx(tmp_path / (lbl_stem + ".gz"), np.zeros(4, np.uint8))
    with pytest.raises(utils.UserError):
        datasets.load_fashion_split(tmp_path, "train")


def test_locate_fashion_mnist_missing_no_download(tmp_path):
    with pytest.raises(utils.UserError) as info:
        datasets.locate_fashion_mnist(tmp_path / "nothing", download=False, log=lambda *_: None)
    assert str(tmp_path / "nothing") in str(info.value)


# ----------------------------------------------------------------------------- the real files
def test_real_fashion_mnist(fashion_root):
    x, y = datasets.load_fashion_split(fashion_root, "train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,)
    assert torch.bincount(y, minlength=10).tolist() == [6000] * 10
    tx, ty = datasets.load_fashion_split(fashion_root, "test")
    assert tx.shape == (10000, 1, 28, 28)
    assert torch.bincount(ty, minlength=10).tolist() == [1000] * 10
    assert int(x.max()) == 255 and int(x.min()) == 0
    # Fashion-MNIST is famously dark: mean pixel ~0.286, std ~0.353 (on 0-1)
    mean, std = datasets.channel_stats(x)
    assert mean[0] == pytest.approx(0.2860, abs=2e-3) and std[0] == pytest.approx(0.3530, abs=2e-3)
