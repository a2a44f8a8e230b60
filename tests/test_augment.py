"""augment_batch: one batched pass per batch, the views torchvision's per-image ops make."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional
from torchvision.transforms.v2 import functional as F

from pipeline.data import augment


def _images(n: int = 12, size: int = 64) -> torch.Tensor:
    """Smooth images with edges (like photos and the shapes data), not noise."""
    generator = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n):
        a, b, c = torch.rand(3, generator=generator) * 6
        r = 127 + 120 * torch.sin(xx / (4 + a)) * torch.cos(yy / (5 + b))
        g = torch.where((xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / (3 + c)) ** 2, 220.0, 30.0)
        bl = (xx + yy) * 255.0 / (2 * size)
        out.append(torch.stack([r, g, bl], -1))
    return torch.stack(out).round().clamp(0, 255).to(torch.uint8)


def per_image_reference(images: torch.Tensor, seed: int) -> torch.Tensor:
    """What augmentation was before batching: torchvision.transforms.v2 functional ops on one
    uint8 image at a time, with seven scalar draws per image from the seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    size, out = images.shape[1], []
    for image in images:
        def uniform(low, high):
            return low + (high - low) * torch.rand((), generator=generator).item()

        area = uniform(0.55, 1.0) * size * size
        ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(size, round(math.sqrt(area * ratio)))
        h = min(size, round(math.sqrt(area / ratio)))
        top, left = int(uniform(0, size - h + 1)), int(uniform(0, size - w + 1))
        view = F.resized_crop(image.permute(2, 0, 1), top, left, h, w, [size, size], antialias=True)
        if uniform(0, 1) < 0.5:
            view = F.horizontal_flip(view)
        view = F.adjust_contrast(F.adjust_brightness(view, uniform(0.75, 1.25)), uniform(0.75, 1.25))
        out.append(view.permute(1, 2, 0))
    return torch.stack(out)


def test_the_views_are_torchvisions_per_image_ones_to_a_grey_level():
    images = _images(24)
    ours = augment.augment_batch(images, torch.Generator().manual_seed(5)).int()
    reference = per_image_reference(images, 5).int()
    difference = (ours - reference).abs()
    # the only difference: torchvision resizes uint8 in fixed point, we in float (one grey level,
    # which brightness/contrast can stretch to a few)
    # (measured: 8% of values one level apart, 1.2% more than one, at most 3)
    assert float((difference > 1).float().mean()) < 0.02 and int(difference.max()) <= 4
    assert float(difference.float().mean()) < 0.15


def test_the_crop_resample_is_torchvisions_resized_crop_exactly_in_float():
    images = _images()
    n, size = images.shape[:2]
    p = augment.draw(n, size, torch.Generator().manual_seed(0))
    assert p["flip"].any() and not p["flip"].all() and (p["width"] < size).any()
    x = images.permute(0, 3, 1, 2).float()
    ours = functional.grid_sample(x, augment.crop_grid(p, size, x.device), mode="bilinear",
                                  padding_mode="border", align_corners=False)
    for i in range(n):
        box = [int(p[key][i]) for key in ("top", "left", "height", "width")]
        reference = F.resized_crop(x[i], *box, [size, size], antialias=False)
        if p["flip"][i]:
            reference = F.horizontal_flip(reference)
        assert (ours[i] - reference).abs().max() < 1e-3  # edges included: the grid stays in the crop


def test_seeded_per_image_and_shape_preserving():
    images = _images()
    first = augment.augment_batch(images, torch.Generator().manual_seed(7))
    again = augment.augment_batch(images, torch.Generator().manual_seed(7))
    other = augment.augment_batch(images, torch.Generator().manual_seed(8))
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    same = augment.augment_batch(images[:1].expand(8, -1, -1, -1).contiguous(), torch.Generator().manual_seed(7))
    assert len({np.asarray(view).tobytes() for view in same}) == 8  # each image its own draw
