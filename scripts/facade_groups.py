"""Look at the facade groups behind splits.py's grouped split: a PNG of example groups, a PNG of
the image pairs just above and below the near-duplicate threshold, the numbers of
docs/splits.md on stdout, and (with --write-json) the committed split rebuilt:

    python scripts/facade_groups.py [--data-dir data] [--out outputs/facade_groups.png]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import datasets  # noqa: E402
import splits  # noqa: E402

TILE = 128
CAPTION = 14
GAP = 16  # between cells, so neighbouring groups do not read as one


def tile_cells(cells: list[tuple[str, list[Path]]], per_row: int, path: Path) -> None:
    """A PNG of captioned cells (caption, image paths), ``per_row`` cells a row."""
    cell_width = max(len(paths) for _, paths in cells) * (TILE + 2) + GAP
    rows = (len(cells) + per_row - 1) // per_row
    canvas = Image.new("RGB", (per_row * cell_width, rows * (TILE + CAPTION)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (caption, paths) in enumerate(cells):
        left, top = (k % per_row) * cell_width, (k // per_row) * (TILE + CAPTION)
        draw.text((left + 2, top + 1), caption, fill="black")
        for c, image_path in enumerate(paths):
            with Image.open(image_path) as im:
                tile = im.convert("RGB").resize((TILE, TILE))
            canvas.paste(tile, (left + c * (TILE + 2), top + CAPTION))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def pairs_near_threshold(corr: torch.Tensor, threshold: float, count: int):
    """The ``count`` pairs just above and the ``count`` just below ``threshold``: (i, j, corr)."""
    iu = torch.triu_indices(len(corr), len(corr), 1)
    values = corr[iu[0], iu[1]]
    above = torch.nonzero(values > threshold).flatten()
    below = torch.nonzero(values <= threshold).flatten()
    above = above[values[above].argsort()[:count]]
    below = below[values[below].argsort(descending=True)[:count]]
    return [(int(iu[0, k]), int(iu[1, k]), float(values[k])) for k in torch.cat([above, below])]


def print_numbers(corr: torch.Tensor, groups: torch.Tensor, split: dict) -> None:
    """Group sizes and near-duplicate pairs across the course split and the grouped one."""
    sizes = Counter(Counter(groups.tolist()).values())
    print(f"{len(set(groups.tolist()))} groups; size: count {dict(sorted(sizes.items()))}")
    photo_pairs = splits.same_photo_pairs(range(len(corr)))
    course_train, course_val = splits.facade_split("course")
    sides = {"course": (course_train, course_val), "grouped": (split["train"], split["val"])}
    for name, (train, val) in sides.items():
        cross = corr[train][:, val]
        levels = ", ".join(
            f">{t}: {int((cross > t).sum())} pairs / {int((cross > t).any(0).sum())} val images"
            for t in (0.8, splits.NEAR_DUPLICATE_THRESHOLD, 0.9)
        )
        in_val = torch.isin(photo_pairs, torch.tensor(val))
        shared = int((in_val[:, 0] != in_val[:, 1]).sum())
        print(
            f"{name}: {len(train)} train / {len(val)} val; near-duplicates across it {levels}; "
            f"same-photograph pairs across it: {shared}; max cross corr {float(cross.max()):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="holds facade/")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/facade_groups.png"),
        help="example groups PNG; the threshold pairs go to <stem>_threshold.png",
    )
    parser.add_argument("--examples", type=int, default=16, help="groups (and pairs each side)")
    parser.add_argument("--write-json", action="store_true", help=f"rewrite {splits.GROUPED_JSON}")
    args = parser.parse_args()
    train_dir = args.data_dir / "facade" / "train"

    _, corr, groups = splits.facade_groups(args.data_dir / "facade")
    split = splits.build_grouped_split(groups)
    print_numbers(corr, groups, split)
    if args.write_json:
        splits.write_split_json(split)
        print(f"wrote {splits.GROUPED_JSON}")

    ids = torch.unique(groups)
    picked = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    group_rows = []
    for gid in picked[: args.examples].tolist():
        members = torch.nonzero(groups == gid).flatten().tolist()
        caption = "group " + " ".join(str(m) for m in members)
        group_rows.append((caption, [datasets.facade_pair(train_dir, m)[0] for m in members]))
    tile_cells(group_rows, 2, args.out)

    photo = torch.arange(len(corr)) % splits.CROPS_PERIOD
    pair_rows = []
    for i, j, value in pairs_near_threshold(corr, splits.NEAR_DUPLICATE_THRESHOLD, args.examples):
        kind = "same photo" if photo[i] == photo[j] else "other photo"
        caption = f"{i}-{j} corr {value:.3f} {kind}"
        pair_rows.append((caption, [datasets.facade_pair(train_dir, k)[0] for k in (i, j)]))
    threshold_png = args.out.with_name(args.out.stem + "_threshold.png")
    tile_cells(pair_rows, 4, threshold_png)
    print(f"wrote {args.out} and {threshold_png}")


if __name__ == "__main__":
    main()
