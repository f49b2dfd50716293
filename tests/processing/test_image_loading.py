"""load_image: every input kind, EXIF orientation, every Pillow mode to RGB, and typed errors for bad input."""

from __future__ import annotations

import base64
import io
import struct
import urllib.parse
import zlib

import numpy as np
import pytest
from PIL import Image

from ivl.errors import ImageError
from ivl.processing.images import load_image


def _png(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), "RGB")


def test_every_input_kind_gives_the_same_pixels(tmp_path, picture):
    data = _png(picture)
    path = tmp_path / "p.png"
    path.write_bytes(data)
    expected = np.asarray(picture)
    sources = [
        str(path),
        path,
        data,
        bytearray(data),
        memoryview(data),
        picture,
        expected,
        "data:image/png;base64," + base64.b64encode(data).decode(),
        "data:image/png," + urllib.parse.quote_from_bytes(data),
    ]
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (40, 24)
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_exif_orientation_is_applied(picture):
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF: the stored image must be rotated 90 degrees clockwise for display
    image = load_image(_png(picture, exif=exif.tobytes()))
    assert image.size == (24, 40)
    stored = np.asarray(picture)
    shown = np.asarray(image)
    # clockwise rotation: displayed top row = stored left column read bottom-up
    np.testing.assert_array_equal(shown[0], stored[::-1, 0])
    np.testing.assert_array_equal(shown[:, -1], stored[0])


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 128))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    out = np.asarray(load_image(rgba)).astype(int)
    # a*src + (1-a)*255 with a = 128/255 -> 255, 127, 127; fully transparent -> white
    assert np.abs(out[0, 0] - [255, 127, 127]).max() <= 1
    assert out[0, 1].tolist() == [255, 255, 255]
    la = Image.new("LA", (1, 1), (0, 0))
    assert np.asarray(load_image(la))[0, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    decoded = load_image(_png(image))
    assert np.asarray(decoded)[0].tolist() == [[255, 255, 255], [0, 255, 0]]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, [77, 77, 77]),
        ("1", 1, [255, 255, 255]),
        ("CMYK", (255, 0, 0, 0), [0, 255, 255]),
        ("I;16", 65535, [255, 255, 255]),
        ("I;16", 32896, [128, 128, 128]),
        ("I", 257 * 100, [100, 100, 100]),
        ("F", 0.5, [128, 128, 128]),
        ("YCbCr", (255, 128, 128), [255, 255, 255]),
        ("HSV", (0, 255, 255), [255, 0, 0]),
        ("LAB", (0, 128, 128), [0, 0, 0]),
    ],
)
def test_modes_convert_sensibly(mode, value, expected):
    image = Image.new(mode, (3, 2), value)
    out = np.asarray(load_image(image)).astype(int)
    assert out.shape == (2, 3, 3)
    assert np.abs(out - expected).max() <= 2, out[0, 0]


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((2, 3), 200, np.uint8), [200, 200, 200]),
        (np.full((2, 3, 1), 9, np.uint8), [9, 9, 9]),
        (np.ones((2, 3), bool), [255, 255, 255]),
        (np.full((2, 3, 3), 65535, np.uint16), [255, 255, 255]),
        (np.full((2, 3, 3), 0.25, np.float32), [64, 64, 64]),
        (np.full((2, 3, 3), 100.4, np.float64), [100, 100, 100]),
        (np.dstack([np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3), np.uint8)]), [255, 255, 255]),  # alpha 0
    ],
)
def test_arrays(array, expected):
    out = np.asarray(load_image(array))
    assert out.shape == (2, 3, 3)
    assert (out == np.array(expected, np.uint8)).all()


def test_channels_first_array():
    chw = np.stack([np.full((2, 5), v, np.uint8) for v in (1, 2, 3)])  # (3, 2, 5): only CHW makes sense
    out = np.asarray(load_image(chw))
    assert out.shape == (2, 5, 3) and (out == [1, 2, 3]).all()


def _corrupt_inputs(picture):
    png = _png(picture)
    jpeg_buf = io.BytesIO()
    picture.save(jpeg_buf, format="JPEG")
    jpeg = jpeg_buf.getvalue()
    return {
        "truncated png": png[: len(png) // 2],
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "not an image": b"hello, I am a text file" * 10,
        "empty": b"",
        "nan": np.full((2, 2, 3), np.nan, np.float32),
        "zero size array": np.zeros((0, 4, 3), np.uint8),
        "zero size pil": Image.new("RGB", (0, 4)),
        "bad shape": np.zeros((2, 2, 5), np.uint8),
        "bad base64": "data:image/png;base64,@@@@",
        "data url without comma": "data:image/png;base64",
        "remote url": "https://example.com/cat.png",
        "wrong type": 3.5,
    }


def test_bad_input_raises_image_error(picture):
    for reason, source in _corrupt_inputs(picture).items():
        with pytest.raises(ImageError):
            load_image(source)
        # the typed error is also a ValueError, so generic handlers keep working
        assert issubclass(ImageError, ValueError), reason


def test_errors_name_the_file(tmp_path, picture):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match=r"nope\.png"):
        load_image(missing)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(_png(picture)[:60])
    with pytest.raises(ImageError, match=r"broken\.jpg"):
        load_image(broken)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which carries almost no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_before_decoding(picture):
    # 12000 x 12000 = 144 MP: below Pillow's own error threshold, above our configured limit
    bomb = _png_header_only(12000, 12000)
    with pytest.raises(ImageError, match="above the limit of 100000000"):
        load_image(bomb, max_pixels=100_000_000)
    with pytest.raises(ImageError, match="limit"):
        load_image(picture, max_pixels=100)  # 40 x 24 = 960 pixels
    with pytest.raises(ImageError, match="limit"):
        load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=399)
    assert load_image(picture, max_pixels=960).size == (40, 24)
    with pytest.raises(ImageError):  # beyond Pillow's own bomb threshold: still our typed error
        load_image(_png_header_only(20000, 20000))
