"""datasets.TensorLoader (epoch order, DDP sharding), augmentation, colorize, facade loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import augment
import datasets
import utils
from conftest import make_facade_set


def _data(n=23, c=1, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    labels = torch.arange(n)  # label = sample index, so batches reveal which samples they hold
    return images, labels


def _loader(images, labels, bs, **kw):
    kw.setdefault("mean", [0.5] * images.shape[1])
    kw.setdefault("std", [0.25] * images.shape[1])
    return datasets.TensorLoader(images, labels, bs, **kw)


def _epoch_ids(loader, epoch):
    loader.set_epoch(epoch)
    return [y.tolist() for _, y in loader]


def test_train_epoch_covers_every_sample_once():
    images, labels = _data()
    loader = _loader(images, labels, 5, train=True, seed=3)
    batches = _epoch_ids(loader, 1)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert len(loader) == 5
    assert sorted(i for b in batches for i in b) == list(range(23))


def test_train_order_changes_with_epoch_and_repeats_with_seed():
    images, labels = _data()
    a = _loader(images, labels, 5, train=True, seed=3)
    b = _loader(images, labels, 5, train=True, seed=3)
    c = _loader(images, labels, 5, train=True, seed=4)
    e1, e2 = _epoch_ids(a, 1), _epoch_ids(a, 2)
    assert e1 != e2
    assert sorted(sum(e2, [])) == list(range(23))
    assert _epoch_ids(b, 1) == e1 and _epoch_ids(b, 2) == e2
    assert _epoch_ids(a, 1) == e1  # going back to an epoch gives its order again
    assert _epoch_ids(c, 1) != e1


def test_loader_normalizes():
    images, labels = _data(n=4, c=3)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    loader = _loader(images, labels, 4, train=False, mean=mean, std=std)
    ((x, y),) = list(loader)
    ref = (images.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    assert torch.allclose(x, ref, atol=1e-6)
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "augment", [None, augment.random_translate_flip], ids=["plain", "translate_flip"]
)
def test_ddp_rank_slices_equal_single_process_global_batch(augment):
    images, labels = _data(n=26)
    per_rank, world = 4, 2
    single = _loader(images, labels, per_rank * world, train=True, seed=5, augment=augment)
    ranks = [
        _loader(
            images, labels, per_rank, train=True, seed=5, rank=r, world_size=world, augment=augment
        )
        for r in range(world)
    ]
    for epoch in (1, 2):
        for ld in [single, *ranks]:
            ld.set_epoch(epoch)
        full = list(single)
        per = [list(ld) for ld in ranks]
        # 26 = 3 full global batches of 8 + a partial one of 2 that DDP drops
        assert len(full) == 4 and all(len(p) == 3 for p in per)
        assert len(ranks[0]) == 3
        for step in range(3):
            x_cat = torch.cat([per[r][step][0] for r in range(world)])
            y_cat = torch.cat([per[r][step][1] for r in range(world)])
            assert torch.equal(y_cat, full[step][1])
            assert torch.equal(x_cat, full[step][0])  # same augmentation draws too
        seen = torch.cat([p[s][1] for p in per for s in range(3)])
        assert len(set(seen.tolist())) == 24


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_sharding_covers_every_sample_once(world):
    images, labels = _data(n=10)
    seen = []
    for r in range(world):
        ld = _loader(images, labels, 3, train=False, rank=r, world_size=world)
        ids = [i for _, y in ld for i in y.tolist()]
        assert ids == list(range(r, 10, world))  # rank r: r, r+W, ... in order, no padding
        seen += ids
    assert sorted(seen) == list(range(10))


def test_gather_in_dataset_order_single_process():
    rt = utils.Runtime(device=torch.device("cpu"))
    t = torch.arange(7)
    assert torch.equal(utils.gather_in_dataset_order(t, rt), t)


SHARDINGS = [
    (10, 2),
    (10, 3),
    (11, 4),
    (7, 7),
    (23, 1),
    (1, 2),
    (3, 4),  # n < W, the last rank's shard is empty
    (3, 5),
    (0, 3),
]  # ranks past the end: empty shards


@pytest.mark.parametrize("n,world", SHARDINGS)
@pytest.mark.parametrize("batch", [1, 4])
def test_dataset_order_undoes_eval_sharding(n, world, batch):
    """What gather_in_dataset_order does on W ranks, without processes: each rank's evaluation
    shard as TensorLoader(train=False) yields it, concatenated in rank order (what all_gather_cat
    returns), then scattered to dataset_order(n, W) gives back the dataset order (n < W: some
    shards are empty)."""
    images, labels = _data(n=n, h=2, w=3)
    shards = []
    for r in range(world):
        ld = datasets.TensorLoader(
            images, labels, batch, mean=[0], std=[1], train=False, rank=r, world_size=world
        )
        ys = [y for _, y in ld]
        shards.append(torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long))
    assert sum(len(s) == 0 for s in shards) == max(0, world - n)
    gathered = torch.cat(shards)
    order = utils.dataset_order(n, world)
    assert sorted(order.tolist()) == list(range(n))  # a permutation: each slot written once
    restored = torch.empty_like(gathered)
    restored[order] = gathered
    assert torch.equal(restored, labels)  # label = sample index
    # the images travel with their labels the same way
    x_shards = [
        torch.cat(
            [
                x
                for x, _ in datasets.TensorLoader(
                    images, labels, batch, mean=[0], std=[1], train=False, rank=r, world_size=world
                )
            ]
            or [torch.zeros(0, 1, 2, 3)]
        )
        for r in range(world)
    ]
    x_restored = torch.empty(n, 1, 2, 3)
    x_restored[order] = torch.cat(x_shards)
    assert torch.equal(x_restored, images.float() / 255)


def test_random_translate_flip_pad0_is_identity_or_flip():
    images, labels = _data(n=16, c=2, h=5, w=7)
    x = images.float() / 255
    g = torch.Generator().manual_seed(0)
    out, y = augment.random_translate_flip(x, labels, g, slice(None), len(x), pad=0)
    assert out.shape == x.shape and torch.equal(y, labels)
    flipped = 0
    for i in range(len(x)):
        same, flip = torch.equal(out[i], x[i]), torch.equal(out[i], x[i].flip(-1))
        assert same or flip
        flipped += flip and not same
    assert 0 < flipped < len(x)  # both outcomes occur among 16 draws


def test_random_translate_flip_shifts_with_zero_fill():
    x = torch.rand(32, 1, 8, 8) + 0.5  # no zeros in the input
    out, _ = augment.random_translate_flip(
        x, torch.zeros(32), torch.Generator().manual_seed(1), slice(None), 32, pad=2
    )
    assert out.shape == x.shape
    for i in range(32):
        # every output is a <=2 px shift (and maybe flip) of the input; zero where it left the frame
        found = False
        for img in (x[i, 0], x[i, 0].flip(-1)):
            padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
            for dy in range(5):
                for dx in range(5):
                    if torch.equal(padded[dy : dy + 8, dx : dx + 8], out[i, 0]):
                        found = True
        assert found


def test_random_scale_crop_flip_jitter_shapes_and_labels():
    x = torch.rand(3, 3, 20, 20)
    y = torch.randint(0, 5, (3, 20, 20))
    xo, yo = augment.random_scale_crop_flip_jitter(
        x, y, torch.Generator().manual_seed(0), slice(None), 3, crop=16
    )
    assert xo.shape == (3, 3, 16, 16) and yo.shape == (3, 16, 16)
    assert yo.dtype == torch.int64 and set(yo.unique().tolist()) <= set(range(5))
    assert float(xo.min()) >= 0 and float(xo.max()) <= 1


def test_colorize_palette():
    mask = torch.tensor([[0, 1, 2], [3, 4, 0]])
    rgb = datasets.colorize(mask)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    pal = datasets.FACADE_PALETTE
    for (i, j), k in np.ndenumerate(mask.numpy()):
        assert tuple(rgb[i, j]) == pal[k]
    assert tuple(datasets.colorize(torch.tensor([[1]]))[0, 0]) == (0, 128, 255)


def test_facade_palette_matches_real_labels(facade_root):
    from PIL import Image

    with Image.open(facade_root / "train" / "eecs442_0000.png") as im:
        assert im.mode == "P"
        pal = im.getpalette()[:15]
    assert [tuple(pal[i : i + 3]) for i in range(0, 15, 3)] == datasets.FACADE_PALETTE


def test_load_facade_split_synthetic(tmp_path):
    root = make_facade_set(tmp_path, n_train=3, n_test=1)
    images, labels = datasets.load_facade_split(root / "train", 0, 2, 5, workers=2)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (3, 32, 32) and labels.dtype == torch.uint8
    assert set(labels.unique().tolist()) == {0, 1, 2, 3, 4}
    # the image is coloured by class (learnable): each class's mean colour is nearest its own
    # palette colour
    pixels = images.permute(0, 2, 3, 1).float()
    palette = torch.tensor(datasets.FACADE_PALETTE).float() * 0.8 + 25
    for k in range(5):
        mean_rgb = pixels[labels == k].mean(0)
        assert int(((palette - mean_rgb) ** 2).sum(1).argmin()) == k


def test_load_facade_split_real_slice(facade_root):
    images, labels = datasets.load_facade_split(facade_root / "test_dev", 0, 1, 5)
    assert images.shape == (2, 3, 256, 256) and labels.shape == (2, 256, 256)
    assert int(labels.max()) <= 4


def test_check_range():
    datasets.check_range("train", 3, 3)
    with pytest.raises(utils.UserError, match="reversed"):
        datasets.check_range("train", 5, 2)
    with pytest.raises(utils.UserError, match=">= 0"):
        datasets.check_range("val", -1, 2)


def test_split_train_val_and_channel_stats():
    tr, va = datasets.split_train_val(100, 0.2, seed=0)
    assert len(tr) == 80 and len(va) == 20
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    tr2, va2 = datasets.split_train_val(100, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    imgs = torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8)  # (2,1,1,2)
    mean, std = datasets.channel_stats(imgs)
    assert mean == pytest.approx([0.75]) and std == pytest.approx([np.std([0, 1, 1, 1], ddof=1)])
