"""Decoding real video files with PyAV (the `video` extra): uniform frame sampling picks the right frames."""

import numpy as np
import pytest

from genalign.data.video import load_video_frames, probe_video, sample_frame_indices

av = pytest.importorskip("av", reason="PyAV not installed (pip install genalign[video])")


def write_video(path, n=20):
    c = av.open(str(path), mode="w")
    s = c.add_stream("mpeg4", rate=8)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    for i in range(n):  # frame i is a flat grey of level 10*i
        for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, dtype=np.uint8), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def test_mp4_frames_are_sampled_uniformly(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path)
    assert probe_video(str(path))
    frames = load_video_frames(str(path), 4)
    assert frames.shape == (4, 32, 32, 3)
    want = np.array(sample_frame_indices(20, 4)) * 10
    assert np.allclose(frames.reshape(4, -1).mean(1), want, atol=4)  # lossy codec: a few grey levels


def test_corrupt_video_is_not_readable(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    assert not probe_video(str(bad))
