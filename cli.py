"""Command-line flags shared by both scripts: the parser, value checks at parse time, the recipe
defaults, and the rule that a resumed run keeps its checkpoint's arguments.

Flags that change what a run means (data, split, seed, model, recipe, precision) default to
``None`` in the parser, so that "not given" can be told from "given": ``resolve_args`` then fills
them from the checkpoint (``--resume``) or from the defaults and the model's recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import runfiles
import utils
from utils import UserError

# Flags that may differ on --resume: they cannot change the result (speed, where and how much
# to run now, outputs). --epochs is checked on its own (only a constant schedule can grow).
RESUME_FREE = {
    "device",
    "threads",
    "no_progress",
    "time_limit",
    "stop_after_epochs",
    "eval_batch_size",
    "compile",
    "channels_last",
    "micro_batch",
    "output_dir",
    "resume",
    "eval_only",
    "report_only",
    "num_examples",
    "no_download",
    "epochs",
    "val_ap_every",
    "tta",  # a test-time switch: training is the same with or without it
}
# --eval-only may also test in another precision, on other test data or images it finds elsewhere.
EVAL_FREE = (RESUME_FREE - {"epochs"}) | {
    "amp",
    "amp_dtype",
    "data",
    "data_root",
    "test_range",
    "no_download",
}
# --amp is left unset here: the runtime turns it on where the hardware computes bf16 natively.
COMMON_DEFAULTS = {"seed": 0, "amp_dtype": "bf16", "sync_bn": False, "val_every": 1}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ...`` on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(
    low: float, high: float = float("inf"), *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A float in [low, high], with either end open; nan is refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if value != value or too_low or too_high:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_INT, NONNEG_INT = int_at_least(1), int_at_least(0)
POSITIVE_FLOAT, NONNEG_FLOAT = float_in(0, low_open=True), float_in(0)


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    models: list[str],
    default_model: str,
    eval_batch_size: int | None,
    output_root: str,
    eval_batch_help: str | None = None,
) -> None:
    """Training, recipe, runtime and output flags shared by both scripts."""
    g = parser.add_argument_group("training")
    g.add_argument("--model", choices=sorted(models), help=f"network (default: {default_model})")
    g.add_argument(
        "--seed",
        type=NONNEG_INT,
        metavar="N",
        help="seeds the split, initialisation, shuffling and augmentation (default: 0)",
    )
    g.add_argument(
        "--eval-batch-size",
        type=POSITIVE_INT,
        default=eval_batch_size,
        metavar="N",
        help=f"batch size for validation and test (default: {eval_batch_help or eval_batch_size})",
    )
    g.add_argument(
        "--max-steps",
        type=POSITIVE_INT,
        metavar="N",
        help="at most N steps per epoch (smoke tests; default: full epochs)",
    )
    g.add_argument(
        "--stop-after-epochs",
        type=POSITIVE_INT,
        metavar="N",
        help="end this invocation after N epochs, keeping the schedule of --epochs "
        "(time-boxed jobs; continue with --resume)",
    )
    g.add_argument(
        "--val-every",
        type=POSITIVE_INT,
        metavar="N",
        help="validate every N epochs and at the last; the best epoch is chosen among the "
        "validated ones (saves compute where the schedule ends at its best; default: 1)",
    )
    g.add_argument(
        "--time-limit",
        type=POSITIVE_FLOAT,
        metavar="MIN",
        help="stop after the epoch that passes MIN minutes, then test the best epoch",
    )
    r = parser.add_argument_group("recipe (default: per model, see RECIPES in the script)")
    r.add_argument("--epochs", type=POSITIVE_INT, metavar="N", help="epochs to train")
    r.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        metavar="N",
        help="training batch per process; global batch = N x processes",
    )
    r.add_argument("--lr", type=POSITIVE_FLOAT, metavar="LR", help="peak learning rate")
    r.add_argument("--weight-decay", type=NONNEG_FLOAT, metavar="WD", help="weight decay")
    r.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help="optimiser")
    r.add_argument(
        "--schedule",
        choices=["constant", "cosine", "linear"],
        help="learning-rate schedule after the warm-up, stepped every batch",
    )
    r.add_argument(
        "--warmup-epochs", type=NONNEG_FLOAT, metavar="E", help="linear warm-up length in epochs"
    )
    u = parser.add_argument_group("runtime")
    u.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="auto = CUDA, else Apple's MPS, else the CPU (default: auto)",
    )
    u.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="bf16 mixed precision (autocast) for the forward pass and loss; metrics are "
        "always computed from fp32 scores (default: on where the hardware computes bf16 "
        "natively: CUDA compute capability >= 8.0, CPUs with AVX512-BF16 or AMX; fp32 "
        "elsewhere, where bf16 would be emulated and slow; --no-amp: fp32)",
    )
    u.add_argument(
        "--amp-dtype",
        choices=["bf16", "fp16"],
        help="autocast dtype; fp16 needs CUDA and uses a gradient scaler (default: bf16)",
    )
    u.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels-last memory format for model and inputs; the same numbers within "
        "rounding (default: where measured faster for the model on this kind of device; "
        "the run's first log line says what was chosen and why)",
    )
    u.add_argument(
        "--micro-batch",
        type=NONNEG_INT,
        metavar="N",
        help="compute each training batch N images at a time with accumulated gradients: the "
        "same gradient for plain cross-entropy without batch norm (otherwise the batch is taken "
        "whole); 0: whole batches (default: where measured faster, e.g. 1 for facade_fcn on a "
        "CPU without AVX-512)",
    )
    u.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (the first epoch pays the compile time)",
    )
    u.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        help="under torchrun on CUDA, BatchNorm statistics over the global batch "
        "(default: per process)",
    )
    u.add_argument(
        "--threads",
        type=POSITIVE_INT,
        metavar="N",
        help="CPU threads for PyTorch (default: torch's choice)",
    )
    u.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    o = parser.add_argument_group("outputs")
    o.add_argument(
        "--output-dir",
        metavar="DIR",
        help=f"run folder; must not hold another run (default: a new "
        f"{output_root}/<time>-<model>; --resume: the checkpoint's run folder; "
        "--eval-only: a new RUN/eval-<time>)",
    )
    o.add_argument(
        "--resume",
        metavar="CKPT",
        help="continue the run of a checkpoint (RUN/checkpoints/last.pt) with its "
        "arguments; only speed, device and time flags may differ",
    )
    o.add_argument(
        "--eval-only",
        metavar="CKPT",
        help="test a checkpoint and write the results into a new folder, no training",
    )
    o.add_argument(
        "--report-only",
        metavar="RUN_DIR",
        help="rebuild the figures and report.html of a finished run folder",
    )


def resolve_args(
    args: argparse.Namespace, *, defaults: dict, recipes: dict, ckpt: dict | None
) -> None:
    """Fill the flags left unset: from the checkpoint on --resume and --eval-only (a different
    value given for a flag that describes the checkpoint's run is refused), then from the
    defaults and the model's recipe."""
    if args.resume and args.eval_only:
        raise UserError("give --resume or --eval-only, not both")
    if ckpt is not None:
        if args.model is not None and args.model != ckpt["model_name"]:
            raise UserError(
                f"--model {args.model} differs from the checkpoint's {ckpt['model_name']}"
            )
        args.model = ckpt["model_name"]
    if args.resume:
        adopt_checkpoint_args(args, ckpt["args"])
        adopt_checkpoint_epochs(args, ckpt["args"])
    if args.eval_only:  # args.json describes the checkpoint's run (seed, recipe, model)
        adopt_checkpoint_args(args, ckpt["args"], free=EVAL_FREE, why="it was trained with it")
        if args.amp is None:  # test in the checkpoint's precision unless told
            args.amp = bool(ckpt["args"].get("amp"))
    if ckpt is not None:  # the network is built from these, whatever the saved args say
        built = {k: v for k, v in ckpt["model_kwargs"].items() if k != "num_classes"}
        adopt_checkpoint_args(args, built, free=frozenset(), why="its network has it")
    model = args.model or defaults["model"]
    for key, value in {**COMMON_DEFAULTS, **defaults, **recipes[model]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def adopt_checkpoint_args(
    args: argparse.Namespace,
    saved: dict,
    free: frozenset | set = RESUME_FREE,
    why: str = "a resumed run keeps its arguments (start a new run to change it)",
) -> None:
    """Take the checkpoint's value of every flag but those in ``free``; a different value given
    is a one-line error."""
    for key, value in saved.items():
        if key in free or not hasattr(args, key):
            continue
        given = getattr(args, key)
        if given is not None and _normal(given) != _normal(value):
            raise UserError(
                f"--{key.replace('_', '-')} {_show(given)} differs from the "
                f"checkpoint's {_show(value)}: {why}"
            )
        setattr(args, key, value)


def adopt_checkpoint_epochs(args: argparse.Namespace, saved: dict) -> None:
    """On --resume, --epochs may differ only by growing a constant schedule."""
    if args.epochs is None or args.epochs == saved["epochs"]:
        args.epochs = saved["epochs"]
    elif saved["schedule"] != "constant" or args.epochs < saved["epochs"]:
        raise UserError(
            f"--epochs {args.epochs} differs from the checkpoint's {saved['epochs']}: "
            f"its {saved['schedule']} schedule was planned for {saved['epochs']} "
            "epochs (only a constant schedule can be extended)"
        )


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def main_parser(description: str) -> Parser:
    return Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def start(args: argparse.Namespace, *, task: str, defaults: dict, recipes: dict):
    """The first steps of both scripts: the checkpoint of --resume / --eval-only, the resolved
    flags, then the runtime they ask for, seeded per rank (different dropout masks and random
    draws on each rank; DDP keeps the weights in step). Returns (checkpoint or None, runtime)."""
    ckpt_path = args.resume or args.eval_only
    ckpt = runfiles.load_checkpoint(ckpt_path, task=task) if ckpt_path else None
    resolve_args(args, defaults=defaults, recipes=recipes, ckpt=ckpt)
    rt = utils.setup_runtime(
        device=args.device,
        model=args.model,
        amp=args.amp,
        amp_dtype=args.amp_dtype,
        channels_last=args.channels_last,
        micro_batch=args.micro_batch,
        threads=args.threads,
        progress=not args.no_progress,
    )
    args.amp = rt.amp_dtype is not None  # args.json records what the policy chose
    args.channels_last = rt.channels_last  # the training layout (evaluation's is logged)
    args.micro_batch = rt.micro_batch or 0
    utils.seed_everything(args.seed + rt.rank)
    return ckpt, rt
