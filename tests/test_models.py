"""models: output shapes, parameter counts, FLOPs."""

from __future__ import annotations

import pytest
import torch

import models


def test_sigmoid_cnn_shape_and_parameter_count():
    net = models.build_model("sigmoid_cnn")
    by_hand = (
        (32 * 1 * 9 + 32)
        + (32 * 32 * 9 + 32)
        + (800 * 120 + 120)
        + (120 * 84 + 84)
        + (84 * 10 + 10)
    )
    assert models.count_parameters(net) == by_hand  # 116,702
    with torch.no_grad():
        assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    # layer by layer, as the reference
    assert net.conv1.weight.shape == (32, 1, 3, 3) and net.conv2.weight.shape == (32, 32, 3, 3)
    assert (
        net.fc1.weight.shape == (120, 800)
        and net.fc2.weight.shape == (84, 120)
        and net.fc3.weight.shape == (10, 84)
    )


def test_fashion_net_shape():
    """(B,1,28,28) -> (B,10), and 584,874 parameters counted layer by layer (the class docstring's
    0.58M); the 1152 x 256 head alone holds 0.30M of them."""
    net = models.build_model("fashion_net").eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    w = 32
    convs = 9 * (
        1 * w + w * w + w * 2 * w + 2 * w * 2 * w + 2 * w * 4 * w + 4 * w * 4 * w
    )  # no conv bias
    bns = 2 * (2 * w + 2 * 2 * w + 2 * 4 * w) + 2 * 256
    head = 4 * w * 9 * 256 + 256 * 10 + 10
    assert models.count_parameters(net) == convs + bns + head == 584874


@pytest.mark.parametrize("size", [256, 264])
def test_facade_fcn_keeps_resolution(size):
    net = models.build_model("facade_fcn").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, size, size)).shape == (1, 5, size, size)


def test_facade_fcn_non_square_small():
    net = models.build_model("facade_fcn").eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 36, 50)).shape == (2, 5, 36, 50)
    assert 36 % net.size_multiple == 0 and 50 % net.size_multiple == 0


def test_unet_256():
    net = models.build_model("unet", num_classes=5, width=8, depth=4).eval()
    assert net.size_multiple == 16
    with torch.no_grad():
        assert net(torch.randn(1, 3, 256, 256)).shape == (1, 5, 256, 256)


def test_flip_average_mirrors_back_pixel_scores_but_not_class_logits():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 4, 6)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24, 3))
    want = (classifier(x) + classifier(x.flip(-1))) / 2
    assert torch.allclose(models.FlipAverage(classifier)(x), want)
    segmenter = torch.nn.Conv2d(1, 3, 3, padding=1)
    want = (segmenter(x) + segmenter(x.flip(-1)).flip(-1)) / 2
    assert torch.allclose(models.FlipAverage(segmenter)(x), want)
    assert models.FlipAverage(classifier).size_multiple == 1


def test_unet_default_width_parameters_and_shape():
    net = models.build_model("unet").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 48)).shape == (1, 5, 64, 48)
    assert 5e6 < models.count_parameters(net) < 12e6  # a width-32, depth-4 U-Net has ~7.8M


def test_facade_fcn_flops_256():
    net = models.build_model("facade_fcn")
    flops = models.forward_flops(net, (1, 3, 256, 256))
    hw, half = 256 * 256, 128 * 128
    by_hand = 2 * (
        3 * 64 * 9 * hw
        + 64 * 64 * 9 * hw
        + 64 * 64 * 4 * half
        + 64 * 128 * 9 * hw
        + 128 * 128 * 9 * hw
        + 128 * 128 * 4 * half
        + 128 * 5 * 25 * hw
    )
    assert flops == pytest.approx(38.8e9, rel=0.01)
    assert flops == pytest.approx(by_hand, rel=1e-3)
    assert net.training  # forward_flops restores the mode


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("resnet")


def test_models_for_tasks():
    assert sorted(models.models_for("classification")) == ["fashion_net", "sigmoid_cnn"]
    assert sorted(models.models_for("segmentation")) == ["facade_fcn", "unet"]


@pytest.mark.parametrize(
    "name,shape,target_shape",
    [("fashion_net", (16, 1, 28, 28), (16,)), ("unet", (2, 3, 32, 32), (2, 32, 32))],
)
def test_overfits_one_batch(name, shape, target_shape):
    """The improved models memorise one fixed random batch in 30 steps: the loss must halve."""
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=10 if len(target_shape) == 1 else 5)
    x = torch.randn(shape)
    y = torch.randint(0, 10 if len(target_shape) == 1 else 5, target_shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_unet_flops_below_reference():
    ref = models.forward_flops(models.build_model("facade_fcn"), (1, 3, 256, 256))
    unet = models.forward_flops(models.build_model("unet"), (1, 3, 256, 256))
    assert unet < 0.7 * ref  # 24.2 vs 38.8 GFLOP


def test_unet_downsample_runs_the_same_network_on_the_pooled_image_at_a_quarter_of_the_flops():
    """downsample=2: the scores are the full-resolution U-Net's on the 2x2-averaged image,
    resized back bilinearly; a quarter of the FLOPs; inputs must divide by 2 * 2**depth."""
    torch.manual_seed(0)
    half = models.build_model("unet", num_classes=5, width=4, downsample=2).eval()
    full = models.build_model("unet", num_classes=5, width=4).eval()
    full.load_state_dict(half.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(
            full(torch.nn.functional.avg_pool2d(x, 2)), size=(64, 96), mode="bilinear"
        )
        assert torch.allclose(half(x), expected, atol=1e-6)
    assert half.size_multiple == 32
    assert models.forward_flops(half, (1, 3, 64, 96)) == models.forward_flops(full, (1, 3, 32, 48))
    assert models.forward_flops(half, (1, 3, 64, 96)) * 4 == models.forward_flops(
        full, (1, 3, 64, 96)
    )
