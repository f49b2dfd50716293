"""Video input through PyAV: the official frame-index rule (segment midpoints over an optional time bound).

Each sampled frame later becomes exactly one tile (``max_num=1``, no thumbnail), as in the official
``load_video``. Colour conversion is FFmpeg's ``rgb24`` (the official helper uses decord, whose YUV->RGB
rounding may differ by a level or so); frame selection is identical.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ivl.errors import VideoError
from ivl.processing.images import DEFAULT_MAX_PIXELS, describe_source

VideoSource = str | os.PathLike | bytes | bytearray | memoryview

_NO_BOUND = (-100000.0, 100000.0)  # the official helper's "whole video" bound


def frame_indices(
    num_frames: int,
    num_segments: int,
    *,
    fps: float | None = None,
    bound: tuple[float, float] | None = None,
    first_idx: int = 0,
) -> list[int]:
    """Frame indices of the official ``get_index``: the midpoints of ``num_segments`` equal segments.

    ``bound = (start_s, end_s)`` restricts sampling to that time range (needs ``fps``). Indices may repeat
    when the video has fewer frames than segments.
    """
    if num_frames < 1:
        raise VideoError(f"a video needs at least one frame, got num_frames={num_frames}")
    if num_segments < 1:
        raise VideoError(f"num_segments must be >= 1, got {num_segments}")
    if bound is None:
        start, end = _NO_BOUND
        fps = fps if fps else 1.0  # irrelevant: the clamps below select the whole video
    else:
        start, end = bound
        if not fps or fps <= 0:
            raise VideoError(f"a time bound {bound} needs the video's frame rate, which is unknown")
    max_frame = num_frames - 1
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    # Python's round() on floats is round-half-to-even, like the official np.round.
    return [int(start_idx + seg_size / 2 + round(seg_size * k)) for k in range(num_segments)]


@dataclass(frozen=True)
class VideoClip:
    """Sampled frames of a video (RGB), their indices in the decoded stream, and stream facts."""

    frames: list[Image.Image]
    indices: list[int]
    num_frames: int
    fps: float | None


def read_video(
    source: VideoSource,
    *,
    num_segments: int = 8,
    bound: tuple[float, float] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> VideoClip:
    """Decode ``source`` (path or encoded bytes) and return the ``num_segments`` frames of the official rule.

    Raises `ivl.errors.VideoError` naming the input when it cannot be opened, has no video stream, no
    decodable frames, or frames larger than ``max_pixels``.
    """
    label = describe_source(source)
    opener = _opener(source, label)
    try:
        return _read(opener, label, num_segments, bound, max_pixels)
    except VideoError:
        raise
    except Exception as exc:  # av.error.FFmpegError, OSError, ValueError, MemoryError ...
        raise VideoError(f"video {label} cannot be decoded: {type(exc).__name__}: {exc}") from exc


def _opener(source: VideoSource, label: str) -> Callable[[], Any]:
    import av

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise VideoError(f"video {label} is empty")
        return lambda: av.open(io.BytesIO(data))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise VideoError(f"video file {label} does not exist or is not a file")
        return lambda: av.open(str(path))
    raise VideoError(f"cannot read a video from {label}: unsupported input type {type(source).__name__}")


def _read(
    opener: Callable[[], Any], label: str, num_segments: int, bound: tuple[float, float] | None, max_pixels: int | None
) -> VideoClip:
    with opener() as container:
        if not container.streams.video:
            raise VideoError(f"{label} has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if max_pixels is not None and width * height > max_pixels:
            raise VideoError(f"video {label} frames are {width}x{height}, above the limit of {max_pixels} pixels")
        fps = float(stream.average_rate) if stream.average_rate else None
        num_frames = stream.frames or _count_packets(container, stream)
    if num_frames < 1:
        raise VideoError(f"video {label} has no frames")
    indices = frame_indices(num_frames, num_segments, fps=fps, bound=bound)
    frames, decoded = _decode(opener, indices)
    if decoded == 0:
        raise VideoError(f"video {label} has no decodable frames")
    if len(frames) < len(set(indices)):  # the container's frame count was wrong: redo with the real one
        num_frames = decoded
        indices = frame_indices(num_frames, num_segments, fps=fps, bound=bound)
        frames, _ = _decode(opener, indices)
    return VideoClip([frames[i] for i in indices], indices, num_frames, fps)


def _count_packets(container: Any, stream: Any) -> int:
    return sum(1 for packet in container.demux(stream) if packet.size)


def _decode(opener: Callable[[], Any], indices: list[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode sequentially (exact indices, unlike keyframe seeking) and keep the wanted frames.

    Returns the kept frames and the number of frames decoded (the true total when a wanted index was missing).
    """
    wanted, last = set(indices), max(indices)
    frames: dict[int, Image.Image] = {}
    count = 0
    with opener() as container:
        for frame in container.decode(video=0):
            if count in wanted:
                frames[count] = frame.to_image()
            count += 1
            if count > last:
                break
    return frames, count
