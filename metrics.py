"""Exact, vectorised metrics: a confusion matrix (accuracy, per-class accuracy, IoU) and
average precision equal to ``sklearn.metrics.average_precision_score`` over every test pixel.

Each metric object has ``update(logits, target)``, ``all_reduce(rt)`` and ``compute() -> dict``,
so the one evaluation loop in ``engine.py`` serves both parts and every rank count.
"""

from __future__ import annotations

import numpy as np
import torch

from utils import Runtime, all_gather_cat, all_reduce_sum, gather_in_dataset_order


class ConfusionMatrix:
    """Counts (target, prediction) pairs with one bincount; targets >= num_classes are ignored.
    With ``keep_predictions`` it also returns every prediction, in dataset order."""

    def __init__(self, num_classes: int, keep_predictions: bool = False):
        self.num_classes, self.keep_predictions = num_classes, keep_predictions
        self.reset()

    def reset(self):
        self.matrix, self.predictions = None, []

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        n = self.num_classes
        pred = logits.argmax(1)
        if self.keep_predictions:
            self.predictions.append(pred)
        pred, target = pred.flatten(), target.flatten().long()
        valid = target < n
        counts = torch.bincount(n * target[valid] + pred[valid], minlength=n * n).reshape(n, n)
        self.matrix = counts if self.matrix is None else self.matrix + counts

    def all_reduce(self, rt: Runtime) -> None:
        if self.matrix is None:  # a rank whose shard was empty still joins the all-reduce
            n = self.num_classes
            self.matrix = torch.zeros(n, n, dtype=torch.long, device=rt.device)
        self.matrix = all_reduce_sum(self.matrix, rt)
        if self.keep_predictions:
            local = (
                torch.cat(self.predictions)
                if self.predictions
                else torch.zeros(0, dtype=torch.long, device=rt.device)
            )
            self.predictions = [gather_in_dataset_order(local, rt).cpu()]

    def compute(self) -> dict:
        m = self.matrix.cpu().double()  # on the host: MPS has no fp64
        total, diag = m.sum(), m.diag()
        per_class_acc = diag / m.sum(1).clamp(min=1)
        iou = diag / (m.sum(0) + m.sum(1) - diag).clamp(min=1)
        return {
            "accuracy": (diag.sum() / total.clamp(min=1)).item(),
            "per_class_accuracy": per_class_acc.tolist(),
            "mean_per_class_accuracy": per_class_acc.mean().item(),
            "iou": iou.tolist(),
            "miou": iou.mean().item(),
            "confusion_matrix": self.matrix.cpu().tolist(),
        } | ({"predictions": torch.cat(self.predictions)} if self.keep_predictions else {})


def precision_recall_steps(y_true, scores) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(precision, recall) at every distinct score threshold, highest first, in float64, exactly as
    sklearn's precision_recall_curve (before its reversal); None when there is no positive.

    Two value-only sorts (all scores, positives' scores) and a binary search replace an argsort:
    the true positives above a threshold are the positives' scores at or above it. numpy's
    vectorised sort makes this ~3x faster than an argsort for millions of pixels."""
    scores = torch.as_tensor(scores).cpu().numpy()
    y_true = torch.as_tensor(y_true).cpu().numpy().astype(bool, copy=False)
    if scores.size == 0:
        return None
    descending = np.sort(scores)[::-1]
    # Last index of each run of equal scores: ties share one threshold, as in sklearn.
    last_of_run = np.append(np.flatnonzero(descending[1:] != descending[:-1]), scores.size - 1)
    positives = np.sort(scores[y_true])
    if positives.size == 0:
        return None
    thresholds = descending[last_of_run]
    tps = (positives.size - np.searchsorted(positives, thresholds, side="left")).astype(np.float64)
    precision, recall = tps / (last_of_run + 1), tps / tps[-1]
    return torch.from_numpy(precision), torch.from_numpy(recall)


def average_precision(y_true, scores) -> float:
    """Exactly sklearn.metrics.average_precision_score for one binary problem:
    AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds; nan when there is no positive."""
    return ap_from_steps(precision_recall_steps(y_true, scores))


def ap_from_steps(steps) -> float:
    if steps is None:
        return float("nan")
    precision, recall = steps
    return float(
        (torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64)) * precision).sum()
    )


def subsample_curve(precision: torch.Tensor, recall: torch.Tensor, points: int = 200) -> dict:
    keep = torch.linspace(0, len(recall) - 1, min(points, len(recall))).long()
    return {"recall": recall[keep].tolist(), "precision": precision[keep].tolist()}


class PixelScores:
    """Keeps every pixel's class scores (float32) and label for exact AP at the end, plus a
    confusion matrix. Memory: 4 bytes x classes x pixels (144 MB for 110 facades)."""

    def __init__(self, num_classes: int, softmax: bool = True):
        self.num_classes, self.softmax = num_classes, softmax  # softmax=False: raw-score AP only
        self.confusion = ConfusionMatrix(num_classes)
        self.reset()

    def reset(self):
        self.scores, self.labels = [], []
        self.confusion.reset()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion.update(logits, target)
        self.scores.append(logits.float().permute(0, 2, 3, 1).reshape(-1, self.num_classes).cpu())
        self.labels.append(target.reshape(-1).to(torch.uint8).cpu())

    def all_reduce(self, rt: Runtime) -> None:
        self.confusion.all_reduce(rt)
        c = self.num_classes
        scores = torch.cat(self.scores) if self.scores else torch.zeros(0, c)
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.uint8)
        if rt.distributed:  # gloo gathers CPU tensors; nccl needs them on the GPU
            scores = all_gather_cat(scores.to(rt.device), rt).cpu()
            labels = all_gather_cat(labels.to(rt.device), rt).cpu()
        self.scores, self.labels = [scores], [labels]

    def compute(self) -> dict:
        scores, labels = torch.cat(self.scores), torch.cat(self.labels).long()
        valid = labels < self.num_classes
        scores, labels = scores[valid], labels[valid]
        ap, curves = [], []
        for c in range(self.num_classes):
            steps = precision_recall_steps(labels == c, scores[:, c])
            ap.append(ap_from_steps(steps))
            curves.append(None if steps is None else subsample_curve(*steps))
        cm = self.confusion.compute()
        softmax = {}
        if self.softmax:
            probs = torch.softmax(scores, dim=1)
            ap_softmax = [average_precision(labels == c, probs[:, c]) for c in range(len(ap))]
            softmax = {"ap_softmax": ap_softmax, "mean_ap_softmax": float(np.nanmean(ap_softmax))}
        return softmax | {
            "ap": ap,
            "pr_curves": curves,
            "mean_ap": float(np.nanmean(ap)),
            "pixel_accuracy": cm["accuracy"],
            "accuracy": cm["accuracy"],  # the name the epoch log uses for either part
            "iou": cm["iou"],
            "miou": cm["miou"],
            "per_class_accuracy": cm["per_class_accuracy"],
            "confusion_matrix": cm["confusion_matrix"],
        }
