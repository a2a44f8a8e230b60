"""augment_batch: one batched resample per batch, the same pixels as torchvision's per-image ops."""

from __future__ import annotations

import torch
from torch.nn import functional
from torchvision.transforms.v2 import functional as F

from pipeline.data import augment


def _images(n: int = 12, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def test_crop_and_flip_match_torchvision_resized_crop_away_from_the_crop_edge():
    images = _images()
    n, size = images.shape[:2]
    p = augment.draw(n, size, torch.Generator().manual_seed(0))
    x = images.permute(0, 3, 1, 2).float()
    grid = functional.affine_grid(augment.crop_flip_theta(p, size).float(), [n, 3, size, size], align_corners=False)
    ours = functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert p["flip"].any() and not p["flip"].all() and (p["width"] < size).any()
    for i in range(n):
        box = [int(p[key][i]) for key in ("top", "left", "height", "width")]
        reference = F.resized_crop(x[i], *box, [size, size], antialias=False)
        if p["flip"][i]:
            reference = F.horizontal_flip(reference)
        # at the crop's edge torchvision clamps to the crop, ours reads the pixel beyond it
        assert (ours[i] - reference)[:, 3:-3, 3:-3].abs().max() < 0.01


def test_brightness_and_contrast_match_torchvision_on_the_resampled_image():
    images = _images(6)
    n, size = images.shape[:2]
    out = augment.augment_batch(images, torch.Generator().manual_seed(1))
    p = augment.draw(n, size, torch.Generator().manual_seed(1))
    x = images.permute(0, 3, 1, 2).float()
    grid = functional.affine_grid(augment.crop_flip_theta(p, size).float(), [n, 3, size, size], align_corners=False)
    resampled = functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False) / 255
    for i in range(n):
        expected = F.adjust_contrast(F.adjust_brightness(resampled[i], float(p["brightness"][i])),
                                     float(p["contrast"][i]))
        got = out[i].permute(2, 0, 1).float() / 255
        assert (got - expected).abs().max() <= 0.5 / 255 + 1e-4  # uint8 rounding only


def test_seeded_per_image_and_shape_preserving():
    images = _images()
    first = augment.augment_batch(images, torch.Generator().manual_seed(7))
    again = augment.augment_batch(images, torch.Generator().manual_seed(7))
    other = augment.augment_batch(images, torch.Generator().manual_seed(8))
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    same = augment.augment_batch(images[:1].expand(8, -1, -1, -1).contiguous(), torch.Generator().manual_seed(7))
    assert len({bytes(view.numpy().tobytes()) for view in same}) == 8  # each image its own draw
