"""Shared fixtures: repo on sys.path, real-data locations, tiny synthetic data sets, subprocess
helper."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(2)

import allocator  # noqa: E402  (needs the repo on sys.path)
import datasets  # noqa: E402
import ranks  # noqa: E402
import utils  # noqa: E402

# As the scripts do at start-up: the in-process tests allocate like training loops too. This
# process's start-up ends here: its trainings do not each hand its heap back (engine.fit).
allocator.keep_freed_memory()
allocator.release_once("start-up")


def pytest_sessionfinish(session):
    ranks.stop_forkserver()  # reaped here, so that a timed suite counts the forked ranks


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="session")
def data_dir() -> Path:
    """DATA_DIR, else the repository's data/ (the scripts' default), else ../shared/data."""
    if os.environ.get("DATA_DIR"):
        return Path(os.environ["DATA_DIR"])
    local = REPO / "data"
    return (
        local
        if (local / "fashion-mnist").exists() or (local / "facade").exists()
        else REPO.parent / "shared" / "data"
    )


def _missing(msg: str):
    """Skip, or fail when REQUIRE_DATA=1 (CI that must exercise the real data)."""
    if os.environ.get("REQUIRE_DATA") == "1":
        pytest.fail(msg + " (REQUIRE_DATA=1)")
    pytest.skip(msg)


def _fashion_missing(root: Path) -> list[str]:
    """The IDX stems that ``root`` lacks (all four when it is not a folder)."""
    stems = [s for pair in datasets.FASHION_FILES.values() for s in pair]
    return [s for s in stems if not root.is_dir() or datasets.find_idx_file(root, s) is None]


@pytest.fixture(scope="session")
def fashion_root(data_dir) -> Path:
    """The real Fashion-MNIST folder; skips without it (fails with REQUIRE_DATA=1)."""
    root = data_dir / "fashion-mnist"
    missing = _fashion_missing(root)
    if missing:
        _missing(f"Fashion-MNIST not found at {root} (lacks {', '.join(missing)})")
    return root


@pytest.fixture(scope="session")
def facade_root(data_dir) -> Path:
    root = data_dir / "facade"
    for sub in ("train", "test_dev"):
        if not (root / sub / "eecs442_0000.jpg").is_file():
            _missing(f"facade data set not found at {root} (no {sub}/eecs442_0000.jpg)")
    return root


# ----------------------------------------------------------------------------- IDX writing
def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array (magic 0x0000080N, big-endian dims, raw bytes)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    data = idx_bytes(array)
    Path(path).write_bytes(gzip.compress(data) if gz else data)
    return Path(path)


def fashion_labels(n: int) -> np.ndarray:
    """The labels make_fashion_set writes: 0, 1, ..., 9, 0, 1, ... (every prefix of 10k images is
    balanced)."""
    return (np.arange(n) % len(datasets.FASHION_CLASSES)).astype(np.uint8)


def make_fashion_set(
    root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0, learnable: bool = False
) -> Path:
    """A Fashion-MNIST-shaped folder with the four IDX files (gzipped): uint8 (n, 28, 28) noise
    images, labels ``fashion_labels(n)``. ``learnable``: each image also gets a bright 4-row band
    whose position depends on its class, so a network learns something in a few steps."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        img_stem, lbl_stem = datasets.FASHION_FILES[split]
        labels = fashion_labels(n)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        if learnable:
            for c in range(len(datasets.FASHION_CLASSES)):
                rows = slice(2 + 2 * c, 6 + 2 * c)
                images[labels == c, rows, :] = np.maximum(images[labels == c, rows, :], 200)
        write_idx(root / (img_stem + ".gz"), images)
        write_idx(root / (lbl_stem + ".gz"), labels)
    return root


@pytest.fixture
def make_fashion_root():
    """Factory: make_fashion_root(root, n_train=40, n_test=20, seed=0, learnable=False) -> root."""
    return make_fashion_set


@dataclass(frozen=True)
class FashionData:
    """Where the Part 1 end-to-end tests read Fashion-MNIST: the real set, else a synthetic
    stand-in."""

    root: Path
    real: bool
    test_counts: tuple[int, ...]  # test images per class, in class order

    @property
    def n_test(self) -> int:
        return sum(self.test_counts)


REAL_FASHION_TEST_COUNTS = (1000,) * len(
    datasets.FASHION_CLASSES
)  # the real t10k set (test_idx checks it)
SYNTHETIC_FASHION = {"n_train": 2000, "n_test": 1000}


@pytest.fixture(scope="session")
def fashion_data(data_dir, tmp_path_factory) -> FashionData:
    """The real Fashion-MNIST when data_dir has it, else a synthetic folder of the same shape
    (SYNTHETIC_FASHION: 2000 train / 1000 test learnable images, labels 0-9 balanced). Never skips,
    even with REQUIRE_DATA=1: tests that need the real set take ``fashion_root`` instead."""
    root = data_dir / "fashion-mnist"
    if not _fashion_missing(root):
        return FashionData(root, True, REAL_FASHION_TEST_COUNTS)
    root = make_fashion_set(
        tmp_path_factory.mktemp("fashion_syn"), **SYNTHETIC_FASHION, learnable=True
    )
    counts = np.bincount(
        fashion_labels(SYNTHETIC_FASHION["n_test"]), minlength=len(datasets.FASHION_CLASSES)
    )
    return FashionData(root, False, tuple(int(c) for c in counts))


# ----------------------------------------------------------------------------- synthetic facades
CLASS_RGB = np.array(datasets.FACADE_PALETTE, dtype=np.float64)


def synthetic_facade_pair(rng: np.random.Generator, size: int | tuple[int, int] = 32):
    """(rgb uint8 (H,W,3), label uint8 (H,W)) with every class present as rectangles, image
    coloured by class."""
    h, w = (size, size) if isinstance(size, int) else size
    label = np.zeros((h, w), np.uint8)  # 0 others (border)
    top, left = rng.integers(1, 4, 2)
    label[top : h - 1, left : w - 1] = 1  # 1 facade
    pc = int(rng.integers(left + 1, w // 4 + 2))
    label[top : h - 1, pc : pc + max(2, w // 10)] = 2  # 2 pillar (vertical strip)
    for k in range(2):  # 3 windows
        r0 = int(rng.integers(top + 1, h // 2 - 2)) if k == 0 else int(rng.integers(h // 2, h - 6))
        c0 = int(rng.integers(w // 2, w - 8))
        label[r0 : r0 + max(3, h // 8), c0 : c0 + max(3, w // 8)] = 3
    b0 = int(rng.integers(h - 5, h - 3))
    label[b0 : b0 + 2, w // 3 : w - 3] = 4  # 4 balcony (horizontal bar)
    rgb = CLASS_RGB[label] * 0.8 + 25 + rng.normal(0, 8, (h, w, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), label


def save_label_png(path: Path, label: np.ndarray) -> None:
    from PIL import Image

    im = Image.frombytes(
        "P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label, np.uint8).tobytes()
    )
    im.putpalette([v for rgb in datasets.FACADE_PALETTE for v in rgb])
    im.save(path, format="PNG")


def make_facade_set(root: Path, n_train: int = 12, n_test: int = 4, size=32, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for folder, n in (("train", n_train), ("test_dev", n_test)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rgb, label = synthetic_facade_pair(rng, size)
            jpg, png = datasets.facade_pair(root / folder, i)
            Image.fromarray(rgb).save(jpg, format="JPEG", quality=95, subsampling=0)
            save_label_png(png, label)
    return root


@pytest.fixture
def make_facade():
    """Factory: make_facade(root, n_train=12, n_test=4, size=32, seed=0) -> root."""
    return make_facade_set


@pytest.fixture
def synthetic_facade(tmp_path) -> Path:
    """A fresh tiny facade set (train/ 12 pairs, test_dev/ 4 pairs, 32x32) that a test may
    damage."""
    return make_facade_set(tmp_path / "facade_syn")


@pytest.fixture(scope="session")
def synthetic_facade_ro(tmp_path_factory) -> Path:
    """The same tiny facade set, shared read-only by the end-to-end tests."""
    return make_facade_set(tmp_path_factory.mktemp("facade_syn_ro"))


# The synthetic facade set's ranges: 10 training, 2 validation and 4 test images.
SYN_ARGS = ["--train-range", "0", "9", "--val-range", "10", "11", "--test-range", "0", "3"]


def run_part2(*argv):
    """part2_segment.main on these arguments, in this process, without progress bars."""
    import part2_segment  # here, not at start-up: most tests never train a segmenter

    args = part2_segment.get_args_parser().parse_args([*map(str, argv), "--no-progress"])
    return part2_segment.main(args)


def checkpoint_scores(run_dir, folder, first, last, checkpoint="best.pt", views=None):
    """(N*H*W, 5) scores of a run's checkpoint on images first..last of ``folder``, computed
    here from the saved weights and normalisation in one batch (as the runs evaluate these
    images: the same kernels), and the labels. ``views(net, x)``: test-time views instead of
    the plain forward pass."""
    ckpt = torch.load(Path(run_dir) / "checkpoints" / checkpoint, map_location="cpu",
                      weights_only=False)  # fmt: skip
    import models  # here, as part2_segment above

    net = models.from_checkpoint(ckpt).eval()
    images, labels = datasets.load_facade_split(folder, first, last)
    x = datasets.normalize(images, **ckpt["normalization"])
    with torch.no_grad():
        logits = net(x) if views is None else views(net, x)
    return logits.permute(0, 2, 3, 1).reshape(-1, 5).numpy(), labels.reshape(-1).numpy()


def mean_ap_by_hand(scores: np.ndarray, labels: np.ndarray, num_classes: int = 5) -> float:
    """sklearn's average precision of each class over all pixels, averaged: (N, C) scores."""
    from sklearn.metrics import average_precision_score

    aps = [average_precision_score(labels == c, scores[:, c]) for c in range(num_classes)]
    return float(np.mean(aps))


# ----------------------------------------------------------------------------- subprocess
# A hang guard, not a speed limit: the scripts the tests start take seconds (at most about a
# minute on a 2-core CPU), so only a hung process (say, a rank waiting for one that died) meets it.
HANG_GUARD_S = 1800


def run_script(*argv: str, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """Run a repository script with this interpreter, cwd = repo, 2 threads."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def run_in_process(*argv: str) -> subprocess.CompletedProcess:
    """``run_script`` without a new interpreter: the script's command line run here as its
    ``__main__`` runs it (utils.run_cli: a user error is one line on stderr and exit 2), with
    its output and exit code captured. A start-up imports torch again: ~2 s of CPU, a tenth of
    it in the kernel mapping libraries. An exception other than a user error propagates."""
    script, args = argv[0], [str(a) for a in argv[1:]]
    module = importlib.import_module(Path(script).stem)
    out, err, code, cwd = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(REPO)  # as run_script (contextlib.chdir needs Python 3.11; we support 3.10)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if hasattr(module, "cli_main"):  # part2_segment.py: training or predict
                module.cli_main(args)
            else:
                utils.run_cli(module.main, module.get_args_parser(), args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_one_line_error(
    proc: subprocess.CompletedProcess, code: int = 2, mentions: str | None = None
) -> str:
    """Exit ``code``, stderr is exactly one line starting with 'error:', no traceback anywhere."""
    report = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, report
    assert proc.returncode == code, report
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, report
    assert lines[0].startswith("error:"), report
    if mentions is not None:
        assert mentions in lines[0], report
    return lines[0]
