"""Data for both parts, decoded once into uint8 tensors and served in batches straight from memory.

Fashion-MNIST: the four IDX files (gzipped or raw). Facades: eecs442_%04d.jpg / .png pairs.
``TensorLoader`` replaces a per-sample DataLoader: it indexes whole batches out of one tensor,
normalises on the device and applies batched augmentation, so the small models are not starved.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import struct
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils import UserError

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

FACADE_CLASSES = ["others", "facade", "pillar", "window", "balcony"]
# The palette of the dataset's label PNGs (and colormap.png), class index -> RGB.
FACADE_PALETTE = [(0, 0, 0), (0, 128, 255), (128, 255, 128), (255, 128, 0), (255, 0, 0)]


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST
def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (gzip detected by its magic bytes) into a uint8 tensor."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise UserError(
            f"{path}: cannot read ({type(err).__name__}: {err}); the file is damaged or truncated"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise UserError(
            f"{path}: bad IDX magic number {data[:4].hex() or '(empty)'}; "
            "expected 0000080N (unsigned bytes)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise UserError(
            f"{path}: holds {len(data) - header} data bytes but its header {tuple(shape)} "
            f"says {expected}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def find_idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def download_fashion_mnist(root: Path) -> bool:
    """Try torchvision's download into ``root``; False when the network does not allow it."""
    from torchvision.datasets import FashionMNIST

    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            FashionMNIST(tmp, train=True, download=True)
            FashionMNIST(tmp, train=False, download=True)
            root.mkdir(parents=True, exist_ok=True)
            for f in (Path(tmp) / "FashionMNIST" / "raw").glob("*.gz"):
                shutil.move(str(f), root / f.name)
        return True
    except Exception:  # no network, proxy, DNS...: the caller explains the offline options
        return False
    finally:
        socket.setdefaulttimeout(old_timeout)


def locate_fashion_mnist(root: Path, download: bool = True, log=print) -> Path:
    """The folder holding all four IDX files: ``root``, else a download into it, else Debian's
    copy."""
    stems = [s for pair in FASHION_FILES.values() for s in pair]
    if all(find_idx_file(root, s) for s in stems):
        return root
    if download and download_fashion_mnist(root) and all(find_idx_file(root, s) for s in stems):
        log(f"downloaded Fashion-MNIST into {root}")
        return root
    if all(find_idx_file(DEBIAN_FASHION_DIR, s) for s in stems):
        log(f"using Debian's Fashion-MNIST in {DEBIAN_FASHION_DIR}")
        return DEBIAN_FASHION_DIR
    missing = [s + "[.gz]" for s in stems if not find_idx_file(root, s)]
    how = "downloading failed" if download else "--no-download was given"
    raise UserError(
        f"Fashion-MNIST not found: {root}/ lacks {', '.join(missing)} and {how}; "
        "copy the four IDX files there or `apt-get install dataset-fashion-mnist` "
        f"({DEBIAN_FASHION_DIR})"
    )


def load_fashion_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N,1,28,28), labels int64 (N,)) of 'train' or 'test', validated."""
    img_stem, lbl_stem = FASHION_FILES[split]
    img_path, lbl_path = find_idx_file(root, img_stem), find_idx_file(root, lbl_stem)
    for path, stem in ((img_path, img_stem), (lbl_path, lbl_stem)):
        if path is None:
            raise UserError(f"{root / stem}[.gz] not found")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dim() != 3 or labels.dim() != 1:
        raise UserError(
            f"{img_path} / {lbl_path}: expected 3-D images and 1-D labels, "
            f"got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if len(images) != len(labels):
        raise UserError(
            f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= len(FASHION_CLASSES):
        raise UserError(
            f"{lbl_path}: label {int(labels.max())} out of range 0-{len(FASHION_CLASSES) - 1}"
        )
    return images.unsqueeze(1), labels.long()


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of range(n) into (train indices, validation indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def channel_stats(images_u8: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (sample) std of uint8 images scaled to 0-1 (the checkpoint's
    ``normalization``): each channel's histogram of the 256 values is counted on the device,
    the moments are taken from it on the host in Python's doubles (MPS has no fp64)."""
    means, stds = [], []
    for channel in images_u8.transpose(0, 1):
        counts = torch.bincount(channel.flatten(), minlength=256).tolist()
        n = sum(counts)
        mean = sum(v * c for v, c in enumerate(counts)) / n
        var = sum(c * (v - mean) ** 2 for v, c in enumerate(counts)) / (n - 1)
        means.append(mean / 255)
        stds.append(var**0.5 / 255)
    return means, stds


# ----------------------------------------------------------------------------- facades
def facade_pair(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"eecs442_{index:04d}.jpg", folder / f"eecs442_{index:04d}.png"


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8; grayscale / RGBA / palette are converted to RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(
            f"{path}: unreadable or truncated image ({str(err).splitlines()[0][:120]})"
        ) from None


def read_label(path: Path, num_classes: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise UserError(
                    f"{path}: label must be a palette or grayscale PNG of class indices, "
                    f"not mode {im.mode}"
                )
            label = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(
            f"{path}: unreadable or truncated label ({str(err).splitlines()[0][:120]})"
        ) from None
    if label.size and int(label.max()) >= num_classes:
        raise UserError(
            f"{path}: label value {int(label.max())} >= number of classes {num_classes}"
        )
    return label


def check_range(name: str, start: int, end: int) -> None:
    if start < 0 or end < 0:
        raise UserError(f"--{name}-range {start} {end}: indices must be >= 0")
    if end < start:
        raise UserError(
            f"--{name}-range {start} {end}: empty or reversed range (start must be <= end)"
        )


def load_facade_split(
    folder: Path, start: int, end: int, num_classes: int = 5, workers: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N,3,H,W) and labels uint8 (N,H,W) for eecs442_{start..end} (inclusive)."""
    return load_facade_images(folder, range(start, end + 1), num_classes, workers)


def load_facade_images(
    folder: Path, indices, num_classes: int = 5, workers: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N,3,H,W) and labels uint8 (N,H,W) for eecs442_{i} of each index, in order.
    All files are checked to exist before any is decoded; decoding runs in threads (PIL releases
    the GIL)."""
    folder, indices = Path(folder), list(indices)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    where = f"{indices[0]}-{indices[-1]}" if indices else "none"
    pairs = [facade_pair(folder, i) for i in indices]
    for jpg, png in pairs:
        for p in (jpg, png):
            if not p.is_file():
                raise UserError(f"missing file {p} (images {where} of {folder})")

    def decode(pair):
        jpg, png = pair
        image, label = read_rgb(jpg), read_label(png, num_classes)
        if image.shape[:2] != label.shape:
            raise UserError(
                f"{jpg} is {image.shape[1]}x{image.shape[0]} "
                f"but {png} is {label.shape[1]}x{label.shape[0]}"
            )
        return image, label

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(decode, pairs))
    sizes = {img.shape[:2] for img, _ in decoded}
    if len(sizes) > 1:
        raise UserError(
            f"images in {folder} ({where}) differ in size {sorted(sizes)}; "
            "one size per split is needed"
        )
    images = (
        torch.from_numpy(np.stack([img for img, _ in decoded])).permute(0, 3, 1, 2).contiguous()
    )
    labels = torch.from_numpy(np.stack([lbl for _, lbl in decoded]))
    return images, labels


def colorize(mask: torch.Tensor, palette=FACADE_PALETTE) -> np.ndarray:
    """Class-index mask (H,W) -> RGB uint8 (H,W,3) by indexing a palette tensor (no pixel loop)."""
    table = torch.tensor(palette, dtype=torch.uint8)
    return table[mask.long().clamp(0, len(palette) - 1)].numpy()


# ----------------------------------------------------------------------------- loader
class TensorLoader:
    """Batches from in-memory uint8 tensors: scaled to 0-1, augmented (optional), then
    ``(x - mean) / std``.

    Training (``train=True``): a new seeded permutation each epoch (``set_epoch``); each global
    batch of ``batch_size x world_size`` is cut into per-rank slices, so DDP sees exactly the
    batches of a single process with the same global batch (the last partial global batch is
    dropped when world_size > 1). Evaluation: rank r takes samples r, r+W, r+2W, ... with no
    padding, so sums over ranks are exact.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean,
        std,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: Callable | None = None,
    ):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.mean, self.std = mean, std
        self.train, self.seed, self.rank, self.world_size, self.augment = (
            train,
            seed,
            rank,
            world_size,
            augment,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        n = len(self.images)
        if not self.train:
            shard = torch.arange(n)[self.rank :: self.world_size]  # empty when rank >= n
            return list(shard.split(self.batch_size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches = list(torch.randperm(n, generator=g).split(self.batch_size * self.world_size))
        if self.world_size > 1 and len(batches[-1]) < self.batch_size * self.world_size:
            batches = batches[:-1]
        return batches

    def __len__(self) -> int:
        return len(self._global_batches())

    def __iter__(self):
        for step, idx in enumerate(self._global_batches()):
            rows = (
                slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
                if self.train
                else slice(None)
            )
            total = len(idx)
            idx = idx[rows].to(self.images.device)
            x, y = self.images[idx].float() / 255, self.labels[idx]
            if self.augment is not None:
                g = torch.Generator().manual_seed(
                    self.seed * 1_000_003 + self.epoch * 10_007 + step
                )
                x, y = self.augment(x, y, g, rows, total)
            x = normalize(x, self.mean, self.std)
            yield x, y.long()


def split_loaders(
    splits: dict,
    normalization: dict,
    *,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    augment: Callable | None = None,
):
    """(train, val, test) loaders over ``splits`` = {name: (images, labels)}: training shuffled
    and augmented, evaluation in large sharded batches."""
    common = dict(
        mean=normalization["mean"],
        std=normalization["std"],
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    return (
        TensorLoader(*splits["train"], batch_size, train=True, augment=augment, **common),
        TensorLoader(*splits["val"], eval_batch_size, train=False, **common),
        TensorLoader(*splits["test"], eval_batch_size, train=False, **common),
    )


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel; uint8 input is first scaled to 0-1."""
    if x.dtype == torch.uint8:
        x = x.float() / 255
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - torch.tensor(mean, device=x.device).reshape(shape)) / torch.tensor(
        std, device=x.device
    ).reshape(shape)
