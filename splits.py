"""Train/validation splits of the facade train/ folder: the course's index ranges, and a grouped
split that keeps every crop of one photograph, and every near-duplicate, on one side.

train/ holds three 256x256 crops of each photograph, at indices i, i+302 and i+604 (the
nearest neighbour of an image is one of its two partners 44% of the time; see docs/splits.md),
so the course's validation images 800-899 (i+604 for i = 196..295) each share a photograph
with two training images. The test images are other photographs. Only train/ images are read
here: never labels, never test_dev/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets import check_range, facade_pair
from utils import UserError

SPLIT_END = 900  # both splits share out train/eecs442_0000..0899, as the course does
COURSE_VAL_START = 800
CROPS_PERIOD = 302  # train/ index i, i+302, i+604: three crops of one photograph
THUMB_SIZE = 32
# Every pair above it is two crops of one photograph; the most correlated pairs of different
# buildings sit at 0.818 and 0.816, so any threshold in 0.82-0.85 gives the same groups.
NEAR_DUPLICATE_THRESHOLD = 0.85
VAL_TARGET = 100
GROUPED_SEED = 0
MEASURE = f"Pearson correlation of {THUMB_SIZE}x{THUMB_SIZE} grey (PIL 'L', box-resized) thumbnails"
GROUPED_JSON = Path(__file__).resolve().parent / "splits" / "facade_grouped.json"
SPLIT_NAMES = ("course", "grouped")


# ----------------------------------------------------------------------------- the measure
def normalise_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows flattened, centred and scaled to unit norm, so a dot product is their correlation."""
    x = x.flatten(1).double()
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def grey_thumbnails(folder: Path, indices, size: int = THUMB_SIZE) -> torch.Tensor:
    """(N, size*size) correlation-ready vectors of eecs442_<index>.jpg in ``folder``."""
    thumbs = []
    for index in indices:
        path = facade_pair(Path(folder), int(index))[0]
        if not path.is_file():
            raise UserError(f"missing file {path}")
        with Image.open(path) as im:
            small = im.convert("L").resize((size, size), Image.Resampling.BOX)
        thumbs.append(np.asarray(small, dtype=np.float64))
    return normalise_rows(torch.from_numpy(np.stack(thumbs)))


def correlation_matrix(rows: torch.Tensor, others: torch.Tensor | None = None) -> torch.Tensor:
    """Correlation of every row of ``rows`` with every row of ``others`` (default: itself)."""
    return rows @ (rows if others is None else others).T


def near_duplicate_pairs(corr: torch.Tensor, threshold: float) -> torch.Tensor:
    """(P, 2) index pairs i < j of a square correlation matrix with corr > threshold."""
    return torch.nonzero(torch.triu(corr > threshold, diagonal=1))


def same_photo_pairs(indices, period: int = CROPS_PERIOD) -> torch.Tensor:
    """(P, 2) positions i < j in ``indices`` whose train/ indices are crops of one photograph."""
    photo = torch.as_tensor(list(indices)) % period
    return torch.nonzero(torch.triu(photo[:, None] == photo[None, :], diagonal=1))


def neighbour_offsets(corr: torch.Tensor) -> torch.Tensor:
    """Index offset from each image to its most correlated other image (square matrix over
    consecutive indices): peaks at +-period when the set holds periodic crops."""
    corr = corr.clone()
    corr.fill_diagonal_(-2.0)
    return corr.argmax(dim=1) - torch.arange(len(corr))


# ----------------------------------------------------------------------------- grouping
def connected_components(n: int, pairs: torch.Tensor) -> torch.Tensor:
    """Component label (its smallest member) of each of n nodes joined by the (P, 2) pairs."""
    linked = torch.eye(n, dtype=torch.bool)
    if len(pairs):
        linked[pairs[:, 0], pairs[:, 1]] = True
        linked[pairs[:, 1], pairs[:, 0]] = True
    label = torch.arange(n)
    while True:  # each pass spreads the smallest label one hop; stops when nothing changes
        spread = torch.where(linked, label[None, :], n).amin(dim=1)
        if torch.equal(spread, label):
            return label
        label = spread


def grouped_split(groups: torch.Tensor, val_target: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) positions: whole groups, in a seeded random order, go to validation while
    they fit in ``val_target`` images; the rest train."""
    ids = torch.unique(groups)
    order = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    val_groups, val_count = [], 0
    for gid in order.tolist():
        size = int((groups == gid).sum())
        if val_count + size <= val_target:
            val_groups.append(gid)
            val_count += size
    in_val = torch.isin(groups, torch.tensor(val_groups, dtype=groups.dtype))
    return torch.nonzero(~in_val).flatten().tolist(), torch.nonzero(in_val).flatten().tolist()


# ----------------------------------------------------------------------------- the facade splits
def facade_groups(root: Path, threshold: float = NEAR_DUPLICATE_THRESHOLD):
    """(thumbnails, correlation matrix, group label) of train/ images 0..SPLIT_END-1: groups are
    connected components of near-duplicate pairs and same-photograph crops."""
    indices = range(SPLIT_END)
    thumbs = grey_thumbnails(Path(root) / "train", indices)
    corr = correlation_matrix(thumbs)
    pairs = torch.cat([near_duplicate_pairs(corr, threshold), same_photo_pairs(indices)])
    return thumbs, corr, connected_components(SPLIT_END, pairs)


def build_grouped_split(groups: torch.Tensor) -> dict:
    """The grouped split of facade_groups' labels and how it was made, as GROUPED_JSON holds."""
    train, val = grouped_split(groups, VAL_TARGET, GROUPED_SEED)
    return {
        "measure": MEASURE,
        "threshold": NEAR_DUPLICATE_THRESHOLD,
        "crops_period": CROPS_PERIOD,
        "groups": len(torch.unique(groups)),
        "seed": GROUPED_SEED,
        "train": train,
        "val": val,
    }


def write_split_json(split: dict, path: Path = GROUPED_JSON, per_line: int = 16) -> None:
    """One key a line and index lists ``per_line`` numbers a line, so a diff shows what changed."""
    lines = []
    for key, value in split.items():
        if isinstance(value, list):
            chunks = [value[k : k + per_line] for k in range(0, len(value), per_line)]
            rows = ",\n    ".join(", ".join(str(v) for v in chunk) for chunk in chunks)
            lines.append(f"  {json.dumps(key)}: [\n    {rows}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def facade_split(name: str, json_path: Path = GROUPED_JSON) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) into facade train/: "course" is 0-799 / 800-899;
    "grouped" is the committed split of GROUPED_JSON (rebuild it with scripts/facade_groups.py)."""
    if name == "course":
        return list(range(COURSE_VAL_START)), list(range(COURSE_VAL_START, SPLIT_END))
    if name == "grouped":
        try:
            split = json.loads(Path(json_path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{json_path}: cannot read the grouped split ({err})") from None
        return split["train"], split["val"]
    raise UserError(f"unknown facade split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")


def facade_indices(ranges: dict, split: str = "ranges") -> dict[str, list[int]]:
    """The image indices of each named split from its (first, last) range; with split "grouped"
    the committed split of train/ without near-duplicates across it takes the training and
    validation ranges' place."""
    for name, (first, last) in ranges.items():
        check_range(name, first, last)
    indices = {name: list(range(first, last + 1)) for name, (first, last) in ranges.items()}
    if split == "grouped" and "train" in ranges:
        indices["train"], indices["val"] = facade_split("grouped")
    return indices
