"""``part2_segment.py predict``: segment photos of any size with a trained Part 2 checkpoint.
Writes NAME_mask.png (the dataset's class colours) and NAME_overlay.png for every image. Also
the prediction figure of a Part 2 run (``plot_predictions``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cli
import datasets
import models
import report
import runfiles
import utils


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="part2_segment.py predict",
        description="Segment images with a trained checkpoint: writes "
        "NAME_mask.png and NAME_overlay.png per image.",
    )
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files of any size (jpg, png, ...)"
    )
    parser.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="checkpoint of a Part 2 training run"
    )
    parser.add_argument(
        "--output-dir",
        default="outputs/predict",
        metavar="DIR",
        help="where to write (default: outputs/predict)",
    )
    parser.add_argument(
        "--max-size",
        type=cli.POSITIVE_INT,
        default=1024,
        metavar="PX",
        help="larger images are downscaled to this longer side for the network "
        "and the scores upsampled back to full size (default: 1024)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="auto = CUDA, else Apple's MPS, else the CPU (default: auto)",
    )
    return parser


def main(args) -> int:
    """Returns the exit code: 1 if any image failed (after doing the others), else 0."""
    ckpt = runfiles.load_checkpoint(args.checkpoint, task="segmentation")
    model = models.from_checkpoint(ckpt)
    if args.max_size < model.size_multiple:
        raise utils.UserError(
            f"--max-size {args.max_size} is below {model.size_multiple}, the "
            f"smallest side {ckpt['model_name']} accepts"
        )
    rt = utils.settled_runtime(device=args.device, model=ckpt["model_name"])  # the policy's
    model = model.to(rt.device)
    failures = 0
    for image_path, name in zip(map(Path, args.images), output_names(args.images)):
        try:
            rgb = datasets.read_rgb(image_path)
            mask = segment_image(model, rt, rgb, ckpt["normalization"], args.max_size)
        except (utils.UserError, RuntimeError, MemoryError) as err:  # too large, unreadable
            print(f"error: {image_path}: {str(err).splitlines()[0][:200]}", file=sys.stderr)
            failures += 1
            continue
        color = datasets.colorize(mask)
        overlay = (0.5 * rgb + 0.5 * color).astype(np.uint8)
        for suffix, array in (("mask", color), ("overlay", overlay)):
            with runfiles.atomic_path(Path(args.output_dir) / f"{name}_{suffix}.png") as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
        print(f"{image_path} -> {Path(args.output_dir) / name}_mask.png, _overlay.png")
    return 1 if failures else 0


def output_names(paths: list[str]) -> list[str]:
    """Each input's output name: its stem, or (when stems repeat, as for a/x.jpg and b/x.jpg)
    its path below the inputs' common folder with '__' for '/', so no output overwrites
    another."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    resolved = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    return ["__".join(p.relative_to(common).with_suffix("").parts) for p in resolved]


@torch.inference_mode()
def predict_logits(model, rt: utils.Runtime, x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Logits for normalised images of any size: reflect-pad to a multiple of ``multiple``,
    crop back."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    mode = "reflect" if min(h, w) > max(pad_h, pad_w) else "replicate"
    padded = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    model.eval()
    with rt.autocast():
        logits = model(rt.to_input(padded))
    return logits.float()[..., :h, :w]


def segment_image(
    model, rt: utils.Runtime, rgb: np.ndarray, normalization: dict, max_size: int
) -> torch.Tensor:
    """Class mask (H, W) for one RGB array of any size."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(rt.device)
    x = datasets.normalize(x, normalization["mean"], normalization["std"])
    h, w = x.shape[-2:]
    scale = min(1.0, max_size / max(h, w))
    if scale < 1:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    logits = predict_logits(model, rt, x, model.size_multiple)
    if scale < 1:
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].cpu()


def plot_predictions(model, rt, test_split, normalization, count: int, path: Path) -> None:
    """image | ground truth | prediction for ``count`` evenly spaced (fixed) test images, two
    to a row, with the class colours' key under them."""
    images, labels = test_split
    picks = torch.linspace(0, len(images) - 1, min(count, len(images))).long().tolist()
    x = datasets.normalize(images[picks], normalization["mean"], normalization["std"])
    preds = predict_logits(model, rt, x, model.size_multiple).argmax(1).cpu()
    tiles, titles = [], []
    for k, i in enumerate(picks):
        tiles += [
            images[i].permute(1, 2, 0).cpu().numpy(),
            datasets.colorize(labels[i].cpu()),
            datasets.colorize(preds[k]),
        ]
        titles += [f"test image {i}", f"image {i}: ground truth", f"image {i}: prediction"]
    report.plot_image_grid(
        tiles,
        titles,
        path,
        cols=6 if len(picks) > 1 else 3,
        tile=1.9,
        title="Test predictions",
        legend=list(zip(datasets.FACADE_CLASSES, datasets.FACADE_PALETTE)),
    )
