"""What benchmark.py's rows are judged against: the variant the scripts run without flags on this
machine (the hardware policy, hardware.py), whether it is the fastest one measured, and the Part 2
targets; with their tables."""

from __future__ import annotations

import hardware
import settings

PART_MODELS = {"part1": "sigmoid_cnn", "part2": "facade_fcn"}  # the reference model of each part


def variant_name(amp, channels_last, compile_model, micro_batch=0) -> str:
    return (
        (amp or "fp32")
        + ("+cl" if channels_last else "")
        + (f"+micro{micro_batch}" if micro_batch else "")
        + ("+compile" if compile_model else "")
    )


def native_amp_dtypes(kind: str, hw: hardware.Hardware) -> list[str]:
    """The AMP dtypes this device computes natively (fp16: every CUDA GPU this torch supports)."""
    bf16 = ["bf16"] if hardware.native_bf16(kind, hw)[0] else []
    return bf16 + (["fp16"] if kind == "cuda" else [])


def policy_flags(kind: str, hw: hardware.Hardware, model: str) -> dict:
    """What the scripts use for ``model`` here without flags (the policy, hardware.py): AMP
    dtype name or None, channels-last for training and for evaluation, training micro-batch."""
    chosen = settings.settle(hw, device=kind, model=model)
    return {"amp": chosen.amp_dtype, "train_cl": chosen.channels_last,
            "eval_cl": chosen.eval_channels_last, "micro_batch": chosen.micro_batch}  # fmt: skip


def default_variants(kind: str, hw: hardware.Hardware) -> dict[str, str]:
    """The default variant per "part/phase"."""
    out = {}
    for part, model in PART_MODELS.items():
        f = policy_flags(kind, hw, model)
        out[f"{part}/train"] = variant_name(f["amp"], f["train_cl"], False, f["micro_batch"])
        out[f"{part}/eval"] = variant_name(f["amp"], f["eval_cl"], False)
    return out


def fastest_check(rows: list[dict], defaults: dict[str, str]) -> list[dict]:
    """Per part and phase: the default variant against the fastest one measured (compile
    variants aside: they are opt-in)."""
    found = []
    for key, default in defaults.items():
        part, phase = key.split("/")
        ours = {
            r["precision"]: r["images_per_s"]
            for r in rows
            if (r["pipeline"], r["part"], r["phase"]) == ("ours", part, phase)
            and "compile" not in r["precision"]
        }
        if default not in ours:
            continue
        best = max(ours, key=ours.get)
        ratio = ours[default] / ours[best]
        found.append({"part": part, "phase": phase, "default": default, "fastest": best,
                      "default_vs_fastest": ratio, "ok": ratio >= 0.95})  # fmt: skip
    return found


def format_fastest(found: list[dict]) -> str:
    lines = ["| part | phase | default | fastest measured | default / fastest | within 5% |",
             "|---|---|---|---|---:|---|"]  # fmt: skip
    lines += [
        f"| {f['part']} | {f['phase']} | {f['default']} | {f['fastest']} | "
        f"{f['default_vs_fastest']:.2f} | {'yes' if f['ok'] else 'no'} |"
        for f in found
    ]
    return "\n".join(lines)


def targets(rows: list[dict], ap: dict, defaults: dict[str, str]) -> list[dict]:
    """The Part 2 targets: faithful training with the default flags >= 1.3x naive (3x where
    bf16 is native), evaluation with the default flags >= 4x, all 10 AP curves of the test
    split <= 5 s."""
    speedup = {
        (r["phase"], r["precision"]): r["speedup_vs_naive"]
        for r in rows
        if r["part"] == "part2" and r["pipeline"] == "ours"
    }
    train, evaluation = defaults["part2/train"], defaults["part2/eval"]
    train_goal = 1.3 if train.startswith("fp32") else 3.0
    found = [
        (f"Part 2 training, default flags {train} (x naive)", speedup.get(("train", train)),
         train_goal, "min"),
        (f"Part 2 evaluation, default flags {evaluation} (x naive)",
         speedup.get(("eval", evaluation)), 4.0, "min"),
        ("all 10 AP curves, 110 test images (s)", ap.get("ap_curves_s"), 5.0, "max"),
    ]  # fmt: skip
    return [
        {"what": what, "value": value, "target": target, "met": None if value is None
         else (value >= target if kind == "min" else value <= target)}
        for what, value, target, kind in found
    ]  # fmt: skip


def format_targets(found: list[dict]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---:|---:|---|"]
    for t in found:
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        goal = ("<= " if "(s)" in t["what"] else ">= ") + f"{t['target']:g}"
        met = {True: "yes", False: "no", None: "-"}[t["met"]]
        lines.append(f"| {t['what']} | {value} | {goal} | {met} |")
    return "\n".join(lines)
