"""Part 2: facade semantic segmentation (5 classes: others, facade, pillar, window, balcony).

    python part2_segment.py --data data/facade                      # reference FCN
    python part2_segment.py --data data/facade --model unet --amp   # improved U-Net
    python part2_segment.py --eval-only RUN/checkpoints/best.pt --data data/facade
    python part2_segment.py predict --checkpoint RUN/checkpoints/best.pt photo1.jpg photo2.png
    torchrun --standalone --nproc_per_node=2 part2_segment.py --data data/facade
    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 part2_segment.py --data DIR

Writes one run folder: args.json, log.txt, metrics.csv, results.json, report.html, figures/*.png,
checkpoints/{last,best}.pt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
import utils
from models import build_model, count_parameters, forward_flops, models_for

NUM_CLASSES = len(datasets.FACADE_CLASSES)
RECIPES = {
    # The reference: Adam 1e-3, weight decay 1e-5, batch 25, plain cross-entropy, no augmentation.
    "facade_fcn": dict(epochs=30, batch_size=25, lr=1e-3, weight_decay=1e-5, optimizer="adam", schedule="constant",
                       warmup_epochs=0, loss="ce", augment="none", model_kwargs={}),
    "unet": dict(epochs=150, batch_size=16, lr=2e-3, weight_decay=1e-4, optimizer="adamw", schedule="cosine",
                 warmup_epochs=3, loss="weighted_ce_dice", augment="scale_crop_flip_jitter",
                 model_kwargs={"width": 32, "depth": 4}),
}
FIGURES = ["figures/loss_curve.png", "figures/accuracy_curve.png", "figures/per_class_ap.png", "figures/pr_curves.png",
           "figures/confusion_matrix.png", "figures/predictions.png"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train and evaluate a facade segmenter (Part 2). "
                    "Segment your own photos with: part2_segment.py predict --checkpoint CKPT IMAGE...",
        add_help=add_help)
    d = parser.add_argument_group("data")
    d.add_argument("--data", default="data/facade", metavar="DIR",
                   help="dataset folder holding train/ and test_dev/ (default: data/facade)")
    d.add_argument("--train-range", type=int, nargs=2, default=[0, 799], metavar=("FIRST", "LAST"),
                   help="training images train/eecs442_FIRST..LAST, inclusive (default: 0 799)")
    d.add_argument("--val-range", type=int, nargs=2, default=[800, 899], metavar=("FIRST", "LAST"),
                   help="validation images, from train/ (default: 800 899)")
    d.add_argument("--test-range", type=int, nargs=2, default=[0, 109], metavar=("FIRST", "LAST"),
                   help="test images for AP, from test_dev/ (default: 0 109)")
    d.add_argument("--augment", default=None, choices=["none", "scale_crop_flip_jitter"],
                   help="training augmentation (default: per model)")
    d.add_argument("--crop", type=int, default=256, metavar="PX",
                   help="training crop size for scale_crop_flip_jitter (default: 256)")
    d.add_argument("--num-examples", type=int, default=6, metavar="N", help="test images in the prediction figure (default: 6)")
    utils.add_common_args(parser, epochs=None, batch_size=None, lr=None, weight_decay=None, eval_batch_size=10,
                          model="facade_fcn", models=models_for("segmentation"), output_root="outputs/part2")
    r = parser.add_argument_group("recipe (default: per model, see RECIPES in this file)")
    r.add_argument("--optimizer", default=None, choices=["adam", "adamw", "sgd"], help="optimiser")
    r.add_argument("--schedule", default=None, choices=["constant", "cosine", "linear"], help="LR schedule, stepped every batch")
    r.add_argument("--warmup-epochs", type=float, default=None, metavar="E", help="linear warm-up length in epochs")
    r.add_argument("--loss", default=None, choices=["ce", "weighted_ce_dice"],
                   help="ce = cross-entropy; weighted_ce_dice = class-balanced cross-entropy + soft Dice")
    r.add_argument("--width", type=int, default=None, metavar="C", help="U-Net base width (default: 32)")
    return parser


def get_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="part2_segment.py predict",
                                     description="Segment images with a trained checkpoint: writes NAME_mask.png and NAME_overlay.png.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files of any size (jpg, png, ...)")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint from a training run")
    parser.add_argument("--output-dir", default="outputs/predict", metavar="DIR", help="where to write (default: outputs/predict)")
    parser.add_argument("--max-size", type=int, default=1024, metavar="PX",
                        help="larger images are downscaled to this longer side for the network and the "
                             "scores upsampled back to full size (default: 1024)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    return parser


def apply_recipe(args, ckpt: dict | None = None) -> None:
    recipe = dict(RECIPES[args.model])
    model_kwargs = dict(recipe.pop("model_kwargs"))
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.width is not None and "width" in model_kwargs:
        model_kwargs["width"] = args.width
    args.model_kwargs = ckpt["model_kwargs"] if ckpt is not None else {"num_classes": NUM_CLASSES, **model_kwargs}


def load_data(args, rt):
    root = Path(args.data)
    if not root.is_dir():
        raise utils.UserError(f"dataset folder not found: {root}")
    for name in ("train", "val", "test"):
        datasets.check_range(name, *getattr(args, f"{name}_range"))
    folders = {"train": root / "train", "val": root / "train", "test": root / "test_dev"}
    splits = {}
    for name, folder in folders.items():
        images, labels = datasets.load_facade_split(folder, *getattr(args, f"{name}_range"), NUM_CLASSES)
        splits[name] = (images.to(rt.device), labels.to(rt.device))
    return splits


def check_size(model, images: torch.Tensor, split: str) -> None:
    multiple = model.size_multiple
    h, w = images.shape[-2:]
    if h % multiple or w % multiple:
        raise utils.UserError(f"{split} images are {w}x{h}; this model needs sides divisible by {multiple} "
                              "(predict pads any size; for training, crop or resize the data)")


def make_loss(name: str, train_labels: torch.Tensor):
    if name == "ce":
        return lambda logits, y: F.cross_entropy(logits, y)
    counts = torch.bincount(train_labels.flatten().long(), minlength=NUM_CLASSES).double()
    # Inverse square-root frequency, mean 1: lifts rare pillars and balconies without drowning the facade.
    weights = (counts.clamp(min=1) ** -0.5)
    weights = (weights / weights.mean()).float()

    def weighted_ce_dice(logits, y):
        ce = F.cross_entropy(logits, y, weight=weights.to(logits.device))
        probs = torch.softmax(logits.float(), 1)
        onehot = F.one_hot(y, NUM_CLASSES).permute(0, 3, 1, 2).float()
        inter, total = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
        dice = 1 - ((2 * inter + 1) / (total + 1)).mean()
        return ce + dice
    return weighted_ce_dice


def main(args) -> dict | None:
    if args.report_only:
        return write_outputs(Path(args.report_only), None, None, None)
    return utils.run_task(args, "segmentation", apply_recipe, run)


def run(args, rt: utils.Runtime, ckpt: dict | None) -> dict | None:
    splits = load_data(args, rt)  # data and sizes are checked before the run folder exists,
    utils.seed_everything(args.seed)  # so bad input leaves nothing behind
    net = build_model(args.model, **args.model_kwargs)
    for name, (images, _) in splits.items():
        check_size(net, images, name)
    run_dir, log = utils.start_run(args, rt, "outputs/part2")
    mean, std = datasets.channel_stats(splits["train"][0]) if ckpt is None else (ckpt["normalization"]["mean"], ckpt["normalization"]["std"])
    normalization = {"mean": mean, "std": std}
    common = dict(mean=mean, std=std, seed=args.seed, rank=rt.rank, world_size=rt.world_size)
    augment = None
    if args.augment == "scale_crop_flip_jitter":
        augment = lambda x, y, g, rows, total: datasets.random_scale_crop_flip_jitter(x, y, g, rows, total, crop=args.crop)  # noqa: E731
    train_loader = datasets.TensorLoader(*splits["train"], args.batch_size, train=True, augment=augment, **common)
    val_loader = datasets.TensorLoader(*splits["val"], args.eval_batch_size, train=False, **common)
    test_loader = datasets.TensorLoader(*splits["test"], args.eval_batch_size, train=False, **common)
    h, w = splits["test"][0].shape[-2:]
    flops = forward_flops(net, (1, 3, h, w))
    model, model_without_ddp = utils.prepare_model(net, rt, args.compile)
    loss_fn = make_loss(args.loss, splits["train"][1])
    extra = {"model_name": args.model, "model_kwargs": args.model_kwargs, "args": vars(args), "normalization": normalization,
             "class_names": datasets.FACADE_CLASSES, "task": "segmentation"}
    state = utils.build_train_state(model, model_without_ddp, args, train_loader, loss_fn, extra)
    log.info("model %s: %d parameters, %.1f GFLOP per %dx%d image; %d train / %d val / %d test images", args.model,
             count_parameters(model_without_ddp), flops / 1e9, w, h, *(len(splits[s][0]) for s in ("train", "val", "test")))
    ckpt_path, ckpt_epoch = utils.train_or_load(state, args, ckpt, rt, run_dir, train_loader, val_loader,
                                                best_key="val_loss", best_mode="min",
                                                make_metric=lambda: utils.ConfusionMatrix(NUM_CLASSES), log=log)
    results = utils.evaluate(model, test_loader, F.cross_entropy, rt, utils.PixelScores(NUM_CLASSES), desc="test")
    if rt.is_main:
        results.update(checkpoint=str(ckpt_path), checkpoint_epoch=ckpt_epoch, model=args.model,
                       parameters=count_parameters(model_without_ddp), gflops_per_image=flops / 1e9,
                       image_size=[int(h), int(w)], normalization=normalization)
        # rank 0 alone runs these forwards: the unwrapped model, since DDP may broadcast buffers in forward
        write_outputs(run_dir, results, (model_without_ddp, rt, splits["test"], normalization, args.num_examples), log)
    utils.close_logger(log)
    return results


def write_outputs(run_dir: Path, results: dict | None, example_inputs, log) -> dict:
    """results.json, figures, report.html; with results=None (--report-only) re-plot from saved files."""
    names = datasets.FACADE_CLASSES
    fig = run_dir / "figures"
    if results is None:
        if not (run_dir / "results.json").is_file():
            raise utils.UserError(f"{run_dir} has no results.json: not a finished Part 2 run folder")
        results = utils.read_json(run_dir / "results.json")
    else:
        results = {"mean_ap": results["mean_ap"], "ap": dict(zip(names, results["ap"])),
                   "mean_ap_softmax": results["mean_ap_softmax"], "ap_softmax": dict(zip(names, results["ap_softmax"])),
                   "pixel_accuracy": results["pixel_accuracy"], "miou": results["miou"], "iou": dict(zip(names, results["iou"])),
                   "test_loss": results["loss"], "test_images_per_s": results["images_per_s"],
                   "confusion_matrix": results["confusion_matrix"], "pr_curves": dict(zip(names, results["pr_curves"])),
                   **{k: results[k] for k in ("checkpoint", "checkpoint_epoch", "model", "parameters", "gflops_per_image",
                                              "image_size", "normalization")}}
        plot_predictions(*example_inputs, fig / "predictions.png")
    rows = utils.summarize_training(run_dir, results, "pixel accuracy")
    utils.write_json(run_dir / "results.json", results)
    utils.plot_bars(names, list(results["ap"].values()), fig / "per_class_ap.png", "average precision",
                    f"Per-class AP on test pixels (mean {results['mean_ap']:.4f})")
    utils.plot_confusion(results["confusion_matrix"], names, fig / "confusion_matrix.png", "Test pixel confusion (row-normalised)")
    plot_pr_curves(results.get("pr_curves", {}), fig / "pr_curves.png")
    summary = {"model": results["model"], "mean AP (raw scores)": f"{results['mean_ap']:.4f}",
               "mean AP (softmax)": f"{results['mean_ap_softmax']:.4f}", "mIoU": f"{results['miou']:.4f}",
               "pixel accuracy": f"{results['pixel_accuracy']:.4f}", "GFLOP per image": f"{results['gflops_per_image']:.1f}",
               "checkpoint": f"{results['checkpoint']} (epoch {results['checkpoint_epoch']})"}
    if rows:
        summary.update({"epochs": results["epochs_trained"], "training time": f"{results['train_time_s']:.0f} s"})
    table = [[n, f"{results['ap'][n]:.4f}", f"{results['ap_softmax'][n]:.4f}", f"{results['iou'][n]:.4f}"] for n in names]
    report = utils.write_report(run_dir, "Part 2: facade semantic segmentation", summary,
                                [("Per-class results on test pixels", ["class", "AP", "AP (softmax)", "IoU"], table)], FIGURES)
    lines = [f"{n}: AP = {results['ap'][n]:.4f}" for n in names] + [f"Mean AP = {results['mean_ap']:.4f}", f"Report: {report}"]
    (log.info if log else print)("\n".join(lines))
    return results


@torch.inference_mode()
def predict_logits(model, rt, x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Logits for normalised images of any size: reflect-pad to a multiple of ``multiple``, crop back."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    padded = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
    model.eval()
    with rt.autocast():
        logits = model(rt.to_input(padded))
    return logits.float()[..., :h, :w]


def plot_predictions(model, rt, test_split, normalization, count: int, path: Path) -> None:
    """image | ground truth | prediction for ``count`` evenly spaced (fixed) test images."""
    images, labels = test_split
    picks = torch.linspace(0, len(images) - 1, min(count, len(images))).long().tolist()
    x = datasets.normalize(images[picks], normalization["mean"], normalization["std"])
    preds = predict_logits(model, rt, x, model.size_multiple).argmax(1).cpu()
    tiles, titles = [], []
    for k, i in enumerate(picks):
        tiles += [images[i].permute(1, 2, 0).cpu().numpy(), datasets.colorize(labels[i].cpu()), datasets.colorize(preds[k])]
        titles += [f"test image {i}", "ground truth", "prediction"]
    utils.plot_image_grid(tiles, titles, path, cols=3, title="Test predictions")


def plot_pr_curves(curves: dict, path: Path) -> None:
    """Precision-recall curve per class over all test pixels (raw scores), from PixelScores' curves."""
    plt = utils._plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for c, name in enumerate(datasets.FACADE_CLASSES):
        if curves.get(name):
            color = np.array(datasets.FACADE_PALETTE[c]) / 255 if c else "gray"
            ax.plot(curves[name]["recall"], curves[name]["precision"], label=name, color=color)
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall per class (test pixels)", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    utils.save_figure(fig, path)


def predict(argv) -> int:
    """The ``predict`` subcommand; returns the exit code (1 if any image failed, after doing the rest)."""
    args = get_predict_parser().parse_args(argv)
    ckpt = utils.load_checkpoint(args.checkpoint, task="segmentation")
    args.amp, args.amp_dtype, args.channels_last, args.threads = False, "bf16", False, None
    rt = utils.setup_runtime(args)
    model = build_model(ckpt["model_name"], **ckpt["model_kwargs"]).to(rt.device)
    model.load_state_dict(ckpt["model"])
    out_dir = Path(args.output_dir)
    failures = 0
    for image_path in map(Path, args.images):
        try:
            rgb = datasets.read_rgb(image_path)
        except utils.UserError as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
            continue
        mask = segment_image(model, rt, rgb, ckpt["normalization"], args.max_size)
        color = datasets.colorize(mask)
        overlay = (0.5 * rgb + 0.5 * color).astype(np.uint8)
        for suffix, array in (("mask", color), ("overlay", overlay)):
            target = out_dir / f"{image_path.stem}_{suffix}.png"
            with utils.atomic_path(target) as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
        print(f"{image_path} -> {out_dir / image_path.stem}_mask.png, _overlay.png")
    return 1 if failures else 0


def segment_image(model, rt, rgb: np.ndarray, normalization: dict, max_size: int) -> torch.Tensor:
    """Class mask (H, W) for one RGB array of any size."""
    x = datasets.normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None].to(rt.device), normalization["mean"], normalization["std"])
    h, w = x.shape[-2:]
    scale = min(1.0, max_size / max(h, w))
    if scale < 1:
        x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear", align_corners=False)
    logits = predict_logits(model, rt, x, model.size_multiple)
    if scale < 1:
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].cpu()


def cli(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        try:
            sys.exit(predict(argv[1:]))
        except utils.UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    utils.run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    cli()
