"""Networks for both parts, selectable by name with ``build_model(name)``.

Part 1 (input (B, 1, 28, 28) -> logits (B, 10)):
  sigmoid_cnn  the reference network, layer for layer
  fashion_net  improved: BN + ReLU VGG-style blocks, dropout (``width`` channels first)
Part 2 (input (B, 3, H, W) -> logits (B, 5, H, W)):
  facade_fcn   the reference segmenter, layer for layer
  unet         improved: 4-level U-Net with skip connections and batch norm
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def float32_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the last layer in fp32 even under autocast: accuracy and AP are computed from these
    scores, and bf16's 8-bit mantissa would make millions of pixel scores tie."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


class SigmoidCNN(nn.Module):
    """Reference Part 1 model. (B,1,28,28) -> conv 3x3 (26) -> pool (13) -> conv 3x3 (11)
    -> pool (5) -> 32*5*5 = 800 -> 120 -> 84 -> 10. The reference printout omits fc2, but fc3
    takes 84 inputs, so fc2 (120 -> 84) must exist; it is kept here."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 32, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(800, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(torch.sigmoid(self.conv1(x)))
        x = self.pool(torch.sigmoid(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.sigmoid(self.fc1(x))
        x = torch.sigmoid(self.fc2(x))
        return float32_layer(self.fc3, x)


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FashionNet(nn.Module):
    """Improved Part 1 model: three VGG blocks (28 -> 14 -> 7 -> 3), global pooling, dropout.
    (B,1,28,28) -> (B,10); 0.58M parameters at width 32, 1.09M at 48."""

    def __init__(self, num_classes: int = 10, width: int = 32, dropout: float = 0.3):
        super().__init__()
        self.width = w = width
        self.conv1 = conv_bn_relu(1, w)
        self.conv2 = conv_bn_relu(w, w)
        self.features = nn.Sequential(
            nn.MaxPool2d(2),
            conv_bn_relu(w, 2 * w),
            conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
            conv_bn_relu(2 * w, 4 * w),
            conv_bn_relu(4 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(4 * w * 9, 256, bias=False),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x):
        x = self.head[:-1](self.features(self.conv2(self.conv1(x))))
        return float32_layer(self.head[-1], x)


class FacadeFCN(nn.Module):
    """Reference Part 2 model; keeps the input resolution for any even H, W (so any multiple of 4).
    (B,3,H,W) -> 64 -> 64 -> pool (H/2) -> up (H) -> 128 -> 128 -> pool (H/2) -> up (H)
    -> 5x5 conv -> (B,5,H,W)."""

    size_multiple = 2  # each pool is undone by a 2x up-convolution before the next one

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.ConvTranspose2d(64, 64, 2, stride=2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.ConvTranspose2d(128, 128, 2, stride=2),
            nn.Conv2d(128, num_classes, 5, padding=2),
        )

    def forward(self, x):
        return float32_layer(self.layers[-1], self.layers[:-1](x))


class StripPool(nn.Module):
    """Strip pooling (Hou et al., CVPR 2020): each row and each column averaged to a band, a
    3-tap conv along the band, the two broadcast back and summed, and a sigmoid gate of the
    features from them. Long thin structures (a pillar's column, a balcony's row) get context
    from the whole image height or width for a few FLOPs per pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.rows = nn.Sequential(
            nn.Conv2d(channels, channels, (3, 1), padding=(1, 0), bias=False),
            nn.BatchNorm2d(channels),
        )
        self.columns = nn.Sequential(
            nn.Conv2d(channels, channels, (1, 3), padding=(0, 1), bias=False),
            nn.BatchNorm2d(channels),
        )
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        rows = self.rows(x.mean(dim=3, keepdim=True))  # (B, C, H, 1)
        columns = self.columns(x.mean(dim=2, keepdim=True))  # (B, C, 1, W)
        return x * torch.sigmoid(self.gate(F.relu(rows + columns)))


class UNet(nn.Module):
    """Improved Part 2 model: U-Net with ``depth`` poolings, BN + ReLU double convs and skip
    connections. (B,3,H,W) -> (B,C,H,W) for H, W divisible by downsample * 2**depth. With
    ``downsample`` f > 1 it works on the image averaged over f x f pixels, and its scores are
    resized back bilinearly: about 1/f^2 of the FLOPs, for boundaries drawn at 1/f resolution;
    ``fine_width`` c > 0 then adds a full-resolution branch (a conv of the image, joined with the
    upsampled U-Net features, a conv, the scores) that draws them at full resolution for ~1/6
    more FLOPs at c = 8 (Fast-SCNN's and EfficientSeg's cheap full-resolution path).
    ``strip_pool``: a StripPool gate after each decoder stage."""

    def __init__(
        self,
        num_classes: int = 5,
        width: int = 32,
        depth: int = 4,
        downsample: int = 1,
        fine_width: int = 0,
        strip_pool: bool = False,
    ):
        super().__init__()
        if fine_width and downsample == 1:
            raise ValueError("a full-resolution branch needs downsample > 1")
        self.downsample, self.fine_width = downsample, fine_width
        self.size_multiple = downsample * 2**depth
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(
            [nn.Sequential(conv_bn_relu(3, chans[0]), conv_bn_relu(chans[0], chans[0]))]
        )
        self.down.extend(
            nn.Sequential(
                nn.MaxPool2d(2),
                conv_bn_relu(chans[i], chans[i + 1]),
                conv_bn_relu(chans[i + 1], chans[i + 1]),
            )
            for i in range(depth)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.merge = nn.ModuleList(
            nn.Sequential(conv_bn_relu(2 * chans[i], chans[i]), conv_bn_relu(chans[i], chans[i]))
            for i in reversed(range(depth))
        )
        self.context = nn.ModuleList(
            StripPool(chans[i]) if strip_pool else nn.Identity() for i in reversed(range(depth))
        )
        if fine_width:
            self.fine = conv_bn_relu(3, fine_width)
            self.fine_merge = conv_bn_relu(chans[0] + fine_width, fine_width)
        self.head = nn.Conv2d(fine_width or chans[0], num_classes, 1)

    def forward(self, x):
        if self.fine_width:
            coarse = self.features(F.avg_pool2d(x, self.downsample))
            coarse = F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=False)
            joined = torch.cat([self.fine(x), coarse], dim=1)
            return float32_layer(self.head, self.fine_merge(joined))
        if self.downsample > 1:
            size = x.shape[-2:]
            scores = self.unet(F.avg_pool2d(x, self.downsample))
            return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        return self.unet(x)

    def unet(self, x):
        return float32_layer(self.head, self.features(x))

    def features(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for up, merge, context in zip(self.up, self.merge, self.context):
            x = context(merge(torch.cat([up(x), skips.pop()], dim=1)))
        return x


class FlipAverage(nn.Module):
    """Test-time augmentation: the mean of the scores of each image and of its mirror image
    (segmentation scores are mirrored back first). Both improved recipes train on left-right
    flips, so the two views err differently; it costs one more forward pass. ``scales``
    (segmentation only): the same pair at each scale, the image resized bilinearly to a side
    that is a multiple of the model's size and the scores resized back; each scale s costs
    s^2 of a forward pass twice."""

    def __init__(self, model: nn.Module, scales: tuple[float, ...] = (1.0,)):
        super().__init__()
        self.model, self.size_multiple = model, getattr(model, "size_multiple", 1)
        self.scales = tuple(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for scale in self.scales:
            scores = self.flip_pair(x, scale)
            total = scores if total is None else total + scores
        return total / len(self.scales)

    def flip_pair(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        size = x.shape[-2:]
        if scale != 1:
            x = F.interpolate(x, size=scaled_size(size, scale, self.size_multiple),
                              mode="bilinear", align_corners=False)  # fmt: skip
        mirrored = self.model(x.flip(-1))
        if mirrored.dim() == 4:  # (B, C, H, W) scores: per pixel, so mirror them back
            mirrored = mirrored.flip(-1)
        scores = (self.model(x) + mirrored) / 2
        if scale != 1:
            scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        return scores


def scaled_size(size, scale: float, multiple: int) -> tuple[int, int]:
    """Each side times ``scale``, rounded to the nearest multiple of ``multiple`` (at least one)."""
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in size)


MODELS = {
    "sigmoid_cnn": (SigmoidCNN, "classification"),
    "fashion_net": (FashionNet, "classification"),
    "facade_fcn": (FacadeFCN, "segmentation"),
    "unet": (UNet, "segmentation"),
}


def tta_passes(scales) -> float:
    """Forward passes, in full-size images, of FlipAverage at these scales: an image and its
    mirror at each scale s, each costing s^2 (convolutions scale with the pixels)."""
    return 2 * sum(s * s for s in scales)


def build_model(name: str, **kwargs) -> nn.Module:
    """A network by name (see MODELS); kwargs go to its constructor (e.g. num_classes)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name][0](**kwargs)


def from_checkpoint(ckpt: dict) -> nn.Module:
    """The network a checkpoint describes, with its weights."""
    model = build_model(ckpt["model_name"], **ckpt.get("model_kwargs", {}))
    model.load_state_dict(ckpt["model"])
    return model


def models_for(task: str) -> list[str]:
    return [name for name, (_, t) in MODELS.items() if t == task]


def has_batch_norm(name: str, **kwargs) -> bool:
    """Whether network ``name`` has batch norm, which makes a batch's gradient depend on how it
    is split (no micro-batches). Built on the meta device: no memory, no random draws."""
    with torch.device("meta"):
        net = build_model(name, **kwargs)
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass on a zero input of ``input_shape``, batch
    included."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(input_shape, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops()


def image_flops(model: nn.Module, train_size: tuple, eval_size: tuple) -> dict:
    """FLOPs per image of a training step (forward + backward, the backward counted as 2x the
    forward, as is usual) at ``train_size`` = (H, W), and of an evaluation at ``eval_size``."""
    return {
        "train": 3 * forward_flops(model, (1, 3, *train_size)),
        "val": forward_flops(model, (1, 3, *eval_size)),
    }
