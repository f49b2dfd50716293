"""Load an image from whatever a user hands us and return a fully decoded RGB Pillow image.

Every failure (missing or corrupt file, non-image bytes, zero size, decompression bomb, unsupported mode)
raises `ivl.errors.ImageError` naming the input and the reason, so a bad request never crashes a server.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ivl.errors import ImageError

#: Same as Pillow's decompression-bomb *error* threshold (2 x Image.MAX_IMAGE_PIXELS by default).
DEFAULT_MAX_PIXELS = 178_956_970

#: What `load_image` accepts: a path, raw encoded bytes, a ``data:`` URL, a Pillow image or an array.
ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

_EXIF_ORIENTATION = 0x0112
_POOL_PREFIX = "ivl-image"
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)


def describe_source(source: Any) -> str:
    """A short human-readable name for an image input, used in error messages."""
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if isinstance(source, str):
        if source.startswith("data:"):
            return f"data URL ({source[:30]}..., {len(source)} chars)"
        return source if len(source) <= 200 else source[:200] + "..."
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image mode={source.mode} size={source.size}>"
    if isinstance(source, np.ndarray):
        return f"<array shape={source.shape} dtype={source.dtype}>"
    return f"<{type(source).__name__}>"


def load_image(
    source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode ``source`` into an RGB image with EXIF orientation applied.

    ``max_pixels`` (width x height) is checked from the header, before the pixels are decoded; ``None``
    disables our check (Pillow's own bomb check still applies to encoded files). ``name`` overrides the
    input's description in error messages.
    """
    label = name or describe_source(source)
    try:
        if isinstance(source, Image.Image):
            image = source
            _check_size(image.size, max_pixels, label)
            image.load()
        elif isinstance(source, np.ndarray) or (hasattr(source, "__array__") and not isinstance(source, (str, bytes))):
            return _from_array(np.asarray(source), max_pixels, label)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image = _decode(io.BytesIO(bytes(source)), max_pixels, label)
        elif isinstance(source, str) and source.startswith("data:"):
            image = _decode(io.BytesIO(_data_url_bytes(source, label)), max_pixels, label)
        elif isinstance(source, (str, os.PathLike)):
            image = _open_path(source, max_pixels, label)
        else:
            raise ImageError(f"cannot load an image from {label}: unsupported input type {type(source).__name__}")
        return to_rgb(apply_exif_orientation(image))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {label} is too large: {exc}") from exc
    except MemoryError as exc:
        raise ImageError(f"image {label} does not fit in memory") from exc
    except Exception as exc:
        raise ImageError(f"image {label} cannot be decoded: {type(exc).__name__}: {exc}") from exc


def load_images(sources: Sequence[ImageSource], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """`load_image` for several inputs; decoding runs on the shared pool (Pillow's codecs release the GIL)."""
    if len(sources) <= 1 or in_worker():
        return [load_image(source, max_pixels=max_pixels) for source in sources]
    futures = [worker_pool().submit(load_image, source, max_pixels=max_pixels) for source in sources]
    return [future.result() for future in futures]


@functools.lru_cache(maxsize=1)
def worker_pool() -> ThreadPoolExecutor:
    """The shared thread pool for image work. Only leaf tasks (a decode, a resize) run on it, never tasks
    that wait for other tasks, so a bounded pool cannot deadlock."""
    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix=_POOL_PREFIX)


def in_worker() -> bool:
    """True on a pool thread: work submitted from there runs inline, so nested use cannot deadlock."""
    return threading.current_thread().name.startswith(_POOL_PREFIX)


# A forked child (DataLoader worker) inherits the pool object but not its threads: start a fresh one there.
os.register_at_fork(after_in_child=worker_pool.cache_clear)


def _check_size(size: tuple[int, int], max_pixels: int | None, label: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image {label} has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image {label} has {width}x{height} = {width * height} pixels, above the limit of {max_pixels} "
            "(possible decompression bomb; raise max_pixels to accept it)"
        )


def _decode(stream: io.IOBase, max_pixels: int | None, label: str) -> Image.Image:
    try:
        image = Image.open(stream)
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"{label} is not a recognised image file") from exc
    _check_size(image.size, max_pixels, label)
    image.load()  # decodes now, while the stream is still open; truncated data raises here
    return image


def _open_path(path: str | os.PathLike, max_pixels: int | None, label: str) -> Image.Image:
    if isinstance(path, str) and path.startswith(("http://", "https://")):
        raise ImageError(f"{label}: remote URLs are not fetched by load_image; download the file first")
    file = Path(path).expanduser()
    if not file.exists():
        raise ImageError(f"image file {label} does not exist")
    if not file.is_file():
        raise ImageError(f"image path {label} is not a file")
    with open(file, "rb") as handle:
        return _decode(handle, max_pixels, label)


def _data_url_bytes(url: str, label: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError(f"{label} is not a valid data URL (no comma)")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"{label} has an invalid base64 payload") from exc
    return urllib.parse.unquote_to_bytes(payload)


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF orientation tag (phones store portrait photos sideways)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # broken EXIF blocks are common; the pixels are still usable
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def to_rgb(image: Image.Image, background: tuple[int, int, int] = _WHITE) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha is composited over ``background``, 16/32-bit and float are rescaled."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA") if mode not in ("RGBa", "La") else _unpremultiply(image)
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I") or mode.startswith("F"):
        return Image.fromarray(_to_uint8(np.asarray(image), f"mode {mode}"), "L").convert("RGB")
    if mode == "LAB":
        return _lab_to_rgb(image)
    return image.convert("RGB")


def _unpremultiply(image: Image.Image) -> Image.Image:
    # Pillow has no La -> LA conversion; go through RGBa, which it does support.
    return (image.convert("RGBa") if image.mode == "La" else image).convert("RGBA")


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(image, transform)


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Map a gray/colour array of any numeric dtype to uint8 without clipping away its content."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{what} contains NaN or infinite values")
        scale = 255.0 if array.size and array.min() >= 0 and array.max() <= 1.0 else 1.0
        return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0:
            raise ImageError(f"{what} has negative values (min {low})")
        if high <= 255:
            return array.astype(np.uint8)
        if high <= 65535:  # 16-bit data: 65535 -> 255
            return np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)
        return np.rint(array.astype(np.float64) * (255.0 / high)).astype(np.uint8)
    raise ImageError(f"{what} has unsupported dtype {array.dtype}")


def _from_array(array: np.ndarray, max_pixels: int | None, label: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"image {label}: expected an array of shape HxW, HxWx3 or HxWx4, got {array.shape}")
    height, width = array.shape[:2]
    _check_size((width, height), max_pixels, label)
    data = np.ascontiguousarray(_to_uint8(array, f"image {label}"))
    if data.ndim == 2:
        return Image.fromarray(data, "L").convert("RGB")
    if data.shape[-1] == 4:
        return to_rgb(Image.fromarray(data, "RGBA"))
    return Image.fromarray(data, "RGB")
