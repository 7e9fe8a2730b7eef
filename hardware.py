"""The hardware policy: which device, precision and memory format a run uses on the machine at
hand, and why, from measurements (docs/speed.md): the machine's facts and one rule per setting.
``settings.settle`` combines them with the flags given, ``utils.setup_runtime`` applies the
result and the run folder records its reasons.

- Device: ``auto`` is CUDA, then Apple's MPS, then the CPU.
- Precision: bf16 autocast only where the hardware computes bf16 natively (CUDA compute
  capability >= 8.0; CPUs with AVX512-BF16 or AMX whose oneDNN may use them); fp32 elsewhere. A
  forced ``--amp`` on emulated bf16 runs, with a warning.
- Memory format: channels-last where it was measured faster: on CUDA, and on the CPU except for
  training ``facade_fcn`` where oneDNN has no AVX-512 kernels (its AVX2 kernels compute the weight
  gradients of the 128-channel 256x256 convolutions ~4x slower in channels-last). Never on MPS,
  where batch norm in channels-last gives wrong gradients in current torch.
- Training batch: whole, except ``facade_fcn`` on a CPU without AVX-512, whose batches run one
  image at a time with accumulated gradients (the same gradient, 1.37x faster there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from errors import UserError

# (model, phase) pairs that run faster in the standard layout on a CPU whose oneDNN lacks
# AVX-512; every other model and phase was faster in channels-last on both kinds of CPU.
CPU_AVX2_STANDARD_LAYOUT = {("facade_fcn", "train")}
# Models whose training batch runs faster one image at a time, gradients accumulated, on a CPU
# whose oneDNN lacks AVX-512: facade_fcn 0.93 against 0.68 images/s at its batch of 25 (fp32).
# Natively (bf16) the batch size made no difference.
CPU_AVX2_MICRO_BATCH = {"facade_fcn": 1}


@dataclass(frozen=True)
class Hardware:
    """What the machine offers, read once by ``read_hardware`` (tests build their own)."""

    cuda: bool = False
    cuda_capability: tuple[int, int] | None = None
    mps: bool = False
    cpu_bf16_units: bool = False  # AVX512-BF16 or AMX in the CPU's flags
    onednn_avx512: bool = False  # AVX-512 in the CPU's flags, and oneDNN not capped below it


def read_hardware() -> Hardware:
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    flags = cpu_flags()
    return Hardware(
        cuda=cuda,
        cuda_capability=torch.cuda.get_device_capability() if cuda else None,
        mps=mps,
        cpu_bf16_units=bool({"avx512_bf16", "amx_bf16"} & flags),
        onednn_avx512=onednn_uses_avx512(flags, os.environ.get("ONEDNN_MAX_CPU_ISA")),
    )


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty elsewhere, where fp32 is always right."""
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()[2:]}
    except OSError:
        return set()


def onednn_uses_avx512(flags: set[str], cap: str | None) -> bool:
    """Whether oneDNN runs its AVX-512 kernels: the CPU has them (avx512_core: F, BW, VL, DQ)
    and ONEDNN_MAX_CPU_ISA does not cap it below. Read from the flags, not from oneDNN's bf16
    answer, which is also True on AVX2 laptop chips with AVX2-VNNI-2."""
    has = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    cap = (cap or "").strip().upper()
    return has and (cap in ("", "ALL", "DEFAULT") or cap.startswith(("AVX512", "AVX10")))


def pick_device(requested: str, hw: Hardware) -> tuple[str, str]:
    """The device kind and why: ``auto`` is CUDA, then MPS, then the CPU; a named one must
    exist."""
    present = {"cuda": hw.cuda, "mps": hw.mps, "cpu": True}
    if requested == "auto":
        kind = next(k for k in ("cuda", "mps", "cpu") if present[k])
        return kind, f"{kind}: the first of CUDA, MPS, CPU present here (--device auto)"
    if not present[requested]:
        raise UserError(
            f"--device {requested} was given but {requested.upper()} is not available on this "
            "machine (use --device cpu or auto)"
        )
    return requested, f"{requested} (--device {requested})"


def native_bf16(device_type: str, hw: Hardware) -> tuple[bool, str]:
    """Whether ``device_type`` computes bf16 natively here, and the reason in words."""
    if device_type == "cuda":
        major, minor = hw.cuda_capability or (0, 0)
        if major >= 8:
            return True, f"this GPU (compute capability {major}.{minor}) computes bf16 natively"
        return False, f"this GPU (compute capability {major}.{minor}) has no bf16 units"
    if device_type == "mps":
        return False, "autocast on MPS is untested in this project"
    if not hw.cpu_bf16_units:
        return False, "this CPU has no native bf16 (no AVX512-BF16 or AMX)"
    if not hw.onednn_avx512:
        return False, "oneDNN is capped below AVX-512 (ONEDNN_MAX_CPU_ISA), so bf16 is emulated"
    return True, "this CPU computes bf16 natively (AVX512-BF16 or AMX)"


def precision_choice(device_type, hw, wanted) -> tuple[str | None, str, tuple]:
    """(precision, reason, warnings) for ``wanted``: False lets the policy choose; None is fp32
    (--no-amp); "bf16" / "fp16" were asked for (by flags, or by a resumed checkpoint)."""
    native, why = native_bf16(device_type, hw)
    if wanted is None:
        return None, "fp32 (--no-amp)", ()
    if wanted is False:
        if native:
            return "bf16", f"bf16 autocast: {why}", ()
        hint = ()
        if device_type == "cuda":
            hint = ("hint: --amp --amp-dtype fp16 is faster than fp32 on this GPU",)
        return None, f"fp32: {why}", hint
    if device_type == "mps":  # MPS autocast needs a newer torch than the floor and is untested
        raise UserError(f"{wanted} autocast on MPS is not supported here: use --no-amp, "
                          "or --device cpu")  # fmt: skip
    if wanted == "fp16":
        warning = () if device_type == "cuda" else (
            "warning: fp16 autocast on the CPU is emulated and slow; it is meant for checking "
            "the fp16 path of GPUs without bf16",)  # fmt: skip
        return "fp16", "fp16 autocast with a gradient scaler (asked for)", warning
    warning = () if native else (f"warning: bf16 autocast was asked for, but {why}: expect it "
                                 "to run much slower than fp32 (--no-amp) here",)  # fmt: skip
    return "bf16", "bf16 autocast (asked for)", warning


def layout_choice(device_type, hw, model, channels_last) -> tuple[bool, bool, str]:
    if channels_last is not None:
        name = "channels-last" if channels_last else "standard layout"
        flag = "--channels-last" if channels_last else "--no-channels-last"
        return channels_last, channels_last, f"{name} ({flag})"
    if device_type == "mps":
        return False, False, "standard layout: batch norm in channels-last is wrong on MPS"
    if device_type == "cuda":
        return True, True, "channels-last: measured faster on CUDA"
    if not hw.onednn_avx512 and (model, "train") in CPU_AVX2_STANDARD_LAYOUT:
        return False, True, (
            f"standard layout for training, channels-last for evaluation: measured fastest for "
            f"{model} on a CPU without AVX-512"
        )  # fmt: skip
    return True, True, "channels-last: measured faster on this kind of CPU"


def micro_batch_choice(device_type, hw, model, requested, batch_splits) -> tuple[int, str]:
    """(chunk size, reason): 0 is whole batches. Chunks are used only where they give the whole
    batch's gradient (``batch_splits``: no batch norm, an unweighted mean loss)."""
    policy = requested is None
    if policy:
        requested = CPU_AVX2_MICRO_BATCH.get(model, 0)
        if device_type != "cpu" or hw.onednn_avx512:
            requested = 0
    if not requested:
        return 0, "whole batches" + (" (--micro-batch 0)" if not policy else "")
    if not batch_splits:
        return 0, (f"whole batches: --micro-batch {requested} refused, since batch norm or a "
                   "weighted loss would not give the whole batch's gradient")  # fmt: skip
    why = "measured faster on a CPU without AVX-512" if policy else f"--micro-batch {requested}"
    return requested, f"training in micro-batches of {requested}: {why}"


def describe_cpu_isa() -> str:
    """A short label of what oneDNN and ATen may use here, for benchmark and result tables."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    label = torch.backends.cpu.get_cpu_capability()
    return f"{label}, oneDNN capped at {capped}" if capped else label
