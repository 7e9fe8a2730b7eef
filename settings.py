"""One place settles a run's settings.

- ``FLAGS``: per flag, whether it may differ on ``--resume`` and on ``--eval-only``, and what it
  is to ``compare.py`` (part of the recipe, a measured condition, or ignored), with the reason.
- ``settle``: the flags a user gave (None: "let the policy choose"), the machine's facts and,
  on ``--resume`` / ``--eval-only``, the checkpoint's effective settings go in; the effective
  settings come out (device, precision and gradient scaler, memory format, micro-batch,
  allocator), each with its reason. ``args.json`` keeps the flags as given and the effective
  settings apart, under ``effective``; resume, eval-only, predict, the benchmark and compare
  read the effective ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import hardware
from errors import UserError

RECIPE, MEASURED, IGNORED = "recipe", "measured", "ignored"


@dataclass(frozen=True)
class Rule:
    resume: bool  # may differ from the checkpoint's args.json on --resume
    eval_only: bool  # may differ from it on --eval-only
    compare: str  # RECIPE: defines what is trained; MEASURED: changes what was measured
    why: str


def _speed(why: str) -> Rule:
    return Rule(True, True, IGNORED, why)


FLAGS = {
    "device": _speed("where a run computes; the precision it trains in is kept"),
    "threads": _speed("CPU threads: speed only"),
    "no_progress": _speed("progress bars: output only"),
    "compile": _speed("torch.compile: the same network, faster"),
    "channels_last": _speed("memory format: the same numbers within rounding"),
    "micro_batch": _speed("chunks of a batch: the same gradient where it is used"),
    "eval_batch_size": _speed("evaluation batch: exact sums, the same numbers"),
    "output_dir": _speed("where the files go"),
    "resume": _speed("the checkpoint to continue"),
    "eval_only": _speed("the checkpoint to test (eval-only folders group apart)"),
    "report_only": _speed("rebuilds a report"),
    "num_examples": _speed("images in a figure"),
    "no_download": _speed("where the data comes from, not what it is"),
    "val_ap_every": _speed("an extra validation column; the selection does not use it"),
    "stop_after_epochs": _speed(
        "ends one invocation; the run chooses from the same epochs and counts the same compute"
    ),
    "epochs": Rule(True, False, RECIPE, "the schedule's length (only a constant one can grow)"),
    "time_limit": Rule(True, True, IGNORED, "a stop; the epochs it trained count instead"),
    "tta": Rule(True, True, MEASURED, "test-time flips change the test numbers, not training"),
    "tta_scales": Rule(True, True, MEASURED, "as tta: the scales of its views"),
    "eval_on": Rule(True, True, MEASURED, "which images --eval-only tests"),
    # Held to the checkpoint's effective precision by settle, not to the flags it was given;
    # compare groups by the effective precision.
    "amp": Rule(True, True, IGNORED, "a resumed run keeps the precision it trained in"),
    "amp_dtype": Rule(True, True, IGNORED, "as amp"),
    "data": Rule(False, True, RECIPE, "eval-only may test other data of the same kind"),
    "data_root": Rule(False, True, RECIPE, "as data"),
    "test_range": Rule(False, True, MEASURED, "which images are tested"),
}
# Every other flag (model, seed, recipe, split, augmentation, ...) is fixed on --resume and
# --eval-only and defines the recipe: it changes what is trained.


def free_on_resume() -> frozenset[str]:
    return frozenset(k for k, r in FLAGS.items() if r.resume)


def free_on_eval_only() -> frozenset[str]:
    return frozenset(k for k, r in FLAGS.items() if r.eval_only)


# ----------------------------------------------------------------------------- effective
@dataclass(frozen=True)
class Effective:
    """What a run uses, each with its reason; ``asdict`` of it is args.json's ``effective``."""

    device: str  # "cpu", "cuda", "mps"
    amp_dtype: str | None  # "bf16", "fp16", None (fp32)
    channels_last: bool  # model and training inputs
    eval_channels_last: bool  # validation, test and figures
    micro_batch: int  # training batches in chunks of this many images; 0: whole
    allocator: str
    reasons: dict = field(default_factory=dict)  # device, precision, memory_format, micro_batch
    warnings: tuple[str, ...] = ()

    @property
    def scaler(self) -> bool:
        """fp16 needs a gradient scaler; bf16 and fp32 do not."""
        return self.amp_dtype == "fp16"

    def record(self) -> dict:
        return asdict(self) | {"scaler": self.scaler, "warnings": list(self.warnings)}


# fp32, the standard layout, whole batches: a Runtime made without settling (tests, tools).
PLAIN = Effective("cpu", None, False, False, 0, "")


def saved_precision(args: dict, scaler_state: dict | None = None) -> str | None:
    """The precision a saved run trained in: its ``effective`` record; in older folders, whose
    ``amp`` recorded the policy's choice, ``amp_dtype`` where amp was on. An older checkpoint
    (``scaler_state`` given) could say fp16 while bf16 ran: fp16 only with a saved scaler."""
    effective = args.get("effective")
    if isinstance(effective, dict) and "amp_dtype" in effective:
        return effective["amp_dtype"]
    if not args.get("amp"):
        return None
    if scaler_state is not None:
        return "fp16" if scaler_state else "bf16"
    return args.get("amp_dtype") or "bf16"


def requested_precision(amp: bool | None, amp_dtype: str | None) -> str | None | bool:
    """The precision the flags ask for: "bf16", "fp16", None (fp32, --no-amp), or False when
    they leave it to the policy. ``--amp-dtype fp16`` alone asks for fp16 autocast."""
    if amp is False:
        if amp_dtype is not None:
            raise UserError(f"--no-amp contradicts --amp-dtype {amp_dtype}")
        return None
    if amp is None and amp_dtype is None:
        return False
    return amp_dtype or "bf16"


def settle(
    hw: hardware.Hardware,
    *,
    device: str = "auto",
    model: str | None = None,
    amp: bool | None = None,
    amp_dtype: str | None = None,
    channels_last: bool | None = None,
    micro_batch: int | None = None,
    batch_splits: bool = True,
    fixed_precision: str | None | bool = False,
    allocator: str = "",
) -> Effective:
    """The effective settings for ``model`` on this machine. ``amp`` / ``amp_dtype`` /
    ``channels_last`` / ``micro_batch``: the flags (None: the policy chooses).
    ``batch_splits``: whether a batch computed in chunks gives the whole batch's gradient (no
    batch norm, an unweighted mean loss). ``fixed_precision``: the checkpoint's precision on
    --resume (a flag may only repeat it), False where none is fixed. Bad combinations raise
    ``UserError`` (one line for the user)."""
    kind, device_why = hardware.pick_device(device, hw)
    wanted = requested_precision(amp, amp_dtype)
    reasons = {"device": device_why}
    if fixed_precision is not False:
        if wanted is not False and wanted != fixed_precision:
            raise UserError(
                f"{precision_flags(wanted)} differs from the checkpoint's precision "
                f"({fixed_precision or 'fp32'}): a resumed run keeps the precision it trained in"
            )
        wanted = fixed_precision
    precision, reasons["precision"], warned = hardware.precision_choice(kind, hw, wanted)
    train_cl, eval_cl, reasons["memory_format"] = hardware.layout_choice(
        kind, hw, model, channels_last
    )
    chunk, reasons["micro_batch"] = hardware.micro_batch_choice(
        kind, hw, model, micro_batch, batch_splits
    )
    return Effective(
        device=kind,
        amp_dtype=precision,
        channels_last=train_cl,
        eval_channels_last=eval_cl,
        micro_batch=chunk,
        allocator=allocator,
        reasons=reasons,
        warnings=warned,
    )


def precision_flags(precision: str | None) -> str:
    return "--no-amp" if precision is None else f"--amp --amp-dtype {precision}"


def follow(own: Effective, leader: dict, rank: int, hw: hardware.Hardware) -> Effective:
    """Under torchrun: rank 0's settings (``leader``, its ``record()``) on this rank, which
    must be able to follow them: the same kind of device, and native bf16 where rank 0 chose
    bf16 by policy (emulated bf16 would hold every rank back many times over). Every rank
    settled the same flags, so bf16 there and not here means rank 0's policy chose it."""
    if leader["device"] != own.device:
        raise UserError(
            f"rank {rank} runs on {own.device} but rank 0 chose {leader['device']}: "
            "give every process the same kind of device (--device)"
        )
    if leader["amp_dtype"] == "bf16" and own.amp_dtype != "bf16":
        why = hardware.native_bf16(own.device, hw)[1]
        raise UserError(
            f"rank {rank} cannot follow rank 0's bf16 autocast: {why} (run every process "
            "with --no-amp, or on machines of one kind)"
        )
    fields = ("amp_dtype", "channels_last", "eval_channels_last", "micro_batch", "reasons")
    return Effective(**{**asdict(own), **{k: leader[k] for k in fields}, "warnings": ()})
