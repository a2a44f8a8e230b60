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
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def draw(n: int, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-image parameters for n images of size×size, on the CPU: crop boxes in pixels, flips,
    brightness and contrast factors."""
    u = torch.rand((n, 7), generator=generator, dtype=torch.float64)

    def between(column: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * u[:, column]

    area = between(0, *CROP_AREA) * size * size
    ratio = torch.exp(between(1, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    w = torch.sqrt(area * ratio).round().clamp(max=size)
    h = torch.sqrt(area / ratio).round().clamp(max=size)
    return {
        "top": torch.floor(u[:, 2] * (size - h + 1)),
        "left": torch.floor(u[:, 3] * (size - w + 1)),
        "height": h,
        "width": w,
        "flip": u[:, 4] < 0.5,
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


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, S, S, 3) uint8 → (B, S, S, 3) uint8 on the same device, each image augmented."""
    n, size = images.shape[0], images.shape[1]
    p = draw(n, size, generator)
    device = images.device
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, S, S), 0..255
    theta = crop_flip_theta(p, size).float().to(device, non_blocking=True)
    grid = functional.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = p["brightness"].float().to(device, non_blocking=True).view(n, 1, 1, 1)
    x = (x * brightness).clamp_(0, 255)
    contrast = p["contrast"].float().to(device, non_blocking=True).view(n, 1, 1, 1)
    gray = torch.tensor(_GRAY, device=device).view(1, 3, 1, 1)
    mean = (x * gray).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (contrast * x + (1 - contrast) * mean).clamp_(0, 255)
    return x.round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
