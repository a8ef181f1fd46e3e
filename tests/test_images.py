import io

import numpy as np
import pytest
from PIL import Image

from imagegen import jpeg, odd_files, picture, png
from pipeline.data.images import BadImage, decode, encode, resize_center_crop


@pytest.mark.parametrize("name", ["cmyk.JPEG", "gray.JPEG", "alpha_png.JPEG", "palette.JPEG"])
def test_odd_modes_decode_to_rgb(name):
    image = decode(odd_files(1)[name])
    assert image.mode == "RGB" and image.size == (48, 40)


@pytest.mark.parametrize("name,reason", [("corrupt.JPEG", "not_an_image"), ("truncated.JPEG", "truncated"),
                                         ("empty.JPEG", "empty")])
def test_broken_files_raise_with_a_reason(name, reason):
    with pytest.raises(BadImage) as error:
        decode(odd_files(1)[name])
    assert error.value.reason == reason


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode(png(rgba))).min() == 255


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    array = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)
    image = decode(png(Image.fromarray(array)))
    values = np.asarray(image)[..., 0]
    assert values.max() >= 250 and values.min() == 0 and len(np.unique(values)) > 32


def test_exif_orientation_is_applied():
    source = picture(3, size=(60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = decode(jpeg(source, exif=exif.tobytes()))
    assert rotated.size == (30, 60)


def test_resize_center_crop_shapes():
    image = picture(0, size=(500, 375))
    assert resize_center_crop(image, 256).size == (256, 256)
    assert resize_center_crop(picture(0, size=(28, 28)), 32).size == (32, 32)
    assert resize_center_crop(image, None).size == (500, 375)


def test_png_round_trip_is_lossless_and_jpeg_is_close():
    image = picture(5)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode(image, "png")))), np.asarray(image))
    back = np.asarray(Image.open(io.BytesIO(encode(image, "jpg", 95))), dtype=float)
    assert np.abs(back - np.asarray(image, dtype=float)).mean() < 4
