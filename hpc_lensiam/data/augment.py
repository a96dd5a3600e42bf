"""Baseline SimSiam augmentations (crop, flip, jitter, blur), batched on the device: one call per batch.

``augment(x, generator)`` draws every random number for the whole batch at once and applies:

1. random resized crop, area scale U(0.2, 1), aspect ratio log-U(3/4, 4/3), output at the input
   size: one ``affine_grid`` + ``grid_sample`` (bilinear) for the batch;
2. horizontal flip with p = 0.5, folded into the same affine transform;
3. brightness and contrast jitter (factors U(0.6, 1.4), torchvision ``ColorJitter(0.4, 0.4)``)
   applied together with p = 0.8; contrast pivots on each image's mean. No clamp: lens images carry
   Gaussian noise below zero, and max-normalised images stay O(1);
4. Gaussian blur with p = 0.5, sigma U(0.1, 2.0) px, kernel ~10% of the image side (as SimSiam's
   23 px at 224), one grouped separable convolution for the batch.

All of it is tensor ops on ``x``'s device (the GPU in a CUDA run), so the baseline is not
loader-bound. A ``torch.Generator`` on that device makes it reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.4  # brightness and contrast factors in [1 - JITTER, 1 + JITTER]
JITTER_P = 0.8
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)


def _uniform(n: int, lo: float, hi: float, g, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def random_resized_crop_flip(x: torch.Tensor, g=None) -> torch.Tensor:
    n, device = x.shape[0], x.device
    area = _uniform(n, *CROP_SCALE, g, device)
    log_ratio = _uniform(n, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), g, device)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width and height, fractions of the image
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - w)  # centre, in [-1, 1] coords
    cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def brightness_contrast(x: torch.Tensor, g=None) -> torch.Tensor:
    n, device = x.shape[0], x.device
    apply = (torch.rand(n, generator=g, device=device) < JITTER_P).float()
    b = 1 + apply * _uniform(n, -JITTER, JITTER, g, device)
    c = 1 + apply * _uniform(n, -JITTER, JITTER, g, device)
    x = x * b.view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c.view(n, 1, 1, 1) + mean


def gaussian_blur(x: torch.Tensor, g=None) -> torch.Tensor:
    n, ch, H, W = x.shape
    device = x.device
    size = max(3, int(0.1 * min(H, W)) // 2 * 2 + 1)
    sigma = _uniform(n, *BLUR_SIGMA, g, device)
    apply = torch.rand(n, generator=g, device=device) < BLUR_P
    t = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)
    identity = torch.zeros(size, device=device)
    identity[size // 2] = 1
    k = torch.where(apply[:, None], k, identity).to(x.dtype)  # (n, size): p=0.5 of the batch
    k = k.repeat_interleave(ch, dim=0)  # one kernel per (image, channel)
    y = x.reshape(1, n * ch, H, W)
    y = F.pad(y, (size // 2,) * 4, mode="reflect")
    y = F.conv2d(y, k.view(n * ch, 1, size, 1), groups=n * ch)  # vertical
    y = F.conv2d(y, k.view(n * ch, 1, 1, size), groups=n * ch)  # horizontal
    return y.reshape(n, ch, H, W)


@torch.no_grad()
def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random SimSiam view of every image of ``x`` (N, C, H, W), batched on ``x.device``."""
    x = random_resized_crop_flip(x, generator)
    x = brightness_contrast(x, generator)
    return gaussian_blur(x, generator)


def make_pair(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline SimSiam positive pair: two independent augmentations of the same images."""
    return augment(x, generator), augment(x, generator)
