"""The fixed views pretokenize stores per image: the plain center crop, its mirror, and ten-crop style
corner crops. A view's id is part of the Parquet contract, so ids never change once given.

Torch is imported only where a view needs resizing: the pretokenize CPU tasks run this module, and a
worker that imports torch pays seconds of CPU the encoder actor could have had."""
from __future__ import annotations

import numpy as np

VIEW_IDS: dict[str, int] = {
    "plain": 0, "hflip": 1,
    "crop_tl": 2, "crop_tr": 3, "crop_bl": 4, "crop_br": 5,
    "crop_tl_hflip": 6, "crop_tr_hflip": 7, "crop_bl_hflip": 8, "crop_br_hflip": 9,
}


def _centered(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, H, W, C) resized and center-cropped exactly as the tokenizer's input transform does."""
    import torch

    from pipeline.data.transforms import center, to_float

    scaled = center(to_float(torch.from_numpy(np.ascontiguousarray(images))), size)
    return scaled.mul(255).round_().clamp_(0, 255).byte().permute(0, 2, 3, 1).contiguous().numpy()


def as_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W) grey, as decoded without a channel axis, or (B, H, W, C) -> (B, H, W, C)."""
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


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
            out = _centered(images, size)
    else:
        big = max(size + 1, round(size * crop_scale))
        scaled = images if height == width == big else _centered(images, big)
        top = 0 if corner[0] == "t" else big - size
        left = 0 if corner[1] == "l" else big - size
        out = scaled[:, top:top + size, left:left + size]
    if flip:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def shard_of_url(url: str) -> str:
    """`.../shards/train/shard-000003.tar` (any filesystem) -> `train/shard-000003.tar`, as manifests list it."""
    return "/".join(url.replace("\\", "/").rsplit("/", 2)[-2:])


def view_rows(batch: dict[str, np.ndarray], views: list[str], size: int, crop_scale: float,
              group_of_shard: dict[str, int]) -> dict:
    """Ray Data batch step: one row per (image, view), each view at the tokenizer's input size, tagged with
    the `piece` (group of shards) its shard belongs to. Rows stay grouped by piece, in piece order."""
    images = as_rgb(np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"])
    pieces = np.array([group_of_shard[shard_of_url(url)] for url in batch["shard"]], np.int32)
    out = {"key": [], "label": [], "view": [], "piece": [], "image": []}
    for view in views:
        out["image"].append(cut_view(images, view, size, crop_scale))
        out["key"].append(batch["key"])
        out["label"].append(np.asarray(batch["label"], np.int32))
        out["view"].append(np.full(len(images), VIEW_IDS[view], np.int8))
        out["piece"].append(pieces)
    # A batch can span two pieces: keep each piece's rows together so they leave in shard order.
    order = np.argsort(np.concatenate(out["piece"]), kind="stable")
    return {name: np.concatenate(parts)[order] for name, parts in out.items()}
