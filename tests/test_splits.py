"""splits.py: near-duplicate grouping on synthetic crops, and the committed grouped facade split
checked against the real images (no near-duplicate or same-photograph crop across it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
import runfiles
import splits
from conftest import assert_one_line_error, run_in_process
from utils import UserError


# ----------------------------------------------------------------------------- synthetic
def smooth_scene(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A grey image of smooth random blobs (5x5 noise upsampled), so 1-2 px shifts stay alike."""
    noise = torch.from_numpy(rng.normal(size=(1, 1, 5, 5)))
    scene = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    scene = (scene - scene.min()) / (scene.max() - scene.min()) * 200 + 25
    return scene.numpy().astype(np.uint8)


def write_crops(folder, scenes: int, offsets, seed: int = 0) -> list[int]:
    """Write 32x32 crops of each scene at each offset as eecs442_<k>.jpg in a shuffled order;
    return the scene of each index."""
    rng = np.random.default_rng(seed)
    crops = [
        (s, scene[dy : dy + 32, dx : dx + 32])
        for s, scene in enumerate(smooth_scene(rng) for _ in range(scenes))
        for dy, dx in offsets
    ]
    folder.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(crops))
    for index, k in enumerate(order):
        jpg = datasets.facade_pair(folder, index)[0]
        Image.fromarray(crops[k][1]).convert("RGB").save(jpg, format="JPEG", quality=95)
    return [crops[k][0] for k in order]


def test_near_duplicate_crops_form_one_group_per_scene(tmp_path):
    scene_of = write_crops(tmp_path, scenes=5, offsets=[(0, 0), (1, 1), (2, 0)])
    thumbs = splits.grey_thumbnails(tmp_path, range(len(scene_of)), size=16)
    corr = splits.correlation_matrix(thumbs)
    pairs = splits.near_duplicate_pairs(corr, splits.NEAR_DUPLICATE_THRESHOLD)
    groups = splits.connected_components(len(scene_of), pairs).tolist()
    scene_of_group = {}
    for group, scene in zip(groups, scene_of):
        assert scene_of_group.setdefault(group, scene) == scene, "two scenes share a group"
    assert len(scene_of_group) == 5, f"crops of one scene split apart: {groups} vs {scene_of}"


def test_connected_components_follow_chains():
    pairs = torch.tensor([[1, 2], [0, 1], [5, 6]])
    assert splits.connected_components(8, pairs).tolist() == [0, 0, 0, 3, 4, 5, 5, 7]
    assert splits.connected_components(3, torch.empty(0, 2, dtype=torch.long)).tolist() == [0, 1, 2]


def test_same_photo_pairs_join_indices_a_period_apart():
    pairs = splits.same_photo_pairs([0, 1, 302, 604, 303], period=302)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 2), (0, 3), (1, 4), (2, 3)]


def test_grouped_split_keeps_each_group_on_one_side():
    sizes = torch.randint(1, 5, (60,), generator=torch.Generator().manual_seed(1))
    groups = torch.repeat_interleave(torch.arange(60), sizes)
    train, val = splits.grouped_split(groups, val_target=30, seed=0)
    assert sorted(train + val) == list(range(len(groups)))
    val_groups, train_groups = set(groups[val].tolist()), set(groups[train].tolist())
    assert not val_groups & train_groups
    assert 26 <= len(val) <= 30  # whole groups of at most 4 fill it to within one group
    assert splits.grouped_split(groups, 30, seed=0) == (train, val)
    assert splits.grouped_split(groups, 30, seed=1) != (train, val)


def test_facade_split_names(tmp_path):
    train, val = splits.facade_split("course")
    assert (train[0], train[-1], len(train), val[0], val[-1], len(val)) == (
        0,
        799,
        800,
        800,
        899,
        100,
    )
    with pytest.raises(UserError, match="unknown facade split"):
        splits.facade_split("random")
    with pytest.raises(UserError, match="cannot read"):
        splits.facade_split("grouped", tmp_path / "absent.json")


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def real_groups(facade_root):
    """(thumbnails, correlation matrix, groups) of the real train/ 0-899."""
    return splits.facade_groups(facade_root)


def test_grouped_split_has_no_near_duplicate_across_it(real_groups):
    _, corr, _ = real_groups
    train, val = splits.facade_split("grouped")
    assert not set(train) & set(val)
    assert set(train) | set(val) <= set(range(splits.SPLIT_END))
    assert len(train) >= 780 and 90 <= len(val) <= 100
    worst = corr[val][:, train].max(dim=1).values
    leaking = [val[k] for k in torch.nonzero(worst > splits.NEAR_DUPLICATE_THRESHOLD).flatten()]
    assert not leaking, f"validation images {leaking} have a near-duplicate in training"
    train_photos = {i % splits.CROPS_PERIOD for i in train}
    assert not {i % splits.CROPS_PERIOD for i in val} & train_photos


def test_committed_grouped_split_is_the_rebuilt_one(real_groups):
    _, _, groups = real_groups
    assert splits.build_grouped_split(groups) == json.loads(splits.GROUPED_JSON.read_text())


def test_course_split_leaks_near_duplicates(real_groups):
    """The reason for the grouped split: validation 800-899 repeats training photographs."""
    _, corr, _ = real_groups
    train, val = splits.facade_split("course")
    leaking = (corr[val][:, train] > splits.NEAR_DUPLICATE_THRESHOLD).any(dim=1)
    assert int(leaking.sum()) >= 5


def test_images_show_the_crops_period(real_groups):
    """Nearest neighbours sit a CROPS_PERIOD (or two) apart far more often than chance."""
    _, corr, _ = real_groups
    offsets = splits.neighbour_offsets(corr).abs()
    values, counts = torch.unique(offsets, return_counts=True)
    top_two = values[counts.argsort(descending=True)[:2]].tolist()
    assert top_two == [splits.CROPS_PERIOD, 2 * splits.CROPS_PERIOD]
    assert int((offsets % splits.CROPS_PERIOD == 0).sum()) > 0.4 * len(offsets)


# ----------------------------------------------------------------------------- the flag
def test_part2_trains_and_validates_on_the_grouped_split(facade_root, tmp_path):
    run = tmp_path / "grouped"
    proc = run_in_process("part2_segment.py", "--data", str(facade_root), "--split", "grouped",
                          "--model", "unet", "--width", "4", "--epochs", "1", "--max-steps", "1",
                          "--test-range", "0", "1", "--val-ap-every", "0", "--no-progress",
                          "--output-dir", str(run))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, val = splits.facade_split("grouped")
    assert runfiles.read_json(run / "args.json")["split"] == "grouped"
    assert f"{len(train)} train / {len(val)} val / 2 test images" in (run / "log.txt").read_text()


def test_the_grouped_split_refuses_ranges_in_one_line(tmp_path):
    flags = ["--split", "grouped", "--val-range", "800", "899", "--output-dir", tmp_path / "x"]
    proc = run_in_process("part2_segment.py", "--data", tmp_path, *flags)
    assert_one_line_error(proc, mentions="--split grouped")
    assert not (tmp_path / "x").exists()
