"""Seeded, per-image training augmentation on uint8 tensors (the views extract caches)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as F


def augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(S, S, 3) uint8 → (S, S, 3) uint8: random resized crop, flip, brightness/contrast."""
    size = image.shape[0]
    chw = image.permute(2, 0, 1)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    area = uniform(0.55, 1.0) * size * size
    ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(size, round(math.sqrt(area * ratio)))
    h = min(size, round(math.sqrt(area / ratio)))
    top = int(uniform(0, size - h + 1))
    left = int(uniform(0, size - w + 1))
    out = F.resized_crop(chw, top, left, h, w, [size, size], antialias=True)
    if uniform(0, 1) < 0.5:
        out = F.horizontal_flip(out)
    out = F.adjust_brightness(out, uniform(0.75, 1.25))
    out = F.adjust_contrast(out, uniform(0.75, 1.25))
    return out.permute(1, 2, 0).contiguous()
