"""The corpus' synthesizer: deterministic additive synthesis of note lists (a leaf module: numpy only).

Used to render the music21 corpus for ``builtin:music`` (:mod:`genalign.data.music`).
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 4_000

# Partial amplitudes 1..N (per style): a timbre the ear can tell apart, and the classifier too.
TIMBRES = {
    "organ": (1.0, 0.5, 0.35, 0.25, 0.12, 0.1, 0.06, 0.05),
    "choir": (1.0, 0.35, 0.12, 0.05, 0.03),
    "fiddle": tuple(0.9 / k for k in range(1, 13)),
}


def render_notes(notes: np.ndarray, sample_rate: int = SAMPLE_RATE, seconds: float | None = None,
                 timbre: str = "organ", transpose: int = 0) -> np.ndarray:
    """Additive synthesis of ``notes`` ``(n, 3)`` (onset s, duration s, MIDI pitch) → mono float32 ``(T,)``.

    Each note: Σ_k a_k sin(2π k f t) over the timbre's partials below 0.45·sample_rate (f = 440·2^((m+transpose−69)/12)),
    times an envelope (10 ms linear attack, exponential decay with a 1.5 s time constant, 40 ms linear release at
    the end of the note), amplitude 0.25. The sum is not normalised here. Deterministic (no randomness).

    Raises:
        ValueError: unknown timbre.
    """
    if timbre not in TIMBRES:
        raise ValueError(f"unknown timbre {timbre!r}; known: {', '.join(TIMBRES)}")
    amps = np.asarray(TIMBRES[timbre], dtype=np.float64)
    end = seconds if seconds is not None else (float((notes[:, 0] + notes[:, 1]).max()) + 0.1 if len(notes) else 0.0)
    total = int(round(end * sample_rate))
    out = np.zeros(total, dtype=np.float64)
    att, rel = int(0.01 * sample_rate), int(0.04 * sample_rate)
    for on, dur, midi in notes:
        s0 = int(round(on * sample_rate))
        if s0 >= total:
            continue
        n = min(int(round(dur * sample_rate)) + rel, total - s0)
        if n <= 0:
            continue
        t = np.arange(n) / sample_rate
        f = 440.0 * 2.0 ** ((midi + transpose - 69.0) / 12.0)
        k = np.arange(1, len(amps) + 1)
        keep = k * f < 0.45 * sample_rate
        if not keep.any():
            continue
        wave = (amps[keep, None] * np.sin(2 * np.pi * f * k[keep, None] * t[None])).sum(0)
        env = np.exp(-t / 1.5)
        a = min(att, n)
        env[:a] *= np.linspace(0.0, 1.0, a, endpoint=False)
        body = int(round(dur * sample_rate))
        if body < n:
            env[body:] *= np.linspace(1.0, 0.0, n - body)
        out[s0:s0 + n] += 0.25 * wave * env
    return out.astype(np.float32)
