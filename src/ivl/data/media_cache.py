"""`MediaCache`: decoded images and video clips of a training set, kept in memory between epochs.

Each epoch of a small data set decodes the same files again: on the demo's world that is a quarter of the
data path's time per step. The cache keeps what `load_image` / `read_video` returned, keyed by the file's
path, size and modification time (a file rewritten during a run is decoded afresh) and, for a video, by the
frame sampling asked for. Augmentation happens after decoding (on the tiles), so a cached image gives the
same sample as a fresh decode. Bounded by the decoded size: the least recently used entries go first.
The datasets of every run in one process share one cache (`shared_media_cache`), so the stages the demo
runs one after another find the images the earlier stages decoded. Every DataLoader worker process holds its
own copy, so the memory is per worker.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from PIL import Image

from ivl.processing.images import load_image
from ivl.processing.video import VideoClip, read_video

T = TypeVar("T")


def decoded_bytes(value: Image.Image | VideoClip) -> int:
    """Memory of a decoded image or clip: 3 bytes per RGB pixel (Pillow's own overhead is small)."""
    frames = value.frames if isinstance(value, VideoClip) else [value]
    return sum(frame.width * frame.height * len(frame.getbands()) for frame in frames)


class MediaCache:
    """``image(path)`` / ``video(path, num_segments, bound)`` → decoded media, remembered up to ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"media cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """A pickled cache (a spawned DataLoader worker's copy) starts empty: copying the media costs more than
        decoding it again."""
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._entries)

    def image(self, path: str | os.PathLike[str], *, max_pixels: int | None) -> Image.Image:
        key = ("image", *_file_key(path), max_pixels)
        return self._get(key, lambda: load_image(path, max_pixels=max_pixels))

    def video(self, path: str | os.PathLike[str], *, num_segments: int, bound: tuple[float, float] | None) -> VideoClip:
        key = ("video", *_file_key(path), num_segments, None if bound is None else tuple(bound))
        return self._get(key, lambda: read_video(path, num_segments=num_segments, bound=bound))

    def resize(self, max_bytes: int) -> None:
        """A new bound; the least recently used entries go until the cache fits it."""
        if max_bytes < 0:
            raise ValueError(f"media cache size must be >= 0 bytes, got {max_bytes}")
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def _get(self, key: Hashable, decode: Callable[[], T]) -> T:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
        value = decode()  # errors propagate and nothing is stored: a bad file fails the same way every time
        size = decoded_bytes(value)  # type: ignore[arg-type]
        with self._lock:
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = (value, size)
                self.bytes += size
                self._evict()
        return value

    def _evict(self) -> None:
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped


_shared: MediaCache | None = None
_shared_lock = threading.Lock()


def shared_media_cache(max_bytes: int) -> MediaCache:
    """This process's cache, bounded by the latest ``max_bytes`` asked for (keys carry each file's size and
    modification time, so entries stay valid from one run to the next)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MediaCache(max_bytes)
        else:
            _shared.resize(max_bytes)
        return _shared


def _file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """Path, size and modification time; a missing file is left for the decoder to report."""
    name = os.fspath(path)
    try:
        stat = os.stat(name)
    except OSError:
        return name, -1, -1
    return name, stat.st_size, stat.st_mtime_ns


def _fresh_locks_in_child() -> None:
    """A forked DataLoader worker inherits the locks in whatever state another thread left them: new ones."""
    global _shared_lock
    _shared_lock = threading.Lock()
    if _shared is not None:
        _shared._lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_in_child)
