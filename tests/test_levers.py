"""The Part 2 recipe levers: the weight average (--ema), crops holding rare classes
(--rare-crops), the one-versus-rest loss (--loss bce), the z-loss (--z-loss) and strip pooling
(--strip-pool): their arithmetic, and that a run with them stops, resumes and tests the network
it selected."""

from __future__ import annotations

import pytest
import torch

import augment
import losses
import models
import part2_segment
import runfiles
from conftest import checkpoint_scores, run_part2
from ema import WeightAverage
from errors import UserError

SYN_P2 = ["--train-range", "0", "7", "--val-range", "8", "10", "--test-range", "0", "3"]
UNET = ["--model", "unet", "--width", "4", "--crop", "16", "--crop-scale", "0.5", "0.8"]


def test_the_average_follows_its_formula_for_weights_and_batch_norm_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    avg = WeightAverage(net, decay=0.9)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for n in range(1, 31):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 2, 6, 6))  # moves the running statistics, counts a batch
        avg.update()
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in net.state_dict().items():
            expected[k] = v.clone() if not v.is_floating_point() else d * expected[k] + (1 - d) * v
    for k, v in avg.model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    assert avg.model.state_dict()["1.num_batches_tracked"].item() == 30
    assert not torch.equal(avg.model[0].weight, net[0].weight)
    assert not any(p.requires_grad for p in avg.model.parameters())


def rare_pixel_batch(n: int = 6, size: int = 64):
    """Images whose only rare pixels (class 2, a 3x3 block: sampled whatever the box's sub-pixel
    offset) sit at a known place, mostly near a border."""
    y = torch.ones(n, size, size, dtype=torch.long)
    spots = [(3, 5), (60, 58), (10, 50), (50, 12), (32, 32), (1, 60)]
    for i, (r, c) in enumerate(spots[:n]):
        y[i, r : r + 3, c : c + 3] = 2
    x = torch.rand(n, 3, size, size)
    return x, y


def test_rare_crops_hold_the_rare_pixel_and_leave_other_runs_unchanged():
    x, y = rare_pixel_batch()
    kwargs = dict(crop=16, scale_range=(0.25, 0.3), jitter=0.0)
    g = torch.Generator().manual_seed(1)
    _, plain = augment.random_scale_crop_flip_jitter(x, y, g, slice(None), 6, **kwargs)
    # Boxes of a quarter of the side, placed at random: most miss a single pixel.
    assert (plain == 2).any(dim=(1, 2)).sum() <= 2
    g = torch.Generator().manual_seed(1)
    _, rare = augment.random_scale_crop_flip_jitter(
        x, y, g, slice(None), 6, rare_share=1.0, rare_classes=(2, 4), **kwargs
    )
    assert (rare == 2).any(dim=(1, 2)).all()  # every box holds it, even at the image's corners
    # Share 0 draws nothing more: a run without the lever keeps its random stream.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = augment.random_scale_crop_flip_jitter(x, y, g1, slice(None), 6, **kwargs)
    b = augment.random_scale_crop_flip_jitter(x, y, g2, slice(None), 6, rare_share=0.0, **kwargs)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_rare_centres_sit_on_the_pixel_where_the_box_fits_and_skip_images_without_one():
    y = torch.zeros(3, 8, 8, dtype=torch.long)
    y[0, 4, 2] = 4  # box of half the side fits around it: centred exactly
    y[1, 0, 7] = 2  # in the corner: clamped so the box stays inside
    draws = torch.tensor([[0.0, 0.5], [0.0, 0.5], [0.0, 0.5]])  # image 2 has no rare pixel
    half = torch.full((3,), 0.5)
    keep = torch.tensor([0.1, 0.2, 0.3])
    tx, ty = augment.rare_centres(y, draws, 1.0, (2, 4), (half, half), (keep, keep))
    assert tx.tolist() == pytest.approx([(2 * 2 + 1) / 8 - 1, 0.5, 0.3])
    assert ty.tolist() == pytest.approx([(2 * 4 + 1) / 8 - 1, -0.5, 0.3])


def test_an_averaged_run_stops_resumes_and_tests_the_average(synthetic_facade_ro, tmp_path):
    common = ["--data", synthetic_facade_ro, *SYN_P2, *UNET, "--epochs", 3, "--ema", 0.9,
              "--rare-crops", 0.5, "--batch-size", 4]  # fmt: skip
    straight, boxed = tmp_path / "straight", tmp_path / "boxed"
    run_part2(*common, "--output-dir", straight)
    run_part2(*common, "--stop-after-epochs", 2, "--output-dir", boxed)
    run_part2("--resume", boxed / "checkpoints/last.pt")
    a, b = (runfiles.read_json(f / "results.json") for f in (straight, boxed))
    assert a["mean_ap"] == pytest.approx(b["mean_ap"], abs=1e-6)
    assert a["checkpoint_epoch"] == b["checkpoint_epoch"]
    last = runfiles.load_checkpoint(straight / "checkpoints/last.pt")
    assert last["ema"]["updates"] == 3 * 2  # 8 images in batches of 4, 3 epochs
    trained, averaged = last["ema"]["trained_model"], last["model"]
    assert not torch.equal(trained["down.0.0.0.weight"], averaged["down.0.0.0.weight"])
    # --eval-only tests the checkpoint's "model": the average, the same numbers as the run's
    best = straight / "checkpoints/best.pt"
    tested = run_part2("--eval-only", best, "--data", synthetic_facade_ro, "--test-range", 0, 3,
                       "--output-dir", tmp_path / "e")  # fmt: skip
    assert tested["mean_ap"] == pytest.approx(a["mean_ap"], abs=1e-6)


def test_rare_crops_without_the_cropping_augmentation_is_one_line(synthetic_facade_ro, capsys):
    with pytest.raises(UserError, match="--rare-crops"):
        run_part2("--data", synthetic_facade_ro, *SYN_P2, "--augment", "none", "--rare-crops", 0.3)
    for bad in (["--rare-crops", "1.5"], ["--rare-crops", "-0.1"], ["--ema", "1"]):
        with pytest.raises(SystemExit) as stop:
            part2_segment.get_args_parser().parse_args(bad)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines


def test_the_full_resolution_branch_sees_detail_the_downsampled_unet_cannot():
    """A checkerboard of one-pixel squares averages to nothing over 2x2 blocks: the downsampled
    U-Net's scores ignore it, the full-resolution branch's do not; for ~1/6 more compute."""
    torch.manual_seed(0)
    kwargs = dict(num_classes=5, width=8, depth=2, downsample=2)
    coarse, fine = (models.build_model("unet", **kwargs, fine_width=c).eval() for c in (0, 8))
    x = torch.rand(1, 3, 32, 32)
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 0.4 - 0.2
    with torch.no_grad():
        torch.testing.assert_close(coarse(x + board), coarse(x), rtol=0, atol=1e-5)
        assert (fine(x + board) - fine(x)).abs().max() > 1e-3
        assert fine(x).shape == coarse(x).shape == (1, 5, 32, 32)
    w16 = dict(num_classes=5, width=16, depth=4, downsample=2)
    ratio = models.forward_flops(
        models.build_model("unet", **w16, fine_width=8), (1, 3, 256, 256)
    ) / models.forward_flops(models.build_model("unet", **w16), (1, 3, 256, 256))
    assert 1.1 < ratio < 1.25, ratio


def test_a_full_resolution_branch_needs_a_downsampled_unet(synthetic_facade_ro):
    base = ["--data", synthetic_facade_ro, *SYN_P2]
    with pytest.raises(UserError, match="--downsample"):
        run_part2(*base, "--model", "unet", "--fine-width", 4)
    with pytest.raises(UserError, match="unet only"):
        run_part2(*base, "--model", "facade_fcn", "--fine-width", 4)


def test_one_vs_rest_is_a_binary_cross_entropy_per_class_that_sees_a_shared_offset():
    torch.manual_seed(0)
    logits, y = 3 * torch.randn(2, 5, 3, 4), torch.randint(0, 5, (2, 3, 4))
    loss_fn = losses.OneVsRest(5)
    z, onehot = logits.double(), torch.nn.functional.one_hot(y, 5).movedim(-1, 1).double()
    p = torch.sigmoid(z)
    by_hand = -(onehot * p.log() + (1 - onehot) * (1 - p).log()).sum(1).mean()
    assert loss_fn(logits, y).item() == pytest.approx(by_hand.item(), rel=1e-5)
    from_sums = loss_fn.value(loss_fn.sums(logits, y).tolist())
    assert from_sums == pytest.approx(by_hand.item(), rel=1e-5)
    # The same offset added to every class's score of a pixel: softmax cross-entropy is blind to
    # it (so its raw scores need not rank pixels across the image); this loss is not.
    shifted = logits + 2 * torch.randn(2, 1, 3, 4)
    ce = losses.CrossEntropy()
    assert ce(shifted, y).item() == pytest.approx(ce(logits, y).item(), rel=1e-5)
    assert abs(loss_fn(shifted, y).item() - by_hand.item()) > 0.1


def test_a_one_vs_rest_run_selects_its_epoch_on_its_own_loss(synthetic_facade_ro, tmp_path):
    out = tmp_path / "bce"
    res = run_part2("--data", synthetic_facade_ro, *SYN_P2, *UNET, "--loss", "bce",
                    "--epochs", "2", "--batch-size", "4", "--output-dir", out)  # fmt: skip
    assert runfiles.read_json(out / "args.json")["loss"] == "bce"
    scores, labels = checkpoint_scores(out, synthetic_facade_ro / "train", 8, 10)
    # one row per pixel: (pixels, 5, 1) scores and (pixels, 1) labels, the same mean
    val_loss = losses.OneVsRest(5)(torch.from_numpy(scores)[..., None],
                                   torch.from_numpy(labels).long()[:, None])  # fmt: skip
    rows = runfiles.read_csv(out / "metrics.csv")
    chosen = min(rows, key=lambda r: float(r["val_loss"]))
    assert res["checkpoint_epoch"] == int(chosen["epoch"])
    assert float(chosen["val_loss"]) == pytest.approx(val_loss.item(), rel=1e-4)


def test_the_z_loss_adds_the_mean_square_log_sum_exp_and_sees_the_shared_offset():
    torch.manual_seed(0)
    logits, y = 3 * torch.randn(2, 5, 3, 4), torch.randint(0, 5, (2, 3, 4))
    ce = losses.CrossEntropy()
    loss_fn = losses.WithZLoss(ce, 0.1)
    by_hand = ce(logits, y) + 0.1 * torch.logsumexp(logits.double(), 1).square().mean()
    assert loss_fn(logits, y).item() == pytest.approx(by_hand.item(), rel=1e-5)
    from_sums = loss_fn.value(loss_fn.sums(logits, y).tolist())
    assert from_sums == pytest.approx(by_hand.item(), rel=1e-5)
    # log-probabilities (log-sum-exp 0 at every pixel) pay no z-loss: only the offset is priced
    log_p = logits.log_softmax(1)
    assert loss_fn(log_p, y).item() == pytest.approx(ce(logits, y).item(), rel=1e-5)


def test_strip_pooling_gives_a_pixel_the_context_of_its_whole_row_and_column():
    torch.manual_seed(0)
    pool = models.StripPool(4).eval()
    x = torch.randn(1, 4, 8, 8)
    moved = x.clone()
    moved[0, :, 0, 3] += 5  # one pixel of the top row, column 3
    with torch.no_grad():
        change = (pool(moved) - pool(x)).abs().sum(1)[0]  # (H, W)
    assert change[7, 3] > 1e-3 and change[0, 6] > 1e-3  # its column's bottom, its row's end
    assert change[7, 6] < 1e-6  # neither its row nor its column: untouched
    by_hand = x * torch.sigmoid(pool.gate(torch.relu(
        pool.rows(x.mean(3, keepdim=True)) + pool.columns(x.mean(2, keepdim=True)))))  # fmt: skip
    torch.testing.assert_close(pool(x), by_hand)


def test_a_strip_pooled_z_loss_run_resumes_and_its_eval_only_reproduces_it(
    synthetic_facade_ro, tmp_path
):
    out, flags = tmp_path / "sp", [*SYN_P2, *UNET, "--strip-pool", "--z-loss", "0.01"]
    common = [*flags, "--epochs", "2", "--batch-size", "4", "--output-dir", out]
    run_part2("--data", synthetic_facade_ro, *common, "--stop-after-epochs", "1")
    res = run_part2("--data", synthetic_facade_ro, *common, "--resume", out / "checkpoints/last.pt")
    best = out / "checkpoints" / "best.pt"
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["model_kwargs"]["strip_pool"] is True and ckpt["args"]["z_loss"] == 0.01
    assert any(k.startswith("context.") for k in ckpt["model"])
    again = run_part2("--data", synthetic_facade_ro, *SYN_P2, "--eval-only", best,
                      "--output-dir", tmp_path / "again")  # fmt: skip
    assert again["mean_ap"] == pytest.approx(res["mean_ap"], abs=1e-6)
    plain = models.build_model("unet", num_classes=5, width=4)  # older checkpoints: no new keys
    assert not any(k.startswith("context.") for k in plain.state_dict())


def test_strip_pooling_is_a_unet_flag(synthetic_facade_ro):
    with pytest.raises(UserError, match="--strip-pool applies to unet only"):
        run_part2("--data", synthetic_facade_ro, *SYN_P2, "--strip-pool")
