"""Part 2: facade semantic segmentation (5 classes: others, facade, pillar, window, balcony).

    python part2_segment.py --data data/facade                      # reference FCN
    python part2_segment.py --data data/facade --model unet         # improved U-Net (GPU)
    python part2_segment.py --data data/facade --model unet --width 16 --downsample 2 \
        --crop 128 --crop-scale 0.45 0.6 --val-every 5 --tta        # CPU: 142 TFLOP in all
    python part2_segment.py --eval-only RUN/checkpoints/best.pt --data data/facade
    python part2_segment.py predict --checkpoint RUN/checkpoints/best.pt photo1.jpg photo2.png
    torchrun --standalone --nproc_per_node=2 part2_segment.py --data data/facade
    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 part2_segment.py --data DIR

Writes one run folder: args.json, log.txt, metrics.csv, results.json, report.html, figures/*.png,
checkpoints/{last,best}.pt.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import augment
import cli
import datasets
import engine
import losses
import models
import part2_report
import predict
import runfiles
import splits
import utils
from metrics import PixelScores

TASK, OUTPUT_ROOT = "segmentation", "outputs/part2"
NAMES = datasets.FACADE_CLASSES
NUM_CLASSES = len(NAMES)
RARE_CLASSES = (NAMES.index("pillar"), NAMES.index("balcony"))  # the fewest training pixels
DEFAULTS = {
    "model": "facade_fcn",
    "data": "data/facade",
    "train_range": [0, 799],
    "val_range": [800, 899],
    "test_range": [0, 109],
    "split": "ranges",
    "crop": 256,
    "crop_scale": [0.6, 1.25],
    "rare_crops": 0.0,
    "z_loss": 0.0,
    "val_ap_every": 5,
    "tta": False,
    "tta_scales": [1.0],
    "eval_on": "test",
}
SELECT = ("val_loss", "min")  # the best epoch: lowest validation loss
RECIPES = {
    # The reference: Adam 1e-3, weight decay 1e-5, batch 25, plain cross-entropy, no augmentation.
    "facade_fcn": dict(
        epochs=30,
        batch_size=25,
        lr=1e-3,
        weight_decay=1e-5,
        optimizer="adam",
        schedule="constant",
        warmup_epochs=0,
        loss="ce",
        augment="none",
    ),
    "unet": dict(
        epochs=150,
        batch_size=16,
        lr=2e-3,
        weight_decay=1e-4,
        optimizer="adamw",
        schedule="cosine",
        warmup_epochs=3,
        loss="weighted_ce_dice",
        augment="scale_crop_flip_jitter",
        width=32,
    ),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.main_parser(
        "Train and test a facade segmenter (Part 2). Segment your own photos with: "
        "part2_segment.py predict --checkpoint CKPT IMAGE... (predict --help)"
    )
    d = parser.add_argument_group("data")
    d.add_argument(
        "--data",
        metavar="DIR",
        help=f"dataset folder holding train/ and test_dev/ (default: {DEFAULTS['data']})",
    )
    for split, where in (("train", "train/"), ("val", "train/"), ("test", "test_dev/")):
        first, last = DEFAULTS[f"{split}_range"]
        d.add_argument(
            f"--{split}-range",
            type=cli.NONNEG_INT,
            nargs=2,
            metavar=("FIRST", "LAST"),
            help=f"{split} images {where}eecs442_FIRST..LAST, inclusive (default: {first} {last})",
        )
    d.add_argument(
        "--split",
        choices=["ranges", "grouped"],
        help="training and validation images: ranges = --train-range / --val-range (the "
        "course's 0-799 / 800-899, whose validation holds crops of training photographs); "
        "grouped = 801 / 99 images with no near-duplicate or crop of one photograph on both "
        "sides (docs/splits.md; not with --train-range or --val-range) (default: ranges)",
    )
    d.add_argument(
        "--augment",
        choices=["none", "scale_crop_flip_jitter"],
        help="training augmentation (default: per model)",
    )
    d.add_argument(
        "--crop",
        type=cli.POSITIVE_INT,
        metavar="PX",
        help="training crop of scale_crop_flip_jitter; a multiple of the model's size "
        "multiple (default: 256)",
    )
    d.add_argument(
        "--crop-scale",
        type=cli.float_in(0, low_open=True),
        nargs=2,
        metavar=("LO", "HI"),
        help="side of the random box, as a share of the image side, that is resized "
        "to --crop: 0.5 0.5 with --crop 128 keeps 256-px images at their scale "
        "(default: 0.6 1.25)",
    )
    d.add_argument(
        "--rare-crops",
        type=cli.float_in(0, 1),
        metavar="P",
        help="share of the training boxes that hold a pixel of the rarest classes, pillar and "
        "balcony, drawn at random (centred where the box stays inside the image; as nnU-Net "
        "oversamples foreground; default: 0)",
    )
    d.add_argument(
        "--num-examples",
        type=cli.POSITIVE_INT,
        default=6,
        metavar="N",
        help="test images in the prediction figure (default: 6)",
    )
    cli.add_common_args(
        parser,
        models=models.models_for(TASK),
        default_model=DEFAULTS["model"],
        eval_batch_size=None,
        eval_batch_help="1 on the CPU, where a larger batch's activations fall out of cache, "
        "10 on CUDA",
        output_root=OUTPUT_ROOT,
    )
    parser.add_argument(
        "--loss",
        choices=["ce", "weighted_ce_dice", "bce"],
        help="ce = cross-entropy; weighted_ce_dice = class-balanced cross-entropy "
        "+ soft Dice; bce = one binary cross-entropy per class on its own score (one "
        "versus the rest, as per-class AP ranks pixels) (default: per model)",
    )
    parser.add_argument(
        "--z-loss",
        type=cli.NONNEG_FLOAT,
        metavar="W",
        help="add W x the mean square of each pixel's log-sum-exp of its scores, which pins the "
        "offset softmax losses leave free, so raw scores rank pixels as probabilities do "
        "(default: 0, none)",
    )
    parser.add_argument(
        "--width", type=cli.POSITIVE_INT, metavar="C", help="U-Net base width (default: 32)"
    )
    parser.add_argument(
        "--downsample",
        type=int,
        choices=[1, 2, 4],
        help="the U-Net works on images averaged over F x F pixels and its scores are resized "
        "back to full size: ~1/F^2 of the compute (default: 1)",
    )
    parser.add_argument(
        "--fine-width",
        type=cli.NONNEG_INT,
        metavar="C",
        help="with --downsample 2 or 4: a full-resolution branch of C channels (a conv of the "
        "image, joined with the upsampled U-Net features, a conv) draws the boundaries at full "
        "resolution, e.g. thin pillars; 8 costs ~1/6 more compute at --downsample 2 "
        "(default: 0, none)",
    )
    parser.add_argument(
        "--strip-pool",
        action=argparse.BooleanOptionalAction,
        help="a strip-pooling gate after each U-Net decoder stage: every row and column "
        "averaged gives thin structures (pillars) context from the whole image height or width, "
        "for ~2%% more compute (default: off)",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="test with the mean scores of each image and its mirror image (one more forward "
        "pass per test image; validation and training are unchanged; default: off)",
    )
    parser.add_argument(
        "--tta-scales",
        type=cli.float_in(0.25, 4),
        nargs="+",
        metavar="S",
        help="with --tta: average the image and its mirror at each of these scales, resized "
        "bilinearly (e.g. 1 1.25; each scale s costs 2 s^2 forward passes; the selected epoch's "
        "validation records it too; default: 1)",
    )
    parser.add_argument(
        "--eval-on",
        choices=["test", "val"],
        help="with --eval-only: test the checkpoint on test_dev (test) or on its run's "
        "validation images (val), to choose test-time settings such as --tta-scales on "
        "validation (default: test)",
    )
    parser.add_argument(
        "--val-ap-every",
        type=cli.NONNEG_INT,
        metavar="N",
        help="also compute the validation mean AP every N epochs and at the last, into "
        "metrics.csv's val_mean_ap (0: never; default: 5)",
    )
    return parser


def model_kwargs(args) -> dict:
    for flag in ("width", "downsample", "fine_width", "strip_pool"):
        if getattr(args, flag) is not None and args.model != "unet":
            raise utils.UserError(
                f"--{flag.replace('_', '-')} applies to unet only, not {args.model}"
            )
    if args.fine_width and (args.downsample or 1) == 1:
        raise utils.UserError(
            "--fine-width adds a full-resolution branch to a --downsample 2 or 4 U-Net"
        )
    unet = {"width": args.width, "depth": 4, "downsample": args.downsample or 1}
    if args.fine_width:  # only then: checkpoints without the branch read as before
        unet["fine_width"] = args.fine_width
    if args.strip_pool:  # as the branch
        unet["strip_pool"] = True
    return {"num_classes": NUM_CLASSES} | (unet if args.model == "unet" else {})


def load_data(args, rt: utils.Runtime, multiple: int) -> dict:
    """uint8 images and labels of each split on the device (--eval-only: the test split only);
    ranges and sizes are checked before anything is written."""
    root = Path(args.data)
    if not root.is_dir():
        raise utils.UserError(f"dataset folder not found: {root}")
    names = ("test",) if args.eval_only else ("train", "val", "test")
    ranges = {name: getattr(args, f"{name}_range") for name in ("train", "val", "test")}
    indices = splits.facade_indices({n: ranges[n] for n in names}, args.split)
    folders = {"train": root / "train", "val": root / "train", "test": root / "test_dev"}
    if args.eval_only and args.eval_on == "val":  # the run's validation images take test's place
        indices["test"] = splits.facade_indices(ranges, args.split)["val"]
        folders["test"] = folders["val"]
    data = {}
    for name in names:
        images, labels = datasets.load_facade_images(folders[name], indices[name], NUM_CLASSES)
        h, w = images.shape[-2:]
        if h % multiple or w % multiple:
            raise utils.UserError(f"{name} images are {w}x{h}; this model needs sides divisible "
                                  f"by {multiple} (predict pads any size; for training, crop or "
                                  "resize the data)")  # fmt: skip
        data[name] = (images.to(rt.device), labels.to(rt.device))
    if args.eval_only:
        empty = tuple(t[:0] for t in data["test"])
        data |= {"train": empty, "val": empty}
    return data


def build_loaders(args, rt: utils.Runtime, splits: dict, ckpt: dict | None):
    """(train, val, test) loaders and the normalisation: the training split's mean and std, or
    the checkpoint's."""
    if args.eval_batch_size is None:  # batch 1 evaluates ~40% faster than 10 on a 2-core CPU
        args.eval_batch_size = 10 if rt.device.type == "cuda" else 1
    if ckpt:
        normalization = ckpt["normalization"]
    else:
        normalization = dict(zip(("mean", "std"), datasets.channel_stats(splits["train"][0])))
    augment_batch = None
    if args.rare_crops and args.augment != "scale_crop_flip_jitter":
        raise utils.UserError("--rare-crops chooses crops of --augment scale_crop_flip_jitter")
    if args.augment == "scale_crop_flip_jitter":
        augment_batch = functools.partial(augment.random_scale_crop_flip_jitter, crop=args.crop,
                                          scale_range=tuple(args.crop_scale),
                                          rare_share=args.rare_crops,
                                          rare_classes=RARE_CLASSES)  # fmt: skip
    loaders = datasets.split_loaders(
        splits, normalization, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        seed=args.seed, rank=rt.rank, world_size=rt.world_size, augment=augment_batch,
    )  # fmt: skip
    return *loaders, normalization


def main(args) -> dict:
    """Train (or --resume, or --eval-only), test the best epoch, write the run folder; returns
    what results.json holds (rank 0) or the raw test metrics (other ranks)."""
    if args.report_only:
        return part2_report.rebuild_report(Path(args.report_only))
    if args.split == "grouped" and (args.train_range or args.val_range):
        raise utils.UserError("--split grouped chooses the training and validation images: "
                              "give no --train-range or --val-range with it")  # fmt: skip
    ckpt = cli.resolve(args, task=TASK, defaults=DEFAULTS, recipes=RECIPES)
    if args.tta_scales != [1.0] and not args.tta:
        raise utils.UserError("--tta-scales sets the scales of --tta: give --tta with it")
    if args.eval_on != "test" and not args.eval_only:
        raise utils.UserError("--eval-on chooses what --eval-only tests: give --eval-only CKPT")
    net_kwargs = ckpt["model_kwargs"] if ckpt else model_kwargs(args)
    plain_mean = args.loss != "weighted_ce_dice" and not args.z_loss  # batches split exactly
    splits_exactly = plain_mean and not models.has_batch_norm(args.model, **net_kwargs)
    rt = cli.runtime(args, ckpt, batch_splits=splits_exactly)
    net = models.build_model(args.model, **net_kwargs)
    if args.crop % net.size_multiple:
        raise utils.UserError(f"--crop {args.crop} is not a multiple of {net.size_multiple}")
    splits = load_data(args, rt, net.size_multiple)  # bad data stops before the run folder
    train_loader, val_loader, test_loader, normalization = build_loaders(args, rt, splits, ckpt)
    train_side = (args.crop,) * 2 if args.augment != "none" else splits["train"][0].shape[-2:]
    compute = models.image_flops(net, train_side, splits["val"][0].shape[-2:])
    model, model_without_ddp = utils.prepare_model(
        net, rt, compile_model=args.compile, sync_bn=args.sync_bn
    )
    run_dir, log = runfiles.start_run(args, rt, OUTPUT_ROOT)
    h, w = splits["test"][0].shape[-2:]
    flops = models.forward_flops(net, (1, 3, h, w))
    sizes = " / ".join(f"{len(splits[s][0])} {s}" for s in ("train", "val", "test"))
    log.info("model %s: %d parameters, %.1f GFLOP per %dx%d image; %s images", args.model,
             models.count_parameters(net), flops / 1e9, w, h, sizes)  # fmt: skip
    if args.eval_on == "val":
        log.info("--eval-on val: the 'test' numbers below are the run's validation images")
    if args.eval_only:
        model_without_ddp.load_state_dict(ckpt["model"])
        tested = {"checkpoint": str(args.eval_only), "checkpoint_epoch": ckpt["epoch"]}
    else:
        meta = dict(task=TASK, model_name=args.model, model_kwargs=net_kwargs,
                    class_names=NAMES, normalization=normalization,
                    args=runfiles.recorded_args(args, rt))  # fmt: skip
        tested = train_and_select(args, rt, (model, model_without_ddp), (train_loader, val_loader),
                                  splits, (run_dir, log, meta, ckpt), compute)  # fmt: skip
        if tested is None:
            return runfiles.stop_invocation(args, rt, run_dir, log)
    views = models.tta_passes(args.tta_scales) if args.tta else 1
    tested |= {"model": args.model, "gflops_per_image": flops / 1e9, "tta": args.tta,
               "tta_scales": args.tta_scales, "evaluated_on": args.eval_on,
               "image_size": [int(h), int(w)], "normalization": normalization,
               "test_tflop": views * len(splits["test"][0]) * flops / 1e12}  # fmt: skip
    tested_model = (models.FlipAverage(model_without_ddp, args.tta_scales) if args.tta
                    else model_without_ddp)  # fmt: skip
    results = engine.evaluate(tested_model, test_loader, losses.CrossEntropy(), rt,
                              PixelScores(NUM_CLASSES), desc="test")  # fmt: skip
    if rt.is_main:  # rank 0 alone draws the prediction figure, with the unwrapped model
        figure = run_dir / "figures/predictions.png"
        predict.plot_predictions(tested_model, rt, splits["test"], normalization,
                                 args.num_examples, figure)  # fmt: skip
        log.info("compute (convolutions and matrix products, backward = 2x forward): training "
                 "%.4g + validation %.4g TFLOP; test %.4g TFLOP", tested.get("train_tflop", 0),
                 tested.get("val_tflop", 0), tested["test_tflop"])  # fmt: skip
        results = part2_report.write_outputs(run_dir, results, tested, model_without_ddp, log)
    runfiles.close_logger(log)
    utils.cleanup_runtime(rt)
    return results


def train_and_select(args, rt, nets, loaders, splits, run, compute) -> dict | None:
    """engine.fit, then the selected epoch on validation as it is and with flips (what decides
    --tta); None where --stop-after-epochs ended this invocation early."""
    model_without_ddp, (run_dir, log, meta, ckpt) = nets[1], run
    loss_fn = losses.segmentation_loss(args.loss, splits["train"][1], NUM_CLASSES, args.z_loss)
    tested = engine.fit(args, rt, nets, loaders, loss_fn, run_dir, log, meta, ckpt,
                        select=SELECT, ap_every=args.val_ap_every,
                        flops=(compute["train"], compute["val"]))  # fmt: skip
    if tested is None or not len(splits["val"][0]):
        return tested
    if "val_tflop" in tested:  # the two passes below: plain, and the test-time views
        passes = 1 + models.tta_passes(args.tta_scales)
        tested["val_tflop"] += passes * len(splits["val"][0]) * compute["val"] / 1e12
    tested |= engine.validate_both_views(
        model_without_ddp,
        models.FlipAverage(model_without_ddp, args.tta_scales),
        loaders[1],
        loss_fn,
        rt,
        lambda: PixelScores(NUM_CLASSES, False),
        "mean_ap",
    )
    scales = "" if args.tta_scales == [1.0] else f" at scales {args.tta_scales}"
    log.info("validation mean AP of the selected epoch: %.4f, with flips%s %.4f",
             tested["val_mean_ap"], scales, tested["val_mean_ap_tta"])  # fmt: skip
    return tested


def cli_main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        utils.run_cli(predict.main, predict.get_args_parser(), argv[1:])
    utils.run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli_main()
