"""Command-line flags shared by both scripts: the parser, value checks at parse time, the recipe
defaults, and the rule that a resumed run keeps its checkpoint's arguments.

Flags that change what a run means (data, split, seed, model, recipe, precision) default to
``None`` in the parser, so that "not given" can be told from "given": ``resolve_args`` then fills
them from the checkpoint (``--resume``) or from the defaults and the model's recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import allocator
import hardware
import runfiles
import settings
import utils
from utils import UserError

# Which flags may differ on --resume and on --eval-only: one table, a reason per flag.
RESUME_FREE, EVAL_FREE = settings.free_on_resume(), settings.free_on_eval_only()
COMMON_DEFAULTS = {"seed": 0, "sync_bn": False, "val_every": 1, "ema": 0.0}


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
EMA_DECAY = float_in(0, 1, high_open=True)  # 1 would never move


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
    r.add_argument(
        "--ema",
        type=EMA_DECAY,
        metavar="D",
        help="validate, select and test an exponential moving average of the weights, updated "
        "every step with decay D (e.g. 0.999: about the last 1000 steps); 0: off (default: 0)",
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
        help="autocast dtype, and autocast on when given alone; fp16 uses a gradient scaler "
        "(on the CPU it is emulated and slow: it is there to check the fp16 path of GPUs "
        "without bf16; default: bf16)",
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
        if ckpt["epoch"] >= args.epochs:
            raise UserError(
                f"{args.resume} has trained all {args.epochs} epochs: nothing to resume "
                "(--eval-only tests it; a constant schedule can grow with a larger --epochs)"
            )
    if args.eval_only:  # args.json describes the checkpoint's run (seed, recipe, model)
        adopt_checkpoint_args(args, ckpt["args"], free=EVAL_FREE, why="it was trained with it")
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


def resolve(args: argparse.Namespace, *, task: str, defaults: dict, recipes: dict):
    """The checkpoint of --resume / --eval-only (or None), and every flag filled in."""
    ckpt_path = args.resume or args.eval_only
    ckpt = runfiles.load_checkpoint(ckpt_path, task=task) if ckpt_path else None
    resolve_args(args, defaults=defaults, recipes=recipes, ckpt=ckpt)
    return ckpt


def runtime(args: argparse.Namespace, ckpt: dict | None, *, batch_splits: bool):
    """The settled settings (settings.settle) applied, seeded per rank (different dropout masks
    and random draws on each rank; DDP keeps the weights in step). A resumed run keeps its
    checkpoint's precision; --eval-only tests in it unless a precision flag is given.
    ``batch_splits``: whether the model and loss allow micro-batches (settings.settle)."""
    fixed = False
    if ckpt is not None and (args.resume or (args.amp is None and args.amp_dtype is None)):
        fixed = settings.saved_precision(ckpt["args"], ckpt.get("scaler") or {})
    hw = hardware.read_hardware()
    effective = settings.settle(
        hw,
        device=args.device,
        model=args.model,
        amp=args.amp,
        amp_dtype=args.amp_dtype,
        channels_last=args.channels_last,
        micro_batch=args.micro_batch,
        batch_splits=batch_splits,
        fixed_precision=fixed,
        allocator=allocator.keep_freed_memory(),
    )
    rt = utils.setup_runtime(effective, threads=args.threads, progress=not args.no_progress, hw=hw)
    utils.seed_everything(args.seed + rt.rank)
    return rt
