"""Part 1: Fashion-MNIST classification.

    python part1_classify.py                                  # reference sigmoid CNN, tuned recipe
    python part1_classify.py --model fashion_net              # improved model
    python part1_classify.py --eval-only RUN/checkpoints/best.pt
    torchrun --standalone --nproc_per_node=2 part1_classify.py --batch-size 250
    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 part1_classify.py

Writes one run folder: args.json, log.txt, metrics.csv, results.json, report.html, figures/*.png,
checkpoints/{last,best}.pt.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import datasets
import utils
from models import build_model, count_parameters, models_for

# Per-model training recipes: flags left unset take these values.
RECIPES = {
    # Reference batch and optimiser; a 10x higher peak LR with warm-up and cosine decay is what lets the
    # sigmoid network train (Adam 1e-3 for 10 epochs: 79.8%). Augmentation only slows it at this size.
    "sigmoid_cnn": dict(epochs=30, batch_size=500, lr=1e-2, weight_decay=0.0, optimizer="adam", schedule="cosine",
                        warmup_epochs=1, label_smoothing=0.0, augment="none"),
    "fashion_net": dict(epochs=40, batch_size=128, lr=2e-3, weight_decay=5e-2, optimizer="adamw", schedule="cosine",
                        warmup_epochs=1, label_smoothing=0.1, augment="translate_flip"),
}
AUGMENTATIONS = {"none": None, "translate_flip": datasets.random_translate_flip}
FIGURES = ["figures/accuracy_curve.png", "figures/loss_curve.png", "figures/per_class_accuracy.png",
           "figures/confusion_matrix.png", "figures/correct_examples.png", "figures/incorrect_examples.png",
           "figures/conv1_filters.png", "figures/conv2_filters.png"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train and evaluate a Fashion-MNIST classifier (Part 1).",
                                     add_help=add_help)
    d = parser.add_argument_group("data")
    d.add_argument("--data-root", default="data/fashion-mnist", metavar="DIR",
                   help="folder with the four Fashion-MNIST IDX files, .gz or raw (default: data/fashion-mnist)")
    d.add_argument("--no-download", action="store_true", help="never try to download missing files")
    d.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of the training images held out for validation (default: 0.2)")
    d.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="use only the first N of the 60,000 training images (before the split)")
    d.add_argument("--augment", default=None, choices=sorted(AUGMENTATIONS),
                   help="training augmentation (default: per model; translate_flip = shift <=2 px + left-right flip)")
    utils.add_common_args(parser, epochs=None, batch_size=None, lr=None, weight_decay=None, eval_batch_size=2000,
                          model="sigmoid_cnn", models=models_for("classification"), output_root="outputs/part1")
    r = parser.add_argument_group("recipe (default: per model, see RECIPES in this file)")
    r.add_argument("--optimizer", default=None, choices=["adam", "adamw", "sgd"], help="optimiser")
    r.add_argument("--schedule", default=None, choices=["constant", "cosine", "linear"],
                   help="learning-rate schedule after warm-up, stepped every batch")
    r.add_argument("--warmup-epochs", type=float, default=None, metavar="E", help="linear warm-up length in epochs")
    r.add_argument("--label-smoothing", type=float, default=None, metavar="S", help="cross-entropy label smoothing")
    return parser


def apply_recipe(args, ckpt: dict | None = None) -> None:
    for key, value in RECIPES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 <= args.val_fraction < 1:
        raise utils.UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")


def load_data(args, rt: utils.Runtime):
    """Train/val/test uint8 tensors on the device, plus the normalisation from the training split."""
    root = Path(args.data_root)
    if rt.is_main:
        root = datasets.locate_fashion_mnist(root, download=not args.no_download, log=print)
    if rt.distributed:  # rank 0 may have downloaded; the others then read what it found
        torch.distributed.barrier()
        root = datasets.locate_fashion_mnist(Path(args.data_root), download=False, log=lambda *_: None)
    train_x, train_y = datasets.load_fashion_split(root, "train")
    test_x, test_y = datasets.load_fashion_split(root, "test")
    if args.train_limit:
        train_x, train_y = train_x[: args.train_limit], train_y[: args.train_limit]
    train_idx, val_idx = datasets.split_train_val(len(train_x), args.val_fraction, args.seed)
    if len(train_idx) == 0:
        raise utils.UserError("no training images left after the split (raise --train-limit or lower --val-fraction)")
    mean, std = datasets.channel_stats(train_x[train_idx])
    on = lambda t: t.to(rt.device)  # noqa: E731 - the whole set fits in device memory
    splits = {"train": (on(train_x[train_idx]), on(train_y[train_idx])),
              "val": (on(train_x[val_idx]), on(train_y[val_idx])), "test": (on(test_x), on(test_y))}
    return splits, {"mean": mean, "std": std}


def build_loaders(args, rt, splits, normalization):
    common = dict(mean=normalization["mean"], std=normalization["std"], seed=args.seed, rank=rt.rank, world_size=rt.world_size)
    train = datasets.TensorLoader(*splits["train"], args.batch_size, train=True, augment=AUGMENTATIONS[args.augment], **common)
    val = datasets.TensorLoader(*splits["val"], args.eval_batch_size, train=False, **common)
    test = datasets.TensorLoader(*splits["test"], args.eval_batch_size, train=False, **common)
    return train, val, test


def main(args) -> dict | None:
    if args.report_only:
        return write_outputs(Path(args.report_only), None, None, None, None)
    return utils.run_task(args, "classification", apply_recipe, run)


def run(args, rt: utils.Runtime, ckpt: dict | None) -> dict | None:
    splits, normalization = load_data(args, rt)  # before the run folder: bad data leaves nothing behind
    run_dir, log = utils.start_run(args, rt, "outputs/part1")
    utils.seed_everything(args.seed)
    if ckpt is not None:
        normalization = ckpt["normalization"]
    train_loader, val_loader, test_loader = build_loaders(args, rt, splits, normalization)
    model, model_without_ddp = utils.prepare_model(build_model(args.model, num_classes=10), rt, args.compile)
    loss_fn = lambda logits, y: F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)  # noqa: E731
    extra = {"model_name": args.model, "model_kwargs": {"num_classes": 10}, "args": vars(args),
             "normalization": normalization, "class_names": datasets.FASHION_CLASSES, "task": "classification"}
    state = utils.build_train_state(model, model_without_ddp, args, train_loader, loss_fn, extra)
    log.info("model %s: %d parameters; %d train / %d val / %d test images", args.model,
             count_parameters(model_without_ddp), len(splits["train"][0]), len(splits["val"][0]), len(splits["test"][0]))
    ckpt_path, ckpt_epoch = utils.train_or_load(state, args, ckpt, rt, run_dir, train_loader, val_loader,
                                                best_key="val_accuracy", best_mode="max",
                                                make_metric=lambda: utils.ConfusionMatrix(10), log=log)
    results = test_and_collect(model, test_loader, loss_fn, rt)
    if rt.is_main:
        results.update(checkpoint=str(ckpt_path), checkpoint_epoch=ckpt_epoch, model=args.model,
                       parameters=count_parameters(model_without_ddp), normalization=normalization)
        write_outputs(run_dir, results, model_without_ddp, splits["test"], log)
    utils.close_logger(log)
    return results


def test_and_collect(model, loader, loss_fn, rt) -> dict:
    """Test metrics (exact across ranks) plus every test prediction in dataset order."""
    preds = []
    metrics = utils.evaluate(model, loader, loss_fn, rt, utils.ConfusionMatrix(10), desc="test",
                             on_batch=lambda x, y, logits: preds.append(logits.argmax(1)))
    local = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=rt.device)
    metrics["predictions"] = utils.gather_in_dataset_order(local, len(loader.images), rt).cpu()
    return metrics


def write_outputs(run_dir: Path, results: dict | None, model, test_split, log) -> dict:
    """results.json, figures and report.html. With results=None (--report-only) the saved
    results.json / metrics.csv are re-plotted and the report rebuilt; example and filter figures are kept."""
    names = datasets.FASHION_CLASSES
    fig = run_dir / "figures"
    if results is None:
        if not (run_dir / "results.json").is_file():
            raise utils.UserError(f"{run_dir} has no results.json: not a finished Part 1 run folder")
        results = utils.read_json(run_dir / "results.json")
    else:
        predictions = results.pop("predictions")
        results = {"test_accuracy": results["accuracy"], "mean_per_class_accuracy": results["mean_per_class_accuracy"],
                   "per_class_accuracy": dict(zip(names, results["per_class_accuracy"])), "test_loss": results["loss"],
                   "confusion_matrix": results["confusion_matrix"],
                   **{k: results[k] for k in ("checkpoint", "checkpoint_epoch", "model", "parameters", "normalization")}}
        plot_examples(test_split, predictions, fig)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][:2]
        for k, conv in enumerate(convs, 1):
            utils.plot_filters(conv.weight, fig / f"conv{k}_filters.png",
                               f"conv{k} filters ({conv.out_channels} x {conv.in_channels} of {conv.kernel_size[0]}x{conv.kernel_size[1]})")
    rows = utils.summarize_training(run_dir, results, "accuracy")
    utils.write_json(run_dir / "results.json", results)
    per_class = list(results["per_class_accuracy"].items())
    utils.plot_bars([n for n, _ in per_class], [v for _, v in per_class], fig / "per_class_accuracy.png",
                    "test accuracy", "Per-class test accuracy")
    utils.plot_confusion(results["confusion_matrix"], names, fig / "confusion_matrix.png", "Test confusion matrix (row-normalised)")
    summary = {"model": results["model"], "test accuracy": f"{results['test_accuracy']:.4f}",
               "mean per-class accuracy": f"{results['mean_per_class_accuracy']:.4f}",
               "checkpoint": f"{results['checkpoint']} (epoch {results['checkpoint_epoch']})"}
    if rows:
        summary.update({"epochs": results["epochs_trained"], "training time": f"{results['train_time_s']:.0f} s",
                        "training images/s": f"{results['train_images_per_s']:.0f}"})
    report = utils.write_report(run_dir, "Part 1: Fashion-MNIST classification", summary,
                                [("Per-class test accuracy", ["class", "accuracy"], [[n, f"{v:.1%}"] for n, v in per_class])], FIGURES)
    lines = [f"{n} = {100 * v:.1f}%" for n, v in per_class] + [f"Mean per-class accuracy = {100 * results['mean_per_class_accuracy']:.2f}%",
                                                             f"Test accuracy = {100 * results['test_accuracy']:.2f}%", f"Report: {report}"]
    (log.info if log else print)("\n".join(lines))
    return results


def plot_examples(test_split, predictions: torch.Tensor, fig_dir: Path, per_class: int = 2) -> None:
    """Two correctly and two wrongly classified test images of every class, titled true/predicted."""
    images, labels = test_split[0].cpu(), test_split[1].cpu()
    names = datasets.FASHION_CLASSES
    for kind, want_correct in (("correct", True), ("incorrect", False)):
        picks = []
        for c in range(len(names)):
            mask = (labels == c) & ((predictions == labels) == want_correct)
            picks.extend(torch.nonzero(mask).flatten()[:per_class].tolist())
        titles = [f"true: {names[labels[i]]}\npred: {names[predictions[i]]}" for i in picks]
        utils.plot_image_grid([images[i, 0].numpy() for i in picks], titles, fig_dir / f"{kind}_examples.png", cols=4,
                              title=f"{kind.capitalize()} test examples ({per_class} per class)", cmap="gray",
                              title_colors=["green" if want_correct else "red"] * len(picks))


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
