"""Seeded training augmentation of whole uint8 batches, on whatever device the batch is on.

Random resized crop, horizontal flip, brightness and contrast, each image its own draw. The crop
and flip are one affine map per image, so the batch is resampled by a single
`affine_grid` + `grid_sample` (what kornia does), and brightness/contrast are batched
elementwise ops: no per-image Python loop and no host round trip, so on a GPU the views are made
where the backbone runs. torchvision.transforms.v2 on a batched tensor would draw one set of
parameters for the whole batch, which is not augmentation. The draws come from a CPU generator
in one call per batch, so a seed gives the same crops, flips and factors on every device (the
resampled pixels can still differ by one grey level between devices: float kernels differ).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

CROP_AREA = (0.55, 1.0)  # fraction of the image the crop keeps
CROP_RATIO = (3 / 4, 4 / 3)
BRIGHTNESS = (0.75, 1.25)
CONTRAST = (0.75, 1.25)


def draw(n: int, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-image parameters for n images of size×size, on the CPU: crop boxes in pixels, flips,
    brightness and contrast factors. Seven float32 draws per image, in the order a per-image
    loop of scalar draws makes them, so a seed gives the views it gave before batching."""
    u = torch.rand((n, 7), generator=generator).double()

    def between(column: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * u[:, column]

    area = between(0, *CROP_AREA) * size * size
    ratio = torch.exp(between(1, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    w = torch.sqrt(area * ratio).round().clamp(max=size)
    h = torch.sqrt(area / ratio).round().clamp(max=size)
    return {
        "top": torch.floor(between(2, 0, 1) * (size - h + 1)),
        "left": torch.floor(between(3, 0, 1) * (size - w + 1)),
        "height": h,
        "width": w,
        "flip": between(4, 0, 1) < 0.5,
        "brightness": between(5, *BRIGHTNESS),
        "contrast": between(6, *CONTRAST),
    }


def crop_flip_theta(p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """(n, 2, 3) affine maps from output to input coordinates (align_corners=False): output
    [-1, 1] spans the crop box, mirrored where the image is flipped."""
    sx = p["width"] / size * torch.where(p["flip"], -1.0, 1.0).double()
    sy = p["height"] / size
    cx = (2 * p["left"] + p["width"]) / size - 1
    cy = (2 * p["top"] + p["height"]) / size - 1
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)


def crop_grid(p: dict[str, torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """(n, S, S, 2) sampling grid of the crops, held inside each crop's outermost pixel centres:
    a resize of the cropped image never reads a pixel beyond the crop."""
    n = len(p["top"])
    theta = crop_flip_theta(p, size).float().to(device, non_blocking=True)
    grid = functional.affine_grid(theta, [n, 3, size, size], align_corners=False)
    edges = torch.stack([  # (n, 4): x low/high, y low/high, normalised
        (2 * p["left"] + 1) / size - 1, (2 * (p["left"] + p["width"]) - 1) / size - 1,
        (2 * p["top"] + 1) / size - 1, (2 * (p["top"] + p["height"]) - 1) / size - 1,
    ], 1).float().to(device, non_blocking=True)
    x = torch.maximum(torch.minimum(grid[..., 0], edges[:, 1, None, None]), edges[:, 0, None, None])
    y = torch.maximum(torch.minimum(grid[..., 1], edges[:, 3, None, None]), edges[:, 2, None, None])
    return torch.stack([x, y], -1)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, S, S, 3) uint8 → (B, S, S, 3) uint8 on the same device, each image augmented.

    The arithmetic is torchvision's on uint8 images — the crop rounded, brightness and contrast
    each truncated to whole grey levels, contrast around the floored grey mean — so the views
    are those the per-image torchvision ops make (tests/test_augment.py), made in one pass.
    """
    n, size = images.shape[0], images.shape[1]
    p = draw(n, size, generator)
    device = images.device

    def per_image(values: torch.Tensor) -> torch.Tensor:  # (B,) → (B, 1, 1, 1) on the device
        return values.float().to(device, non_blocking=True).view(n, 1, 1, 1)

    x = images.permute(0, 3, 1, 2).float()  # (B, 3, S, S), 0..255
    x = functional.grid_sample(x, crop_grid(p, size, device), mode="bilinear", padding_mode="border",
                               align_corners=False).round_().clamp_(0, 255)
    x = (x * per_image(p["brightness"])).clamp_(0, 255).floor_()
    gray = (x[:, 0] * 0.2989 + x[:, 1] * 0.587 + x[:, 2] * 0.114).floor_()  # (B, S, S)
    mean = gray.mean((1, 2)).view(n, 1, 1, 1)
    contrast = per_image(p["contrast"])
    x = (x * contrast + mean * (1 - contrast)).clamp_(0, 255).floor_()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
