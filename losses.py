"""The training losses of both parts, each with additive ``sums`` for an exact validation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class CrossEntropy:
    """Cross-entropy (optionally class-weighted, label-smoothed), mean over samples or pixels.
    ``sums`` gives additive statistics and ``value`` the loss of their total, so the validation
    loss is the same number for any batch size and any number of processes."""

    num_sums = 2

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None):
        self.label_smoothing, self.weight = label_smoothing, weight

    @property
    def splits_exactly(self) -> bool:
        """A plain mean over samples or pixels: chunks weighted by their size add up to it."""
        return self.weight is None

    def _weight(self, logits):
        return None if self.weight is None else self.weight.to(logits.device)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits, y, weight=self._weight(logits), label_smoothing=self.label_smoothing
        )

    def sums(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight = self._weight(logits)
        per_item = F.cross_entropy(
            logits.float(), y, weight=weight, label_smoothing=self.label_smoothing, reduction="none"
        )
        count = y.numel() if weight is None else weight[y].sum()
        count = torch.as_tensor(count, dtype=torch.float32, device=y.device)
        return torch.stack([per_item.sum(), count])  # fp32: added up in fp64 on the host

    def value(self, sums: list[float]) -> float:
        return sums[0] / max(sums[1], 1e-12)


class CrossEntropyDice(CrossEntropy):
    """Class-weighted cross-entropy + soft Dice (mean over classes). For validation, Dice uses
    the intersections and totals of the whole split rather than a mean of per-batch values."""

    def __init__(self, weight: torch.Tensor, num_classes: int):
        super().__init__(weight=weight)
        self.num_classes, self.num_sums = num_classes, 2 + 2 * num_classes

    def _dice_sums(self, logits, y):
        probs = torch.softmax(logits.float(), 1)
        onehot = F.one_hot(y, self.num_classes).permute(0, 3, 1, 2).float()
        return (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))

    def __call__(self, logits, y):
        inter, total = self._dice_sums(logits, y)
        return super().__call__(logits, y) + 1 - ((2 * inter + 1) / (total + 1)).mean()

    def sums(self, logits, y):
        inter, total = self._dice_sums(logits, y)
        return torch.cat([super().sums(logits, y), inter, total])

    def value(self, sums):
        c = self.num_classes
        dice = [(2 * i + 1) / (t + 1) for i, t in zip(sums[2 : 2 + c], sums[2 + c :])]
        return super().value(sums) + 1 - sum(dice) / c


class OneVsRest:
    """One binary cross-entropy per class on its own score (sigmoid, not softmax), summed over
    classes and averaged over pixels. Each class's score is then trained to rank that class's
    pixels above all others on its own, as per-class average precision over all pixels ranks
    them; softmax cross-entropy leaves a per-pixel offset of all scores free, which that ranking
    sees and the loss does not."""

    num_sums, splits_exactly = 2, True

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def _per_pixel(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        onehot = F.one_hot(y, self.num_classes).movedim(-1, 1).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(1)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._per_pixel(logits, y).mean()

    def sums(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count = torch.tensor(float(y.numel()), device=y.device)
        return torch.stack([self._per_pixel(logits, y).sum(), count])

    def value(self, sums: list[float]) -> float:
        return sums[0] / max(sums[1], 1e-12)


class WithZLoss:
    """A loss plus ``weight`` x the mean square of each pixel's log-sum-exp of its scores
    (PaLM's z-loss, Chowdhery et al. 2022). Softmax cross-entropy cannot see an offset shared by
    all of a pixel's scores; this pins it near zero, so the raw scores approach log-probabilities
    and rank pixels across the image as their softmax does."""

    def __init__(self, base, weight: float):
        self.base, self.weight = base, weight
        self.num_sums, self.splits_exactly = base.num_sums + 2, base.splits_exactly

    def _square_lse(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits.float(), dim=1).square()

    def __call__(self, logits, y):
        return self.base(logits, y) + self.weight * self._square_lse(logits).mean()

    def sums(self, logits, y):
        square = self._square_lse(logits)
        count = torch.tensor(float(square.numel()), device=y.device)
        return torch.cat([self.base.sums(logits, y), torch.stack([square.sum(), count])])

    def value(self, sums):
        return self.base.value(sums[:-2]) + self.weight * sums[-2] / max(sums[-1], 1e-12)


def segmentation_loss(name: str, train_labels: torch.Tensor, num_classes: int, z_loss=0.0):
    """Part 2's --loss by name (and --z-loss); the class weights come from the training
    labels' pixel counts."""
    loss = _named_loss(name, train_labels, num_classes)
    return WithZLoss(loss, z_loss) if z_loss else loss


def _named_loss(name: str, train_labels: torch.Tensor, num_classes: int):
    if name == "ce":
        return CrossEntropy()
    if name == "bce":
        return OneVsRest(num_classes)
    counts = torch.bincount(train_labels.flatten().long(), minlength=num_classes).tolist()
    # Inverse square-root frequency, mean 1: lifts rare pillars and balconies, spares the facade
    # (in Python's doubles on the host: MPS has no fp64)
    weights = [max(c, 1) ** -0.5 for c in counts]
    weights = torch.tensor([w * len(weights) / sum(weights) for w in weights])
    return CrossEntropyDice(weights, num_classes)
