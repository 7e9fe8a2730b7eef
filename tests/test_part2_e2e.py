"""Part 2 end to end on the tiny synthetic facade set, a small slice of the real one, and
``predict``."""

from __future__ import annotations

import base64
import csv
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

import datasets
import models
import part2_report
import part2_segment
import runfiles
from conftest import SYN_ARGS, checkpoint_scores, mean_ap_by_hand, run_part2


@pytest.fixture(scope="module")
def part2_run(synthetic_facade_ro, tmp_path_factory):
    out = tmp_path_factory.mktemp("part2") / "run"
    # fp32 in the standard layout, the 4 test images in one batch: the tests recompute its
    # scores from the checkpoint with the very same computation (oneDNN may pick other kernels,
    # and so round differently, for another batch size: 1.4e-6 in an AP on an AVX2 CPU)
    flags = [*SYN_ARGS, *"--epochs 2 --batch-size 4 --no-amp --no-channels-last".split()]
    flags += ["--eval-batch-size", "4"]
    returned = run_part2("--data", synthetic_facade_ro, *flags, "--output-dir", out)
    return out, returned


def _metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_outputs(part2_run):
    run_dir, returned = part2_run
    res = runfiles.read_json(run_dir / "results.json")
    for key in ("ap", "mean_ap", "ap_softmax", "iou", "miou", "pixel_accuracy"):
        assert key in res, key
    assert list(res["ap"]) == datasets.FACADE_CLASSES
    assert (
        list(res["ap_softmax"]) == datasets.FACADE_CLASSES
        and list(res["iou"]) == datasets.FACADE_CLASSES
    )
    for k in ("ap", "ap_softmax", "iou"):
        assert all(0 <= v <= 1 for v in res[k].values()), (k, res[k])
    assert res["mean_ap"] == pytest.approx(np.mean(list(res["ap"].values())))
    assert res["miou"] == pytest.approx(np.mean(list(res["iou"].values())))
    cm = np.array(res["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == 4 * 32 * 32
    assert res["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert res["image_size"] == [32, 32] and res["model"] == "facade_fcn"
    assert res["gflops_per_image"] == pytest.approx(38.8 * (32 * 32) / (256 * 256), rel=0.01)
    assert res["checkpoint"].endswith("best.pt")
    assert returned["mean_ap"] == pytest.approx(res["mean_ap"])
    rows = _metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert 0 < float(r["train_loss"]) < 10 and 0 < float(r["val_loss"]) < 10
        assert math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["val_loss"]))
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert res["checkpoint_epoch"] == int(best["epoch"])
    assert 0 < res["val_mean_ap"] <= 1 and 0 < res["val_mean_ap_tta"] <= 1
    for rel in (f.path for f in part2_report.FIGURES):
        with Image.open(run_dir / rel) as im:
            assert im.format == "PNG"
            im.load()
    html = (run_dir / "report.html").read_text()
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) == len(part2_report.FIGURES)
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in imgs)
    for name in datasets.FACADE_CLASSES:
        assert f"<td>{name}</td><td>{res['ap'][name]:.4f}</td>" in html
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)
        assert ckpt["task"] == "segmentation" and ckpt["model_name"] == "facade_fcn"
        assert ckpt["model_kwargs"] == {"num_classes": 5}


def test_independent_ap_recomputation(part2_run, synthetic_facade_ro):
    run_dir, _ = part2_run
    res = runfiles.read_json(run_dir / "results.json")
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    net = models.build_model(ckpt["model_name"], **ckpt["model_kwargs"])
    net.load_state_dict(ckpt["model"])
    net.eval()
    images, labels = datasets.load_facade_split(synthetic_facade_ro / "test_dev", 0, 3)
    # normalisation = per-channel mean/std of the 10 training images
    train_images, _ = datasets.load_facade_split(synthetic_facade_ro / "train", 0, 9)
    mean, std = datasets.channel_stats(train_images)
    assert ckpt["normalization"]["mean"] == pytest.approx(mean) and ckpt["normalization"][
        "std"
    ] == pytest.approx(std)
    x = (images.float() / 255 - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(
        1, 3, 1, 1
    )
    with torch.no_grad():
        logits = net(x)  # the run's own test batch: the same scores, bit for bit
    scores = logits.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    probs = torch.softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    flat = labels.reshape(-1).numpy()
    checked = 0
    for c, name in enumerate(datasets.FACADE_CLASSES):
        if not (flat == c).any():
            continue
        assert abs(average_precision_score(flat == c, scores[:, c]) - res["ap"][name]) < 1e-6, name
        assert (
            abs(average_precision_score(flat == c, probs[:, c]) - res["ap_softmax"][name]) < 1e-6
        ), name
        checked += 1
    assert checked == 5  # the synthetic set draws every class in every image
    pred = scores.argmax(1)
    assert res["pixel_accuracy"] == pytest.approx((pred == flat).mean(), abs=1e-9)


def test_eval_only_and_report_only(part2_run, synthetic_facade_ro, tmp_path):
    run_dir, _ = part2_run
    res = runfiles.read_json(run_dir / "results.json")
    other = tmp_path / "eval"
    best = run_dir / "checkpoints" / "best.pt"
    # tested as the run tested it (layout, batch of 4), so the numbers are the same to 1e-9
    flags = ["--eval-only", best, "--output-dir", other, "--no-channels-last"]
    flags += ["--eval-batch-size", "4"]
    run_part2("--data", synthetic_facade_ro, *SYN_ARGS, *flags)
    res2 = runfiles.read_json(other / "results.json")
    assert (
        res2["ap"] == pytest.approx(res["ap"], abs=1e-9)
        and res2["confusion_matrix"] == res["confusion_matrix"]
    )
    (other / "report.html").unlink()
    run_part2("--report-only", other)
    assert "Per-class results on test pixels" in (other / "report.html").read_text()


def _best_scores(run_dir, folder, first, last, checkpoint="best.pt", flip=False):
    """checkpoint_scores, plain or the mean of each image and its mirror."""
    views = (lambda net, x: (net(x) + net(x.flip(-1)).flip(-1)) / 2) if flip else None
    return checkpoint_scores(run_dir, folder, first, last, checkpoint, views)


def test_val_mean_ap_every_n_epochs(part2_run, synthetic_facade_ro):
    """--val-ap-every (default 5) fills val_mean_ap at multiples of N and at the last epoch:
    here only epoch 2 of 2, the AP of last.pt on the validation images (10-11)."""
    run_dir, _ = part2_run
    rows = _metrics(run_dir)
    assert rows[0]["val_mean_ap"] == "nan"
    scores, labels = _best_scores(run_dir, synthetic_facade_ro / "train", 10, 11, "last.pt")
    assert float(rows[1]["val_mean_ap"]) == pytest.approx(mean_ap_by_hand(scores, labels), abs=1e-6)


def test_tta_scores_are_the_mean_of_the_image_and_its_mirror(
    part2_run, synthetic_facade_ro, tmp_path
):
    run_dir, _ = part2_run
    best = run_dir / "checkpoints" / "best.pt"
    flags = [*SYN_ARGS, "--eval-only", best, "--output-dir", tmp_path / "tta", "--tta"]
    # the layout it was trained in and one batch of 4, as _best_scores: exact recomputation
    flags += ["--no-channels-last", "--eval-batch-size", "4"]
    res = run_part2("--data", synthetic_facade_ro, *flags)
    scores, labels = _best_scores(run_dir, synthetic_facade_ro / "test_dev", 0, 3, flip=True)
    assert res["tta"] is True
    assert res["mean_ap"] == pytest.approx(mean_ap_by_hand(scores, labels), abs=1e-6)
    plain = runfiles.read_json(run_dir / "results.json")
    assert plain["tta"] is False and abs(plain["mean_ap"] - res["mean_ap"]) > 1e-6


def test_unet_one_epoch(synthetic_facade_ro, tmp_path):
    out = tmp_path / "unet"
    flags = [*SYN_ARGS, *"--model unet --width 8 --crop 32 --epochs 1 --batch-size 5".split()]
    res = run_part2("--data", synthetic_facade_ro, *flags, "--output-dir", out)
    rows = _metrics(out)
    assert len(rows) == 1
    assert math.isfinite(float(rows[0]["train_loss"])) and math.isfinite(float(rows[0]["val_loss"]))
    assert math.isfinite(res["test_loss"]) and 0 <= res["mean_ap"] <= 1
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["model_kwargs"] == {"num_classes": 5, "width": 8, "depth": 4, "downsample": 1}


def test_real_facade_slice(facade_root, tmp_path):
    out = tmp_path / "real"
    flags = (
        "--train-range 0 1 --val-range 800 800 --test-range 0 1"
        " --epochs 1 --max-steps 1 --num-examples 2"
    )
    res = run_part2("--data", facade_root, *flags.split(), "--output-dir", out)
    saved = runfiles.read_json(out / "results.json")
    assert 0 < saved["mean_ap"] < 1 and saved["image_size"] == [256, 256]
    assert saved["gflops_per_image"] == pytest.approx(38.8, rel=0.01)
    assert sum(map(sum, saved["confusion_matrix"])) == 2 * 256 * 256
    assert res["mean_ap"] == pytest.approx(saved["mean_ap"])


# ----------------------------------------------------------------------------- predict
def test_predict_cli(part2_run, tmp_path):
    run_dir, _ = part2_run
    ckpt = run_dir / "checkpoints" / "best.pt"
    rng = np.random.default_rng(0)
    img1 = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(img1)
    img2 = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 256, (45, 67, 4), dtype=np.uint8), "RGBA").save(img2)
    bad = tmp_path / "bad.jpg"
    bad.write_text("this is not an image\n")
    out = tmp_path / "pred"
    images = [str(img1), str(img2), str(bad)]
    argv = ["predict", "--checkpoint", str(ckpt), *images, "--output-dir", str(out)]
    with pytest.raises(SystemExit) as info:
        part2_segment.cli_main(argv)
    assert info.value.code == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "big_mask.png",
        "big_overlay.png",
        "odd_mask.png",
        "odd_overlay.png",
    ]
    for stem, size in (("big", (256, 256)), ("odd", (67, 45))):
        for suffix in ("mask", "overlay"):
            with Image.open(out / f"{stem}_{suffix}.png") as im:
                assert im.size == size and im.mode == "RGB"
        mask = np.asarray(Image.open(out / f"{stem}_mask.png")).reshape(-1, 3)
        assert {tuple(c) for c in np.unique(mask, axis=0)} <= set(datasets.FACADE_PALETTE)
    # the odd-sized image: reflect-padded to 68x46 for the model, scores cropped back
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    net = models.build_model(ck["model_name"], **ck["model_kwargs"])
    net.load_state_dict(ck["model"])
    net.eval()
    rgb = np.array(Image.open(img2).convert("RGB"))
    x = datasets.normalize(
        torch.from_numpy(rgb).permute(2, 0, 1)[None],
        ck["normalization"]["mean"],
        ck["normalization"]["std"],
    )
    with torch.no_grad():
        pred = net(torch.nn.functional.pad(x, (0, 1, 0, 1), mode="reflect"))[..., :45, :67].argmax(
            1
        )[0]
    assert np.array_equal(np.asarray(Image.open(out / "odd_mask.png")), datasets.colorize(pred))


def test_predict_264_matches_model(part2_run, tmp_path):
    """The mask of a 264x264 image equals argmax of the model's own logits (264 is a multiple of
    2)."""
    run_dir, _ = part2_run
    ckpt_path = run_dir / "checkpoints" / "best.pt"
    rgb = np.random.default_rng(1).integers(0, 256, (264, 264, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "sq.png")
    out = tmp_path / "pred"
    image = str(tmp_path / "sq.png")
    argv = ["predict", "--checkpoint", str(ckpt_path), image, "--output-dir", str(out)]
    with pytest.raises(SystemExit) as info:
        part2_segment.cli_main(argv)
    assert info.value.code == 0
    mask_rgb = np.asarray(Image.open(out / "sq_mask.png"))
    assert mask_rgb.shape == (264, 264, 3)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    net = models.build_model(ckpt["model_name"], **ckpt["model_kwargs"])
    net.load_state_dict(ckpt["model"])
    net.eval()
    x = datasets.normalize(
        torch.from_numpy(rgb).permute(2, 0, 1)[None],
        ckpt["normalization"]["mean"],
        ckpt["normalization"]["std"],
    )
    with torch.no_grad():
        pred = net(x).argmax(1)[0]
    assert np.array_equal(mask_rgb, datasets.colorize(pred))
    overlay = np.asarray(Image.open(out / "sq_overlay.png")).astype(int)
    assert np.abs(overlay - (0.5 * rgb + 0.5 * mask_rgb).astype(int)).max() <= 1


def test_predict_downscales_large_images(part2_run, tmp_path):
    run_dir, _ = part2_run
    img = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(
        img
    )
    out = tmp_path / "pred"
    ckpt = str(run_dir / "checkpoints" / "best.pt")
    argv = ["predict", "--checkpoint", ckpt, str(img), "--max-size", "64", "--output-dir", str(out)]
    with pytest.raises(SystemExit) as info:
        part2_segment.cli_main(argv)
    assert info.value.code == 0
    with Image.open(out / "wide_mask.png") as im:
        assert im.size == (150, 90)


def test_predict_rejects_classification_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "cls.pt"
    torch.save({"model": {}, "model_name": "sigmoid_cnn", "task": "classification"}, ckpt)
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    with pytest.raises(SystemExit) as info:
        part2_segment.cli_main(
            ["predict", "--checkpoint", str(ckpt), str(img), "--output-dir", str(tmp_path / "out")]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "classification" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_time_limit_stop_computes_the_validation_ap_of_its_last_epoch(
    synthetic_facade_ro, tmp_path
):
    """--time-limit ends a 3-epoch run after epoch 1, which is neither a multiple of
    --val-ap-every (5) nor the planned last epoch: it still gets its validation mean AP, equal to
    a recomputation from last.pt."""
    run = tmp_path / "run"
    flags = [*SYN_ARGS, *"--epochs 3 --batch-size 4 --no-amp --no-channels-last".split()]
    flags += ["--eval-batch-size", "4", "--time-limit", "0.0001"]  # one batch, as recomputed
    run_part2("--data", synthetic_facade_ro, *flags, "--output-dir", run)
    (row,) = _metrics(run)
    scores, labels = _best_scores(run, synthetic_facade_ro / "train", 10, 11, "last.pt")
    assert float(row["val_mean_ap"]) == pytest.approx(mean_ap_by_hand(scores, labels), abs=1e-6)


def test_selected_epoch_is_scored_on_validation_with_and_without_flips(
    part2_run, synthetic_facade_ro
):
    """results.json holds the validation mean AP of best.pt as it is and with test-time flips,
    the numbers that may decide --tta (the test set may not); both recomputed here."""
    run_dir, _ = part2_run
    res = runfiles.read_json(run_dir / "results.json")
    for flip, key in ((False, "val_mean_ap"), (True, "val_mean_ap_tta")):
        scores, labels = _best_scores(run_dir, synthetic_facade_ro / "train", 10, 11, flip=flip)
        assert res[key] == pytest.approx(mean_ap_by_hand(scores, labels), abs=1e-6), key
    assert res["val_mean_ap"] != res["val_mean_ap_tta"]


def _facade_fcn_flops(h, w):
    """2 x the multiply-adds of the reference FCN's convolutions (biases aside), worked out by
    hand layer by layer: 38.8 GFLOP at 256 x 256, as the reference report says."""
    per_pixel = 3 * 64 * 9 + 64 * 64 * 9 + 64 * 64 + 64 * 128 * 9 + 128 * 128 * 9
    per_pixel += 128 * 128 + 128 * 5 * 25  # the second up-convolution and the 5 x 5 head
    return 2 * h * w * per_pixel


def test_compute_spent_is_counted_per_epoch_and_in_results(part2_run):
    """metrics.csv holds each epoch's training (10 images, forward + backward = 3 forwards) and
    validation (2 images) TFLOP; results.json their sums, plus scoring the selected epoch on
    validation with and without flips (3 forwards per image) and the test (4 images)."""
    run_dir, _ = part2_run
    assert _facade_fcn_flops(256, 256) / 1e9 == pytest.approx(38.83, abs=0.01)
    image = _facade_fcn_flops(32, 32) / 1e12
    rows = _metrics(run_dir)
    assert [float(r["train_tflop"]) for r in rows] == pytest.approx([10 * 3 * image] * 2)
    assert [float(r["val_tflop"]) for r in rows] == pytest.approx([2 * image] * 2)
    res = runfiles.read_json(run_dir / "results.json")
    assert res["train_tflop"] == pytest.approx(60 * image)
    assert res["val_tflop"] == pytest.approx(2 * 2 * image + 3 * 2 * image)
    assert res["test_tflop"] == pytest.approx(4 * image)
    logged = f"training {res['train_tflop']:.4g} + validation {res['val_tflop']:.4g} TFLOP"
    assert logged in (run_dir / "log.txt").read_text()


def test_val_every_validates_only_due_epochs_and_selects_among_them(synthetic_facade_ro, tmp_path):
    """--val-every 2 over 3 epochs validates epochs 2 and 3 (the last) only; the best epoch is
    the validated one of lower loss; a training crop's compute is counted at the crop size."""
    run = tmp_path / "run"
    flags = [*SYN_ARGS, *"--model unet --width 8 --crop 16 --epochs 3 --batch-size 5".split()]
    res = run_part2("--data", synthetic_facade_ro, *flags, "--val-every", "2", "--output-dir", run)
    rows = _metrics(run)
    assert [r["val_loss"] == "nan" for r in rows] == [True, False, False]
    assert float(rows[0]["val_tflop"]) == 0 and float(rows[1]["val_tflop"]) > 0
    losses = {int(r["epoch"]): float(r["val_loss"]) for r in rows[1:]}
    assert res["checkpoint_epoch"] == min(losses, key=losses.get)
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    assert best["epoch"] == res["checkpoint_epoch"]
    net = models.build_model("unet", num_classes=5, width=8)
    crop = 3 * models.forward_flops(net, (1, 3, 16, 16)) / 1e12
    assert [float(r["train_tflop"]) for r in rows] == pytest.approx([10 * crop] * 3)
