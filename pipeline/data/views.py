"""The fixed views pretokenize stores per image: the plain center crop, its mirror, and ten-crop style
corner crops. A view's id is part of the Parquet contract, so ids never change once given."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.transforms import center, to_float

VIEW_IDS: dict[str, int] = {
    "plain": 0, "hflip": 1,
    "crop_tl": 2, "crop_tr": 3, "crop_bl": 4, "crop_br": 5,
    "crop_tl_hflip": 6, "crop_tr_hflip": 7, "crop_bl_hflip": 8, "crop_br_hflip": 9,
}


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, C, H, W) in [0, 1] -> uint8 (B, H, W, C)."""
    return images.mul(255).round_().clamp_(0, 255).byte().permute(0, 2, 3, 1).contiguous().numpy()


def cut_view(images: np.ndarray, view: str, size: int, crop_scale: float = 1.125) -> np.ndarray:
    """uint8 (B, H, W, C) -> uint8 (B, size, size, C). Stays uint8 when no resize is needed, so the plain
    view of an image already at `size` is bit-identical to the stored image."""
    if view not in VIEW_IDS:
        raise ValueError(f"unknown view '{view}'; views: {', '.join(VIEW_IDS)}")
    flip = view.endswith("hflip")
    corner = view.split("_")[1] if view.startswith("crop_") else None
    height, width = images.shape[1:3]
    if corner is None:
        if height == width == size:
            out = images
        else:
            out = _to_uint8(center(to_float(torch.from_numpy(np.ascontiguousarray(images))), size))
    else:
        big = max(size + 1, round(size * crop_scale))
        scaled = images if height == width == big else _to_uint8(
            center(to_float(torch.from_numpy(np.ascontiguousarray(images))), big))
        top = 0 if corner[0] == "t" else big - size
        left = 0 if corner[1] == "l" else big - size
        out = scaled[:, top:top + size, left:left + size]
    if flip:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)
