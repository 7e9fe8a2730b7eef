"""The naive pipelines that benchmark.py measures ours against, written as a first
implementation would be.

  Part 1: a torchvision-style Dataset (uint8 -> PIL -> ToTensor -> Normalize per sample) and a
  DataLoader.
  Part 2: batch size 1 with one-hot (5, H, W) int64 labels, fp32, for training and evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class NaiveFashion(torch.utils.data.Dataset):
    """What torchvision's FashionMNIST + ToTensor + Normalize does: one PIL image per sample."""

    def __init__(self, images, labels, mean, std):
        from torchvision import transforms

        self.images, self.labels = images.numpy(), labels.numpy()
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(mean, std)]
        )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i, 0], mode="L")), int(self.labels[i])


class NaiveFacade(torch.utils.data.Dataset):
    """The reference's style: HWC float arrays normalised per sample, one-hot (C, H, W) int64
    labels."""

    def __init__(self, images, labels, mean, std):
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels, self.mean, self.std = labels.numpy(), np.array(mean), np.array(std)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = (self.images[i] / 255.0 - self.mean) / self.std
        onehot = (np.arange(5)[:, None, None] == self.labels[i][None]).astype(np.int64)
        return torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32)), torch.from_numpy(onehot)


def naive_train(model, loader, device, steps: int, onehot: bool) -> int:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen = 0
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        x, y = x.to(device), y.to(device)
        if onehot:
            y = y.argmax(1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(x)
    return seen


@torch.no_grad()
def naive_eval(model, loader, device, steps: int) -> int:
    model.eval()
    seen = 0
    for step, (x, _) in enumerate(loader):
        if step >= steps:
            break
        model(x.to(device)).cpu()
        seen += len(x)
    return seen
