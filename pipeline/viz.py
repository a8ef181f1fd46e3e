"""Image grids for eyes: shards, reconstructions, samples."""
from __future__ import annotations

import numpy as np


def make_grid(images: list[np.ndarray] | np.ndarray, columns: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """HWC uint8 images (same size) -> one HWC uint8 grid, row-major, white padding."""
    images = [np.asarray(i) for i in images]
    if not images:
        raise ValueError("no images to put in a grid")
    height, width = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, np.uint8)
    for n, image in enumerate(images):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        r, c = divmod(n, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top:top + height, left:left + width] = image[:, :, :3]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid
