"""Multi-crop views for self-distillation (DINO): two large global crops and several small local crops of each
image, each randomly resized-cropped, flipped and jittered in brightness and contrast (no hue or saturation
jitter: it would put colour into grey data)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MultiCrop:
    global_size: int
    local_size: int
    local_crops: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)   # DINO's: fraction of the image area a crop covers
    local_scale: tuple[float, float] = (0.05, 0.4)
    jitter: float = 0.4                               # brightness and contrast factors drawn from 1 +- jitter


def crop_box(height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering a `scale` fraction of the area at a random aspect ratio;
    after 10 draws that do not fit, the centred largest square (as torchvision does)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draws = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(draws[2] * (height - h + 1)), int(draws[3] * (width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def resized_crop(images: torch.Tensor, size: int, scale: tuple[float, float], jitter: float,
                 generator: torch.Generator) -> torch.Tensor:
    """One random view (B, C, size, size) of float images (B, C, H, W) in [0, 1]."""
    batch, _, height, width = images.shape
    views = []
    for index in range(batch):
        top, left, h, w = crop_box(height, width, scale, generator)
        view = F.interpolate(images[index:index + 1, :, top:top + h, left:left + w], size=(size, size),
                             mode="bilinear", antialias=True, align_corners=False)
        views.append(view.flip(-1) if float(torch.rand(1, generator=generator)) < 0.5 else view)
    views = torch.cat(views)
    if jitter > 0:
        factors = 1 + jitter * (2 * torch.rand(2, batch, 1, 1, 1, generator=generator) - 1)
        mean = views.mean(dim=(1, 2, 3), keepdim=True)
        views = (views - mean) * factors[1] + mean * factors[0]
    return views.clamp(0, 1)


def multi_crop(images: torch.Tensor, crops: MultiCrop,
               generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two global and `crops.local_crops` local views of each image, as float (B, C, size, size) in [0, 1]."""
    global_views = [resized_crop(images, crops.global_size, crops.global_scale, crops.jitter, generator)
                    for _ in range(2)]
    local_views = [resized_crop(images, crops.local_size, crops.local_scale, crops.jitter, generator)
                   for _ in range(crops.local_crops)]
    return global_views, local_views
