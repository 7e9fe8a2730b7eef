"""The optimiser and its per-step learning-rate schedule (warm-up, then constant, cosine or
linear decay), shared by both parts."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    raise ValueError(name)


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak LR at an optimiser step: linear warm-up, then constant or decay
    (cosine or linear) to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(schedule)


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int = 0):
    """A per-step LambdaLR: its state is only the step count, so resume needs nothing else."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, schedule, warmup_steps)
    )


def optimizer_and_schedule(model: torch.nn.Module, args, steps_per_epoch: int):
    """The recipe's optimiser and its per-step schedule over ``args.epochs`` epochs."""
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    scheduler = build_scheduler(
        optimizer,
        args.schedule,
        args.epochs * steps_per_epoch,
        int(args.warmup_epochs * steps_per_epoch),
    )
    return optimizer, scheduler
