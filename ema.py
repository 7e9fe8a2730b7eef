"""An exponential moving average of a network's weights (parameters and batch-norm buffers),
the network that is validated, selected and tested when --ema is on. Averaging the last few
hundred steps smooths the noise of a short schedule (MosaicML's segmentation recipes; Morales-
Brotons et al., TMLR 2024); the batch-norm statistics are averaged with the weights, as timm's
ModelEmaV2 does, so the average needs no extra passes over the data."""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    """``model`` (the averaged copy of ``source``) after ``update()`` at every optimiser step:
    w <- d * w + (1 - d) * w_source, with d = min(decay, (1 + n) / (10 + n)) after n updates,
    so the early average is not dominated by the random initialisation."""

    def __init__(self, source: torch.nn.Module, decay: float):
        self.source, self.decay, self.updates = source, decay, 0
        self.model = copy.deepcopy(source).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current = [], []
        for a, s in zip(self.model.state_dict().values(), self.source.state_dict().values()):
            if a.is_floating_point():
                averaged.append(a)
                current.append(s.detach())
            else:  # e.g. batch norm's step count
                a.copy_(s)
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
