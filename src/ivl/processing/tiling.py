"""Dynamic high-resolution tiling (spec §4.1-4.2) and ImageNet normalisation, the fast way.

The grid choice reproduces the official ``dynamic_preprocess`` exactly, candidate order included. The pixels
equal the plain Pillow path (resize to the grid, crop tiles, resize the original for the thumbnail), but each
image is resized once (plus its thumbnail), tiles are cut by slicing that array, and each tile is converted
and normalised by vectorised numpy straight into one preallocated ``[N, 3, S, S]`` buffer. The resizes of a
batch run on a shared thread pool, longest first (Pillow releases the GIL), while the calling thread
normalises every image as soon as its resizes are done.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ivl.errors import ConfigError
from ivl.processing.images import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    in_worker,
    load_image,
    load_images,
    to_rgb,
    worker_pool,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Grid = tuple[int, int]  # (columns, rows)


def check_tile_range(min_num: int, max_num: int) -> None:
    """Reject tile budgets the official code would silently turn into a single tile."""
    if min_num < 1 or max_num < 1:
        raise ConfigError(f"tile counts must be >= 1, got min_num={min_num}, max_num={max_num}")
    if min_num > max_num:
        raise ConfigError(f"min_num={min_num} is larger than max_num={max_num}")


@functools.lru_cache(maxsize=256)
def candidate_grids(
    min_num: int = 1, max_num: int = 12, order: Literal["official", "hf"] = "official"
) -> tuple[Grid, ...]:
    """All (cols, rows) with ``min_num <= cols*rows <= max_num``, sorted by tile count.

    Within equal tile counts the official code keeps CPython's set-iteration order (Appendix A), which we
    reproduce by building the same set the same way; ``order="hf"`` gives transformers' width-major order.
    It only changes a result when ``min_num > 1`` (spec §4.2).
    """
    if order == "official":
        pool = {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        }
        return tuple(sorted(pool, key=lambda g: g[0] * g[1]))
    if order == "hf":
        pool_hf = [(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if min_num <= i * j <= max_num]
        return tuple(sorted(pool_hf, key=lambda g: g[0] * g[1]))
    raise ConfigError(f"candidate order must be 'official' or 'hf', got {order!r}")


def closest_grid(
    width: int,
    height: int,
    *,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    order: Literal["official", "hf"] = "official",
) -> Grid:
    """The tile grid (cols, rows) the official algorithm picks for a ``width`` x ``height`` image.

    Closest aspect ratio by exact double arithmetic; on an exact tie a later (larger) grid wins only if the
    image area exceeds half of that grid's pixel area.
    """
    check_tile_range(min_num, max_num)
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num, order):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class TiledImage:
    """The tiles of one image, kept as the resized grid array plus the thumbnail (no per-tile copies).

    ``grid`` is (cols, rows); tiles are in raster order, the thumbnail (if any) last.
    """

    grid_pixels: np.ndarray  # uint8 [rows*S, cols*S, 3]
    thumbnail: np.ndarray | None  # uint8 [S, S, 3]
    grid: Grid
    image_size: int

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1] + (self.thumbnail is not None)

    @property
    def pixels(self) -> np.ndarray:
        """All tiles as one uint8 array ``[N, S, S, 3]``."""
        cols, rows = self.grid
        size = self.image_size
        tiles = self.grid_pixels.reshape(rows, size, cols, size, 3).swapaxes(1, 2).reshape(rows * cols, size, size, 3)
        if self.thumbnail is None:
            return np.ascontiguousarray(tiles)
        return np.concatenate([tiles, self.thumbnail[None]], axis=0)

    @property
    def tiles(self) -> list[Image.Image]:
        """The tiles as Pillow images (for inspection; the tensor path never builds these)."""
        return [Image.fromarray(tile, "RGB") for tile in self.pixels]

    def to_tensor(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Normalised ``[N, 3, S, S]`` tensor (see `normalize_tiled`)."""
        return normalize_tiled([self], mean, std, dtype=dtype, device=device)


_pool = worker_pool  # kept for callers that clear it after fork (no longer needed: images.py does that itself)


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """Wrap a (read-only, Pillow-owned) array without copying; we only read it, so torch's warning is noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


#: Below this much resize work (`_resize_cost`, about one 448 px tile's) a batch is resized inline: handing a
#: job to the pool costs ~0.1 ms, more than resizing a small image (8 video frames of 112 x 56 px to 56 px
#: tiles: 0.57 ms inline, 0.72 ms on the pool; docs/benchmarks.md, "Preprocessing").
MIN_PARALLEL_COST = 2.0e6


def _resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    # Pillow's default filter for RGB, like the official `img.resize(...)`; same-size returns a copy.
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC))


class _Done:
    """A finished future stand-in, for work done inline."""

    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


def _submit(image: Image.Image, size: tuple[int, int], parallel: bool) -> Future | _Done:
    if parallel and not in_worker():
        return worker_pool().submit(_resize, image, size)
    return _Done(_resize(image, size))


def _as_rgb(image: Image.Image | ImageSource) -> Image.Image:
    if isinstance(image, Image.Image):
        image.load()  # decode lazily opened files here, once: concurrent resizes must not race to load them
        return to_rgb(image)
    return load_image(image)


@dataclass(frozen=True)
class TilePlan:
    """What tiling an image will produce, known before any pixel is touched (enough to build token ids)."""

    grid: Grid
    thumbnail: bool
    image_size: int

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1] + self.thumbnail


def plan_tiles(
    size: tuple[int, int], *, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> TilePlan:
    """The grid and thumbnail the official algorithm gives a ``(width, height)`` image."""
    grid = closest_grid(*size, min_num=min_num, max_num=max_num, image_size=image_size)
    return TilePlan(grid, use_thumbnail and grid[0] * grid[1] != 1, image_size)


def _start_resizes(
    images: Sequence[Image.Image], plans: Sequence[TilePlan], parallel: bool | None
) -> list[tuple[Future | _Done, Future | _Done | None]]:
    """Submit every resize (grid and thumbnail of each image), longest first, to the shared pool."""
    requests = []  # (image index, slot: 0 grid / 1 thumbnail, target size)
    for index, plan in enumerate(plans):
        cols, rows = plan.grid
        requests.append((index, 0, (cols * plan.image_size, rows * plan.image_size)))
        if plan.thumbnail:
            requests.append((index, 1, (plan.image_size, plan.image_size)))
    costs = {(index, slot): _resize_cost(images[index].size, size) for index, slot, size in requests}
    if parallel is None:
        parallel = len(requests) > 1 and sum(costs.values()) >= MIN_PARALLEL_COST
    if parallel:  # longest jobs first, so a big photo does not finish alone at the end of a batch
        requests.sort(key=lambda r: -costs[r[0], r[1]])
    for image in images:
        image.load()  # a lazily opened file must be decoded once, before threads share it
    jobs: list[list[Future | _Done | None]] = [[None, None] for _ in plans]
    for index, slot, size in requests:
        jobs[index][slot] = _submit(images[index], size, parallel)
    return [(grid_job, thumb_job) for grid_job, thumb_job in jobs]  # type: ignore[misc]


def _finish(job: tuple[Future | _Done, Future | _Done | None], plan: TilePlan) -> TiledImage:
    grid_job, thumb_job = job
    return TiledImage(grid_job.result(), thumb_job.result() if thumb_job else None, plan.grid, plan.image_size)


def _as_lists(count: int, min_num: int | Sequence[int], max_num: int | Sequence[int]) -> tuple[list[int], list[int]]:
    mins = [min_num] * count if isinstance(min_num, int) else list(min_num)
    maxs = [max_num] * count if isinstance(max_num, int) else list(max_num)
    if len(mins) != count or len(maxs) != count:
        raise ConfigError(f"got {count} images but {len(mins)} min_num and {len(maxs)} max_num values")
    return mins, maxs


def dynamic_tiles_many(
    images: Sequence[Image.Image | ImageSource],
    *,
    min_num: int | Sequence[int] = 1,
    max_num: int | Sequence[int] = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
    parallel: bool | None = None,
) -> list[TiledImage]:
    """`dynamic_tiles` for several images at once; per-image ``min_num``/``max_num`` may be given as lists.

    ``parallel=None`` runs the resizes on the shared thread pool when there is more than one to do and they
    add up to more than a small image's work (``MIN_PARALLEL_COST``).
    """
    mins, maxs = _as_lists(len(images), min_num, max_num)
    rgb = [_as_rgb(image) for image in images]
    plans = [
        plan_tiles(image.size, min_num=lo, max_num=hi, image_size=image_size, use_thumbnail=use_thumbnail)
        for image, lo, hi in zip(rgb, mins, maxs, strict=True)
    ]
    jobs = _start_resizes(rgb, plans, parallel)
    return [_finish(job, plan) for job, plan in zip(jobs, plans, strict=True)]


def _resize_cost(source: tuple[int, int], target: tuple[int, int]) -> float:
    """Rough multiply-adds of Pillow's two-pass bicubic resize, to order jobs."""
    (w_in, h_in), (w_out, h_out) = source, target
    taps_x = 4 * max(1.0, w_in / w_out) + 1
    taps_y = 4 * max(1.0, h_in / h_out) + 1
    return h_in * w_out * taps_x + h_out * w_out * taps_y


def dynamic_tiles(
    image: Image.Image | ImageSource,
    *,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> TiledImage:
    """Tile one image as the official ``dynamic_preprocess`` does; the chosen grid is ``result.grid``.

    Non-RGB images are converted with `ivl.processing.images.to_rgb`; other inputs go through `load_image`.
    """
    return dynamic_tiles_many(
        [image], min_num=min_num, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail
    )[0]


class _Normalizer:
    """``(x / 255 - mean) / std`` in float32, one tile at a time (cache-sized, single-threaded numpy).

    The operations and their order are torchvision's ``ToTensor`` + ``Normalize``, so the result is
    bit-identical to the official transform. numpy releases the GIL here, so it overlaps with pool resizes.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.scale = np.float32(255)

    def tile(self, out: np.ndarray, tile_hwc: np.ndarray) -> None:
        np.copyto(out, tile_hwc.transpose(2, 0, 1), casting="unsafe")
        np.divide(out, self.scale, out=out)
        np.subtract(out, self.mean, out=out)
        np.divide(out, self.std, out=out)

    def image(self, out: np.ndarray, item: TiledImage) -> None:
        """Write the ``item.num_tiles`` normalised tiles of ``item`` into ``out`` ``[N, 3, S, S]``."""
        cols, rows = item.grid
        size = item.image_size
        grid = item.grid_pixels.reshape(rows, size, cols, size, 3)
        for k in range(rows * cols):
            self.tile(out[k], grid[k // cols, :, k % cols])
        if item.thumbnail is not None:
            self.tile(out[rows * cols], item.thumbnail)


def normalize_tiled(
    tiled: Sequence[TiledImage],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Stack the tiles of several images into one normalised ``[sum N, 3, S, S]`` tensor.

    Computes ``(x / 255 - mean) / std`` in float32 with the same operations as torchvision's ``ToTensor`` +
    ``Normalize`` (bit-identical to the official transform), then casts to ``dtype``. With a non-CPU
    ``device`` the uint8 pixels are moved first (4x less traffic than moving floats) and normalised there.
    """
    if not tiled:
        raise ConfigError("normalize_tiled needs at least one image")
    size = tiled[0].image_size
    for item in tiled:
        if item.image_size != size:
            raise ConfigError(f"cannot stack tiles of size {item.image_size} with tiles of size {size}")
    target = torch.device(device) if device is not None else torch.device("cpu")
    if target.type != "cpu":
        return _normalize_on_device(tiled, mean, std, dtype, target)
    total = sum(t.num_tiles for t in tiled)
    out = np.empty((total, 3, size, size), dtype=np.float32)
    normalizer = _Normalizer(mean, std)
    start = 0
    for item in tiled:
        normalizer.image(out[start : start + item.num_tiles], item)
        start += item.num_tiles
    result = torch.from_numpy(out)
    return result if dtype == torch.float32 else result.to(dtype)


def _normalize_on_device(
    tiled: Sequence[TiledImage],
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype,
    target: torch.device,
) -> torch.Tensor:
    size = tiled[0].image_size
    out = torch.empty((sum(t.num_tiles for t in tiled), 3, size, size), dtype=torch.float32, device=target)
    start = 0
    for item in tiled:
        cols, rows = item.grid
        n = cols * rows
        source = _readonly_tensor(item.grid_pixels).to(target).view(rows, size, cols, size, 3).permute(0, 2, 4, 1, 3)
        out[start : start + n].view(rows, cols, 3, size, size).copy_(source)
        start += n
        if item.thumbnail is not None:
            out[start].copy_(_readonly_tensor(item.thumbnail).to(target).permute(2, 0, 1))
            start += 1
    mean_t = torch.tensor(mean, dtype=torch.float32, device=target).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=target).view(3, 1, 1)
    out.div_(255).sub_(mean_t).div_(std_t)
    return out if dtype == torch.float32 else out.to(dtype)


def tiles_to_pixel_values(
    images: Sequence[Image.Image],
    plans: Sequence[TilePlan],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    dtype: torch.dtype = torch.float32,
    parallel: bool | None = None,
) -> torch.Tensor:
    """Resize (on the pool, longest first) and normalise (here, image by image as resizes finish) RGB images
    according to their plans, into one ``[sum N, 3, S, S]`` tensor. The pipelined core of the processor."""
    if not images:
        raise ConfigError("tiles_to_pixel_values needs at least one image")
    size = plans[0].image_size
    if any(plan.image_size != size for plan in plans):
        raise ConfigError("all tile plans of one batch must use the same image_size")
    jobs = _start_resizes(images, plans, parallel)
    out = np.empty((sum(p.num_tiles for p in plans), 3, size, size), dtype=np.float32)
    normalizer = _Normalizer(mean, std)
    start = 0
    for job, plan in zip(jobs, plans, strict=True):
        normalizer.image(out[start : start + plan.num_tiles], _finish(job, plan))
        start += plan.num_tiles
    result = torch.from_numpy(out)
    return result if dtype == torch.float32 else result.to(dtype)


def images_to_pixel_values(
    images: Sequence[Image.Image | ImageSource],
    *,
    min_num: int | Sequence[int] = 1,
    max_num: int | Sequence[int] = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    parallel: bool | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The official ``load_image`` for a batch: decode (in parallel), tile, normalise.

    Returns ``pixel_values [sum N, 3, S, S]`` and the tiles per image (``num_patches_list``).
    """
    mins, maxs = _as_lists(len(images), min_num, max_num)
    encoded = [i for i in images if not isinstance(i, Image.Image)]
    pending = iter(
        load_images(encoded, max_pixels=max_pixels)
        if parallel is not False
        else [load_image(i, max_pixels=max_pixels) for i in encoded]
    )
    rgb = [_as_rgb(image) if isinstance(image, Image.Image) else next(pending) for image in images]
    plans = [
        plan_tiles(image.size, min_num=lo, max_num=hi, image_size=image_size, use_thumbnail=use_thumbnail)
        for image, lo, hi in zip(rgb, mins, maxs, strict=True)
    ]
    pixel_values = tiles_to_pixel_values(rgb, plans, mean, std, dtype=dtype, parallel=parallel)
    return pixel_values, [p.num_tiles for p in plans]
