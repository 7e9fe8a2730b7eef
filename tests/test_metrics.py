"""utils metrics: ConfusionMatrix by hand, average_precision / PixelScores against sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import metrics
import utils


def _one_hot_logits(pred, n):
    return torch.nn.functional.one_hot(torch.as_tensor(pred), n).float()


def test_confusion_matrix_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    pred = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0, 2, 1])
    cm = metrics.ConfusionMatrix(3)
    cm.update(_one_hot_logits(pred[:4], 3), target[:4])  # two updates accumulate
    cm.update(_one_hot_logits(pred[4:], 3), target[4:])
    out = cm.compute()
    assert out["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 3]]
    assert out["accuracy"] == pytest.approx(7 / 10)
    assert out["per_class_accuracy"] == pytest.approx([2 / 3, 2 / 3, 3 / 4])
    assert out["mean_per_class_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    # IoU = TP / (TP + FP + FN)
    iou = [2 / (2 + 1 + 1), 2 / (2 + 1 + 1), 3 / (3 + 1 + 1)]
    assert out["iou"] == pytest.approx(iou)
    assert out["miou"] == pytest.approx(sum(iou) / 3)


def test_confusion_matrix_ignores_targets_out_of_range_and_handles_images():
    cm = metrics.ConfusionMatrix(2)
    logits = torch.zeros(1, 2, 2, 3)
    logits[0, 1, 0, :] = 1.0  # top row predicted class 1, bottom row class 0
    target = torch.tensor([[[1, 0, 255], [0, 2, 0]]])
    cm.update(logits, target)
    out = cm.compute()
    # valid pixels: (t1,p1) (t0,p1) (t0,p0) (t0,p0)
    assert out["confusion_matrix"] == [[2, 1], [0, 1]]
    assert out["accuracy"] == pytest.approx(3 / 4)


def test_confusion_matrix_reset():
    cm = metrics.ConfusionMatrix(2)
    cm.update(_one_hot_logits([0, 1], 2), torch.tensor([1, 1]))
    cm.reset()
    cm.update(_one_hot_logits([1], 2), torch.tensor([1]))
    assert cm.compute()["confusion_matrix"] == [[0, 0], [0, 1]]


CASES = {
    "ties_2dp": lambda rng, n: np.round(rng.random(n), 2),
    "ties_few_values": lambda rng, n: rng.integers(0, 5, n).astype(np.float64),
    "no_ties": lambda rng, n: rng.standard_normal(n),
    "float32": lambda rng, n: rng.standard_normal(n).astype(np.float32),
    "float32_ties": lambda rng, n: np.round(rng.random(n), 2).astype(np.float32),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn(case, seed):
    rng = np.random.default_rng(seed)
    n = 5000
    scores = CASES[case](rng, n)
    y = rng.random(n) < (0.05 + 0.3 * seed)
    scores = scores + (y * 0.3).astype(
        scores.dtype
    )  # informative, so AP is far from the prevalence
    ours = metrics.average_precision(y, scores)
    ref = average_precision_score(y, scores)
    assert abs(ours - ref) < 1e-6, (ours, ref)


def test_average_precision_torch_inputs_and_small_cases():
    assert metrics.average_precision(
        torch.tensor([1, 0, 1]), torch.tensor([0.9, 0.8, 0.7])
    ) == pytest.approx(average_precision_score([1, 0, 1], [0.9, 0.8, 0.7]))
    # one tie group containing everything: AP = prevalence
    assert metrics.average_precision(np.array([1, 0, 0, 0]), np.zeros(4)) == pytest.approx(0.25)
    assert metrics.average_precision(np.array([1, 1]), np.array([0.1, 0.2])) == pytest.approx(1.0)
    assert metrics.average_precision(np.array([0, 1]), np.array([0.3, 0.2])) == pytest.approx(0.5)
    assert math.isnan(metrics.average_precision(np.zeros(5, bool), np.arange(5.0)))
    assert math.isnan(metrics.average_precision(np.zeros(0, bool), np.zeros(0)))  # no pixels


def test_pixel_scores_match_sklearn():
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 3, 5, 12, 10
    logits = torch.randn(b, c, h, w, generator=g)
    labels = torch.randint(0, c, (b, h, w), generator=g)
    logits += 1.5 * torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2)  # informative scores
    labels[0, 0, :4] = 255  # ignored pixels
    ps = metrics.PixelScores(c)
    ps.update(logits[:2], labels[:2])
    ps.update(logits[2:], labels[2:])
    ps.all_reduce(utils.Runtime(device=torch.device("cpu")))
    out = ps.compute()
    flat_scores = logits.permute(0, 2, 3, 1).reshape(-1, c)
    flat_labels = labels.reshape(-1)
    valid = flat_labels < c
    flat_scores, flat_labels = flat_scores[valid], flat_labels[valid]
    probs = torch.softmax(flat_scores, 1)
    for k in range(c):
        ref = average_precision_score((flat_labels == k).numpy(), flat_scores[:, k].numpy())
        ref_soft = average_precision_score((flat_labels == k).numpy(), probs[:, k].numpy())
        assert abs(out["ap"][k] - ref) < 1e-6
        assert abs(out["ap_softmax"][k] - ref_soft) < 1e-6
    assert out["mean_ap"] == pytest.approx(np.mean(out["ap"]))
    assert out["mean_ap_softmax"] == pytest.approx(np.mean(out["ap_softmax"]))
    assert out["pixel_accuracy"] == pytest.approx(
        (flat_scores.argmax(1) == flat_labels).double().mean().item()
    )
    assert sum(map(sum, out["confusion_matrix"])) == int(valid.sum())


def test_pixel_scores_absent_class_is_nan_and_skipped_in_mean():
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 2, (1, 4, 4), generator=torch.Generator().manual_seed(2))
    labels[0, 0, 0], labels[0, 0, 1] = 0, 1
    ps = metrics.PixelScores(3)
    ps.update(logits, labels)
    out = ps.compute()
    assert math.isnan(out["ap"][2])
    assert out["mean_ap"] == pytest.approx((out["ap"][0] + out["ap"][1]) / 2)


def test_precision_recall_curve_ends_at_full_recall():
    y = torch.tensor([1, 0, 1, 1, 0, 0])
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    curve = metrics.subsample_curve(*metrics.precision_recall_steps(y, s))
    recall, precision = curve["recall"], curve["precision"]
    assert recall[-1] == pytest.approx(1.0) and precision[-1] == pytest.approx(0.5)
    assert recall[0] == pytest.approx(1 / 3) and precision[0] == pytest.approx(1.0)
    assert np.all(np.diff(recall) >= 0)


def test_average_precision_large_input_matches_sklearn():
    """200k pixels x 5 classes, raw float32 scores and their softmax (which ties often in float32):
    equal to sklearn per class. Speed is measured by benchmark.py, not asserted here."""
    g = torch.Generator().manual_seed(0)
    n, c = 200_000, 5
    labels = torch.randint(0, c, (n,), generator=g)
    scores = torch.randn(n, c, generator=g) + 0.5 * torch.nn.functional.one_hot(
        labels, c
    )  # informative
    probs = torch.softmax(scores, 1)
    for s in (scores, probs):
        for k in range(c):
            ours = metrics.average_precision(labels == k, s[:, k])
            ref = average_precision_score((labels == k).numpy(), s[:, k].numpy())
            assert abs(ours - ref) < 1e-9, (k, ours, ref)
            assert 0.25 < ours < 0.9  # informative scores: well above the prevalence 0.2
