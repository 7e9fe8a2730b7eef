"""Multi-scale test-time views (--tta-scales) and testing a checkpoint on its run's validation
images (--eval-on val), the way to choose test-time settings without the test set."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import models
import runfiles
from conftest import (
    SYN_ARGS,
    assert_one_line_error,
    checkpoint_scores,
    mean_ap_by_hand,
    run_in_process,
    run_part2,
)

# fp32, standard layout, every evaluation in one batch: the recomputations below use the very
# same kernels (oneDNN may round differently for another batch size)
EXACT = ["--no-amp", "--no-channels-last", "--eval-batch-size", "4"]
SCALES = [1.0, 1.5]


@pytest.fixture(scope="module")
def scaled_run(synthetic_facade_ro, tmp_path_factory):
    """The reference FCN for 2 epochs, tested with flips at scales 1 and 1.5."""
    out = tmp_path_factory.mktemp("tta_scales") / "run"
    flags = [*SYN_ARGS, *EXACT, "--epochs", "2", "--batch-size", "4", "--tta", "--tta-scales"]
    run_part2("--data", synthetic_facade_ro, *flags, *SCALES, "--output-dir", out)
    return out


def _views_by_hand(net, x, scales):
    """The mean over scales of (image + mirror image) scores, resized by hand."""
    h, w = x.shape[-2:]
    total = 0
    for s in scales:
        big = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear")
        pair = (net(big) + net(big.flip(-1)).flip(-1)) / 2
        total = total + F.interpolate(pair, size=(h, w), mode="bilinear")
    return total / len(scales)


def _scores(run_dir, folder, first, last, scales):
    """checkpoint_scores of best.pt with the test-time views at ``scales``."""
    views = functools.partial(_views_by_hand, scales=scales)
    return checkpoint_scores(run_dir, folder, first, last, views=views)


def test_scaled_size_rounds_each_side_to_the_model_multiple():
    assert models.scaled_size((256, 256), 1.25, 16) == (320, 320)
    assert models.scaled_size((256, 192), 0.75, 16) == (192, 144)
    assert models.scaled_size((100, 60), 0.1, 16) == (16, 16)  # never below one multiple


def test_one_scale_is_the_plain_flip_average_and_two_differ():
    torch.manual_seed(0)
    x, net = torch.randn(2, 3, 8, 12), torch.nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        plain = (net(x) + net(x.flip(-1)).flip(-1)) / 2
        assert torch.equal(models.FlipAverage(net)(x), plain)
        scaled = models.FlipAverage(net, (1.0, 1.5))(x)
        assert torch.allclose(scaled, _views_by_hand(net, x, (1.0, 1.5)), atol=1e-6)
        assert not torch.allclose(scaled, plain, atol=1e-3)


def test_validation_and_test_use_the_scaled_views(scaled_run, synthetic_facade_ro):
    """val_mean_ap_tta and the test mean AP are those of the flips at both scales, recomputed
    here by hand from best.pt; compute counts 1 + 2(1 + 1.5^2) passes per validation image for
    the selected epoch and 2(1 + 1.5^2) per test image."""
    res = runfiles.read_json(scaled_run / "results.json")
    assert res["tta"] is True and res["tta_scales"] == SCALES and res["evaluated_on"] == "test"
    val = _scores(scaled_run, synthetic_facade_ro / "train", 10, 11, SCALES)
    assert res["val_mean_ap_tta"] == pytest.approx(mean_ap_by_hand(*val), abs=1e-6)
    test = _scores(scaled_run, synthetic_facade_ro / "test_dev", 0, 3, SCALES)
    assert res["mean_ap"] == pytest.approx(mean_ap_by_hand(*test), abs=1e-6)
    image = res["gflops_per_image"] / 1e3  # TFLOP of one 32 x 32 forward pass
    assert res["test_tflop"] == pytest.approx(4 * 2 * (1 + 1.5**2) * image, rel=1e-6)
    epochs_val = 2 * 2 * image  # 2 validation images in each of 2 epochs
    assert res["val_tflop"] == pytest.approx(epochs_val + 2 * (1 + 2 * 3.25) * image, rel=1e-6)


def test_eval_on_val_tests_the_runs_validation_images(scaled_run, synthetic_facade_ro, tmp_path):
    """--eval-only --eval-on val reproduces the run's own validation numbers of the selected
    epoch: plain, and with the scaled views; the report says what was tested."""
    res = runfiles.read_json(scaled_run / "results.json")
    best = scaled_run / "checkpoints/best.pt"
    common = ["--data", synthetic_facade_ro, "--eval-only", best, "--eval-on", "val", *EXACT[1:]]
    plain = run_part2(*common, "--no-tta", "--output-dir", tmp_path / "plain")
    assert plain["evaluated_on"] == "val" and plain["tta"] is False
    assert plain["mean_ap"] == pytest.approx(res["val_mean_ap"], abs=1e-9)
    views = run_part2(*common, "--tta", "--tta-scales", *SCALES, "--output-dir", tmp_path / "views")
    assert views["tta_scales"] == SCALES
    assert views["mean_ap"] == pytest.approx(res["val_mean_ap_tta"], abs=1e-9)
    assert abs(views["mean_ap"] - plain["mean_ap"]) > 1e-6
    assert "--eval-on val" in (tmp_path / "views/report.html").read_text()


@pytest.mark.parametrize(
    "flags, mentions",
    [
        (["--tta-scales", "1", "1.25"], "give --tta with it"),
        (["--eval-on", "val"], "give --eval-only CKPT"),
        (["--tta", "--tta-scales", "0.1"], "--tta-scales"),
    ],
)
def test_misused_flags_are_one_line_errors(tmp_path, synthetic_facade_ro, flags, mentions):
    run_dir = tmp_path / "run"
    proc = run_in_process(
        "part2_segment.py", "--data", str(synthetic_facade_ro), *SYN_ARGS, *flags,
        "--output-dir", str(run_dir), "--no-progress",
    )  # fmt: skip
    assert_one_line_error(proc, mentions=mentions)
    assert not run_dir.exists()
