"""Batched augmentation on the device: every function takes a batch (x, y), a generator and the
rows of the global batch this rank holds, and draws the random numbers for the whole global
batch, so a DDP run augments exactly as one process with the same global batch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def random_translate_flip(
    x: torch.Tensor, y: torch.Tensor, g: torch.Generator, rows: slice, total: int, pad: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each image by up to ``pad`` pixels (zero fill) and flip half of them left-right.
    Random draws cover the whole global batch (``total``); this rank uses ``rows`` of them, so
    a DDP run augments exactly as one process with the same global batch."""
    n, c, h, w = x.shape
    shifts = torch.randint(0, 2 * pad + 1, (total, 2), generator=g)[rows].to(x.device)
    flips = (torch.rand(total, generator=g) < 0.5)[rows].to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    r = (shifts[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
    col = shifts[:, 1, None] + torch.arange(w, device=x.device)
    col = torch.where(flips[:, None], col.flip(1), col)[:, None, None, :]
    out = padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        r,
        col,
    ]
    return out, y


def random_translate_flip_erase(
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Generator,
    rows: slice,
    total: int,
    area: tuple[float, float] = (0.02, 0.25),
    p: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``random_translate_flip``, then random erasing: with probability ``p`` one box of
    ``area`` of the image (aspect 1:3-3:1) is set to 0. Draws cover the global batch, as above."""
    x, y = random_translate_flip(x, y, g, rows, total)
    n, _, h, w = x.shape
    draws = torch.rand(total, 5, generator=g)[rows].to(x.device)
    box_area = (area[0] + (area[1] - area[0]) * draws[:, 0]) * h * w
    aspect = torch.exp((2 * draws[:, 1] - 1) * np.log(3))
    bh = (box_area * aspect).sqrt().clamp(1, h)
    bw = (box_area / aspect).sqrt().clamp(1, w)
    top, left = draws[:, 2] * (h - bh), draws[:, 3] * (w - bw)
    r = torch.arange(h, device=x.device)[None, :, None]
    c = torch.arange(w, device=x.device)[None, None, :]
    inside = (
        (r >= top[:, None, None])
        & (r < (top + bh)[:, None, None])
        & (c >= left[:, None, None])
        & (c < (left + bw)[:, None, None])
    )
    erase = inside & (draws[:, 4] < p)[:, None, None]
    return x.masked_fill(erase[:, None], 0), y


def random_scale_crop_flip_jitter(
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Generator,
    rows: slice,
    total: int,
    crop: int = 256,
    scale_range: tuple[float, float] = (0.6, 1.25),
    jitter: float = 0.3,
    rare_share: float = 0.0,
    rare_classes: tuple[int, ...] = (),
):
    """Segmentation augmentation in one affine resample per batch: a random box of 60-125% of the
    image side (aspect 3:4-4:3; beyond the border the image is mirrored), resized to ``crop``;
    left-right flip; brightness and contrast jitter. Images bilinear, labels nearest.
    ``rare_share`` of the boxes (where the image has any) hold a random pixel of
    ``rare_classes``, centred unless that would leave the image (nnU-Net's foreground
    oversampling). x is float (N,3,H,W) in 0-1, y (N,H,W)."""
    n = x.shape[0]
    draws = torch.rand(total, 7, generator=g)[rows].to(x.device)
    lo, hi = scale_range
    scale = lo + (hi - lo) * draws[:, 0]
    aspect = torch.exp((draws[:, 1] - 0.5) * 2 * np.log(4 / 3))
    sx, sy = scale * aspect.sqrt(), scale / aspect.sqrt()
    # Box centre: anywhere that keeps a box smaller than the image inside it; centred when larger.
    tx, ty = (
        (2 * draws[:, 2] - 1) * (1 - sx).clamp(min=0),
        (2 * draws[:, 3] - 1) * (1 - sy).clamp(min=0),
    )
    if rare_share > 0:  # drawn after the others: runs without it keep their random stream
        rare_draws = torch.rand(total, 2, generator=g)[rows].to(x.device)
        tx, ty = rare_centres(y, rare_draws, rare_share, rare_classes, (sx, sy), (tx, ty))
    flip = torch.where(draws[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, (n, 1, crop, crop), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    y = F.grid_sample(
        y[:, None].float(), grid, mode="nearest", padding_mode="reflection", align_corners=False
    )[:, 0].long()
    brightness = 1 + jitter * (2 * draws[:, 5] - 1)
    contrast = 1 + jitter * (2 * draws[:, 6] - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast[:, None, None, None] + mean * brightness[:, None, None, None]
    return x.clamp(0, 1), y


def rare_centres(y, draws, share, classes, box, centres):
    """Box centres (normalised -1..1) moved onto a pixel of ``classes`` drawn uniformly from the
    image's such pixels, for the images whose ``draws[:, 0]`` < ``share`` and that have one;
    clamped so that a box smaller than the image stays inside it."""
    n, h, w = y.shape
    rare = torch.isin(y, torch.as_tensor(classes, device=y.device)).flatten(1)
    counts = rare.sum(1)
    k = (draws[:, 1] * counts).long().clamp(max=(counts - 1).clamp(min=0))
    pixel = (rare.cumsum(1) > k[:, None]).int().argmax(1)  # the k-th rare pixel
    px = (2 * (pixel % w) + 1) / w - 1
    py = (2 * torch.div(pixel, w, rounding_mode="floor") + 1) / h - 1
    use = (draws[:, 0] < share) & (counts > 0)
    (sx, sy), (tx, ty) = box, centres
    room_x, room_y = (1 - sx).clamp(min=0), (1 - sy).clamp(min=0)
    tx = torch.where(use, torch.maximum(torch.minimum(px, room_x), -room_x), tx)
    ty = torch.where(use, torch.maximum(torch.minimum(py, room_y), -room_y), ty)
    return tx, ty
