"""Robust image decoding to RGB, shorter-side resize + center crop, and re-encoding.

Every failure becomes a `BadImage` with a short reason, so callers can skip and count it.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to count, not grey pixels
Image.MAX_IMAGE_PIXELS = 200_000_000  # ImageNet's largest is ~ 36 MP; beyond this is a bomb


class BadImage(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale modes scaled (not clipped) into 0..255."""
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
    return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _to_8bit(image).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode(data: bytes) -> Image.Image:
    """Bytes -> RGB image with EXIF orientation applied, or BadImage."""
    if not data:
        raise BadImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError as error:
        raise BadImage("not_an_image", str(error)[:200]) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage("too_large", str(error)[:200]) from None
    except OSError as error:
        reason = "truncated" if "truncated" in str(error).lower() else "decode_error"
        raise BadImage(reason, str(error)[:200]) from None
    except (ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError) as error:
        raise BadImage("decode_error", f"{type(error).__name__}: {str(error)[:200]}") from None
    try:
        return to_rgb(image)
    except Exception as error:  # noqa: BLE001 - an exotic mode PIL cannot convert
        raise BadImage("decode_error", f"mode {image.mode}: {str(error)[:200]}") from None


def resize_center_crop(image: Image.Image, resolution: int | None) -> Image.Image:
    """Shorter side to `resolution` (antialiased bicubic), then the centered square; None keeps it."""
    if resolution is None:
        return image
    width, height = image.size
    scale = resolution / min(width, height)
    if scale != 1.0:
        new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(new_size, Image.BICUBIC, reducing_gap=3.0)
        width, height = image.size
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def encode(image: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    elif image_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        raise ValueError(f"unknown image format {image_format!r}; allowed: jpg, png")
    return buffer.getvalue()
