"""Video: the official frame-index rule, decoding through PyAV, and clear errors for unreadable files."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from ivl.errors import VideoError
from ivl.processing.video import frame_indices, read_video

FRAMES, FPS, STEP = 40, 10, 6  # frame k is a flat gray image of level k * STEP


def _encode(num_frames: int = FRAMES, fps: int = FPS) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), k * STEP, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def video_bytes() -> bytes:
    return _encode()


def _official_get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    """Transcription of the official load_video index helper (spec §4.5), with numpy rounding."""
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array([int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)])


def test_hand_computed_indices():
    # 100 frames, 8 segments: seg = 99/8 = 12.375, idx_k = int(6.1875 + round(12.375 k)) (half to even at k=4)
    assert frame_indices(100, 8) == [6, 18, 31, 43, 56, 68, 80, 93]
    # bound (2 s, 5 s) at 10 fps: start 20, end 50, seg 3.75, idx_k = int(21.875 + round(3.75 k)); 22.5 -> 22
    assert frame_indices(100, 8, fps=10.0, bound=(2.0, 5.0)) == [21, 25, 29, 32, 36, 40, 43, 47]
    # 3 frames, 5 segments: seg 0.4, idx_k = int(0.2 + round(0.4 k)) -> indices repeat
    assert frame_indices(3, 5) == [0, 0, 1, 1, 2]


def test_indices_match_the_official_helper_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        frames = int(rng.integers(1, 5000))
        segments = int(rng.integers(1, 64))
        fps = float(rng.choice([23.976, 25.0, 29.97, 30.0, 60.0, 7.5]))
        bound = None
        if rng.random() < 0.5:
            start = float(rng.uniform(0, frames / fps))
            bound = (start, start + float(rng.uniform(0, 20)))
        expected = _official_get_index(bound, fps, frames - 1, num_segments=segments).tolist()
        assert frame_indices(frames, segments, fps=fps, bound=bound) == expected


def test_read_video_picks_the_official_frames(video_bytes, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(video_bytes)
    for source in (path, str(path), video_bytes):
        clip = read_video(source, num_segments=8)
        assert clip.num_frames == FRAMES and clip.fps == pytest.approx(FPS)
        assert clip.indices == frame_indices(FRAMES, 8)
        levels = [float(np.asarray(f).mean()) for f in clip.frames]
        np.testing.assert_allclose(levels, [i * STEP for i in clip.indices], atol=3)
        assert all(f.mode == "RGB" and f.size == (64, 48) for f in clip.frames)


def test_bound_selects_a_time_window(video_bytes):
    clip = read_video(video_bytes, num_segments=4, bound=(1.0, 2.0))
    assert clip.indices == frame_indices(FRAMES, 4, fps=FPS, bound=(1.0, 2.0))
    assert all(10 <= i <= 20 for i in clip.indices)


def test_unreadable_videos_raise_video_error(video_bytes, tmp_path):
    with pytest.raises(VideoError, match=r"missing\.mp4"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError):
        read_video(b"definitely not a video" * 50)
    with pytest.raises(VideoError):
        read_video(video_bytes[: len(video_bytes) // 3])
    with pytest.raises(VideoError, match="empty"):
        read_video(b"")
    with pytest.raises(VideoError):
        read_video(video_bytes, num_segments=0)
    with pytest.raises(VideoError, match="limit"):
        read_video(video_bytes, max_pixels=100)
    with pytest.raises(VideoError):
        frame_indices(0, 4)
