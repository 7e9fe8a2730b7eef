"""The hardware policy: which device, precision and memory format a run uses on the machine at
hand, and why. Decided here alone, from measurements (docs/speed.md); ``utils.setup_runtime``
applies the choice and the run folder records its reasons.

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
    onednn_avx512: bool = False  # oneDNN may use AVX-512 (False under ONEDNN_MAX_CPU_ISA=AVX2)


def read_hardware() -> Hardware:
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return Hardware(
        cuda=cuda,
        cuda_capability=torch.cuda.get_device_capability() if cuda else None,
        mps=mps,
        cpu_bf16_units=cpu_has_bf16_units(),
        # True where oneDNN's effective ISA reaches avx512_core; it follows ONEDNN_MAX_CPU_ISA.
        onednn_avx512=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    )


def cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: no cheap way to ask, so assume none (fp32 is always right)
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(requested: str, hw: Hardware) -> str:
    """``auto``: CUDA, then MPS, then the CPU (the caller checks that a named device exists)."""
    if requested == "auto":
        return "cuda" if hw.cuda else "mps" if hw.mps else "cpu"
    return requested


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


@dataclass(frozen=True)
class Choice:
    """What a run uses, with the reasons it records in args.json and its first log line."""

    amp_dtype: torch.dtype | None
    channels_last: bool  # model and training inputs
    eval_channels_last: bool  # validation, test and figures
    precision: str
    memory_format: str
    warnings: tuple[str, ...] = ()
    micro_batch: int | None = None  # training batches computed in chunks of this many images


def choose(
    device_type: str,
    hw: Hardware,
    *,
    model: str | None = None,
    amp: bool | None = None,
    amp_dtype: str = "bf16",
    channels_last: bool | None = None,
    micro_batch: int | None = None,
) -> Choice:
    """The precision, memory format and micro-batch for ``model`` on ``device_type``: the flags
    given (``amp``/``channels_last`` True or False, ``micro_batch`` N), else the policy (None)."""
    dtype, precision, warnings = precision_choice(device_type, hw, amp, amp_dtype)
    train_cl, eval_cl, memory_format = layout_choice(device_type, hw, model, channels_last)
    if micro_batch is None and device_type == "cpu" and not hw.onednn_avx512:
        micro_batch = CPU_AVX2_MICRO_BATCH.get(model)
    if micro_batch:
        memory_format += f"; training in micro-batches of {micro_batch} where the loss allows"
    return Choice(dtype, train_cl, eval_cl, precision, memory_format, warnings, micro_batch)


def precision_choice(device_type, hw, amp, amp_dtype) -> tuple[torch.dtype | None, str, tuple]:
    native, why = native_bf16(device_type, hw)
    if amp is False:
        return None, "fp32 (--no-amp)", ()
    if amp is None:
        if native:
            return torch.bfloat16, f"bf16 autocast: {why}", ()
        hint = ()
        if device_type == "cuda":
            hint = ("hint: --amp --amp-dtype fp16 is faster than fp32 on this GPU",)
        return None, f"fp32: {why}", hint
    if amp_dtype == "fp16":
        return torch.float16, "fp16 autocast with a gradient scaler (--amp --amp-dtype fp16)", ()
    warning = () if native else (f"warning: --amp asks for bf16, but {why}: expect it to run "
                                 "much slower than fp32 (--no-amp) here",)  # fmt: skip
    return torch.bfloat16, "bf16 autocast (--amp)", warning


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


def describe_cpu_isa() -> str:
    """A short label of what oneDNN and ATen may use here, for benchmark and result tables."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    label = torch.backends.cpu.get_cpu_capability()
    return f"{label}, oneDNN capped at {capped}" if capped else label
