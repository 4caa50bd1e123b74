"""Audio data: WAV reading/writing, audio preference and prompt datasets, exemplar folders, synthetic music.

Formats (all paths relative to the jsonl file's folder):

- **Preference pairs** (DPO/KTO-style audio data): jsonl rows ``{"prompt", "chosen", "rejected", "label"?}`` with
  audio file paths; ``label`` 0.5 (a tie) is dropped and counted, 1 / absent keeps chosen as the winner, 0 swaps.
- **Prompt / caption data**: jsonl rows ``{"prompt", "audio"?}`` (or a folder with ``metadata.jsonl`` rows
  ``{"file_name", "prompt"}``), for on-policy generation or real (caption, audio) data.
- **Exemplar folders** (DRAGON's instance-to-set / set rewards): every readable audio file of a folder.

Unreadable files (missing, undecodable, empty) are skipped and counted in ``skipped``, never a crash. Audio is
returned as float32 tensors ``(C, T)`` in [−1, 1], resampled to the requested rate (band-limited sinc,
:func:`genalign.rewards.preprocess.resample`), converted to the requested channel count (mean to mono, repeat to
stereo) and cropped / zero-padded to ``num_samples`` when given. Reading and writing use ``soundfile``
(libsndfile: WAV, FLAC, OGG; MP3 with libsndfile ≥ 1.1).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def read_audio(path: str | Path, sample_rate: int | None = None, channels: int | None = None,
               num_samples: int | None = None) -> tuple[torch.Tensor, int]:
    """Read an audio file as ``(C, T)`` float32 in [−1, 1].

    Args:
        path: audio file (any format libsndfile reads).
        sample_rate: resample to this rate (Hz); None keeps the file's rate.
        channels: 1 (channel mean) or 2 (mono repeated); None keeps the file's channels.
        num_samples: crop (from the start) or zero-pad to this length after resampling.

    Returns:
        ``(waveform (C, T), sample_rate)``.

    Raises:
        FileNotFoundError: missing file. RuntimeError / soundfile.LibsndfileError: undecodable file.
        ValueError: an empty file, or channels not in {1, 2}.
    """
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file {str(path)!r} not found")
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    if data.size == 0:
        raise ValueError(f"audio file {str(path)!r} is empty")
    x = torch.from_numpy(np.ascontiguousarray(data.T))
    if sample_rate is not None and sample_rate != sr:
        from genalign.rewards.preprocess import resample

        x = resample(x, sr, sample_rate)
        sr = sample_rate
    if channels is not None:
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        if channels == 1 and x.shape[0] != 1:
            x = x.mean(0, keepdim=True)
        elif channels == 2 and x.shape[0] == 1:
            x = x.repeat(2, 1)
        elif channels == 2 and x.shape[0] > 2:
            x = x[:2]
    if num_samples is not None:
        x = x[:, :num_samples] if x.shape[1] >= num_samples else torch.nn.functional.pad(x, (0, num_samples - x.shape[1]))
    return x.float(), int(sr)


def save_audio(path: str | Path, waveform: torch.Tensor | np.ndarray, sample_rate: int,
               subtype: str = "PCM_16") -> Path:
    """Write a waveform as a WAV file (``soundfile``), clipping to [−1, 1].

    Args:
        path: output file (``.wav``; parent folders are created).
        waveform: ``(C, T)`` or ``(T,)`` float in [−1, 1] (torch or numpy; values outside are clipped).
        sample_rate: Hz, > 0.
        subtype: libsndfile subtype (``PCM_16`` default, ``FLOAT`` for lossless float32).

    Returns:
        the written path.

    Raises:
        ValueError: a waveform that is not 1-D / 2-D, has no samples, is not finite, or a bad sample rate.

    Source: the ``genalign generate`` WAV output of audio pipelines (issue 5 §1).
    """
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    x = waveform.detach().float().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform, np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"waveform must be (C, T) or (T,) with T > 0, got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("waveform has non-finite values")
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(x, -1.0, 1.0).T, int(sample_rate), subtype=subtype)
    return path


@dataclass
class AudioData:
    """Waveforms ``(N, C, T)`` (float32, [−1, 1]) with their prompts; ``skipped`` counts dropped rows by reason."""

    waveforms: torch.Tensor
    prompts: list[str]
    sample_rate: int
    files: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.waveforms.shape[0])


@dataclass
class AudioPreferencePairs:
    """Audio preference pairs: ``chosen`` / ``rejected`` ``(N, C, T)``, prompts, sample rate, skipped counts."""

    prompts: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    sample_rate: int
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
            rows.append(row)
        except ValueError:
            bad += 1
    return rows, bad


def _log_skipped(source, skipped: dict[str, int]) -> None:
    for k, v in skipped.items():
        if v:
            logger.warning("audio data %s: skipped %d rows (%s)", source, v, k.replace("_", " "))


def load_audio_preference_pairs(source: str | Path, sample_rate: int, channels: int = 1,
                                num_samples: int | None = None, ties: str = "drop",
                                max_pairs: int | None = None) -> AudioPreferencePairs:
    """Audio preference pairs from a jsonl file (see module docstring).

    Args:
        source: the jsonl file, or a folder holding ``pairs.jsonl`` / ``metadata.jsonl``.
        sample_rate, channels, num_samples: as :func:`read_audio` (``num_samples`` is required to stack clips of
            different lengths; None = the length of the first clip).
        ties: "drop" (count them) or "error".
        max_pairs: keep at most this many usable pairs.

    Raises:
        FileNotFoundError: no jsonl. ValueError: a tie with ``ties="error"``, or no usable pair.
    """
    path = Path(source)
    if path.is_dir():
        cand = [path / n for n in ("pairs.jsonl", "metadata.jsonl") if (path / n).exists()]
        if not cand:
            raise FileNotFoundError(f"{source}: no pairs.jsonl / metadata.jsonl")
        path = cand[0]
    if not path.exists():
        raise FileNotFoundError(f"audio preference data {str(source)!r} not found")
    rows, bad = _read_jsonl(path)
    skipped = {"bad_rows": bad, "ties": 0, "unreadable_audio": 0, "missing_fields": 0}
    prompts, ch, rj = [], [], []
    for row in rows:
        if max_pairs and len(prompts) >= max_pairs:
            break
        if not all(k in row for k in ("prompt", "chosen", "rejected")):
            skipped["missing_fields"] += 1
            continue
        label = row.get("label", 1)
        if label not in (0, 1, True, False):
            if ties == "error":
                raise ValueError(f"{path}: tie (label {label!r}) for prompt {row['prompt']!r}; use ties: drop")
            skipped["ties"] += 1
            continue
        try:
            a, _ = read_audio(path.parent / row["chosen"], sample_rate, channels, num_samples)
            b, _ = read_audio(path.parent / row["rejected"], sample_rate, channels, num_samples)
            if num_samples is None:
                num_samples = a.shape[1]
                a, b = _fit(a, num_samples), _fit(b, num_samples)
        except Exception:  # any decoder error: skip and count
            skipped["unreadable_audio"] += 1
            continue
        if not label:
            a, b = b, a
        prompts.append(str(row["prompt"]))
        ch.append(a)
        rj.append(b)
    _log_skipped(path, skipped)
    if not prompts:
        raise ValueError(f"audio preference data {str(source)!r}: no usable pair (skipped: {skipped})")
    return AudioPreferencePairs(prompts, torch.stack(ch), torch.stack(rj), sample_rate, skipped)


def _fit(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:, :n] if x.shape[1] >= n else torch.nn.functional.pad(x, (0, n - x.shape[1]))


def _read_fixed(path: Path, sample_rate: int, channels: int, num_samples: int | None):
    """``(waveform, num_samples)``: a clip cropped / padded to ``num_samples`` (the first readable clip fixes it when
    None), or ``(None, num_samples)`` when the file cannot be read (the caller counts it)."""
    try:
        x, _ = read_audio(path, sample_rate, channels, num_samples)
    except Exception:  # missing, undecodable, empty: skipped and counted, never a crash
        return None, num_samples
    return (x, num_samples) if num_samples is not None else (_fit(x, x.shape[1]), x.shape[1])


def load_audio_prompts(source: str | Path) -> list[str]:
    """Prompts of an audio jsonl (field ``prompt``) or a ``.txt`` file (one per line).

    Raises:
        FileNotFoundError: missing file. ValueError: no prompt.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"audio prompts {str(source)!r} not found")
    if path.suffix == ".txt":
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    else:
        rows, _ = _read_jsonl(path)
        prompts = [str(r["prompt"]) for r in rows if r.get("prompt")]
    if not prompts:
        raise ValueError(f"audio prompts {str(source)!r}: empty")
    return prompts


def load_audio_data(source: str | Path, sample_rate: int, channels: int = 1, num_samples: int | None = None,
                    audio_column: str | None = None, caption_column: str = "prompt",
                    max_items: int | None = None) -> AudioData:
    """(caption, audio) rows from a jsonl file or a folder with ``metadata.jsonl`` (``file_name`` / ``audio``).

    Raises:
        FileNotFoundError: no jsonl. ValueError: no usable row.
    """
    path = Path(source)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"audio data {str(source)!r}: no metadata.jsonl / jsonl file")
    rows, bad = _read_jsonl(path)
    skipped = {"bad_rows": bad, "unreadable_audio": 0, "missing_caption": 0}
    waves, prompts, files = [], [], []
    for row in rows:
        if max_items and len(waves) >= max_items:
            break
        col = audio_column or ("file_name" if "file_name" in row else "audio")
        if row.get(caption_column) is None or col not in row:
            skipped["missing_caption"] += 1
            continue
        x, num_samples = _read_fixed(path.parent / row[col], sample_rate, channels, num_samples)
        if x is None:
            skipped["unreadable_audio"] += 1
            continue
        waves.append(x)
        prompts.append(str(row[caption_column]))
        files.append(str(row[col]))
    _log_skipped(path, skipped)
    if not waves:
        raise ValueError(f"audio data {str(source)!r}: no usable row (skipped: {skipped})")
    return AudioData(torch.stack(waves), prompts, sample_rate, files, skipped)


MUSIC_SOURCES = ("music:train", "music:heldout")  # the built-in demo's splits (load_music_split)


def load_music_split(spec: str, sample_rate: int = 4_000, channels: int = 1, num_samples: int | None = None,
                     max_items: int | None = None, progress: bool = True) -> AudioData:
    """``music:train`` / ``music:heldout``: the built-in demo's rendered clips as captioned audio rows.

    The same clips ``scripts/build_music.py`` trains the shipped base and rewards on
    (:data:`genalign.data.music.DEMO_PER_STYLE` files per style, 3 clips per rendering, train pieces also
    transposed once), rendered here in about a minute (with a progress bar), so a recipe can read real music
    without a folder written beforehand. Held-out pieces never appear in ``music:train``.

    Args:
        spec: ``"music:train"`` or ``"music:heldout"``.
        sample_rate: target rate (Hz; the corpus renders at 4 kHz and is resampled). channels: 1 or 2 (mono
            repeated). num_samples: crop / zero-pad each clip to this length after resampling (None: 16,384 at
            4 kHz). max_items: keep the first N clips.

    Returns:
        :class:`AudioData`: waveforms ``(N, C, T)`` in [−1, 1], N captions, ``files`` the
        corpus paths, ``skipped`` the corpus files that failed to parse or render.

    Raises:
        ValueError: another split. ImportError: music21 is missing (the message says how to install it).
    """
    from genalign.data.music import DEMO_PER_STYLE, render_corpus

    if spec not in MUSIC_SOURCES:
        raise ValueError(f"data source {spec!r}: the built-in music splits are {' and '.join(MUSIC_SOURCES)}")
    split = spec.split(":", 1)[1]
    try:
        import music21  # noqa: F401
    except ImportError:
        raise ImportError(f"data source {spec!r} renders the music21 corpus: pip install 'genalign[music]' "
                          "(or pip install -e '.[music]' in a checkout)") from None
    logger.info("%s: rendering the music21 corpus (%d files per style; about a minute on one core)", spec,
                DEMO_PER_STYLE)
    corpus = render_corpus(split, per_style=DEMO_PER_STYLE, clips_per_piece=3, progress=progress)
    if corpus.skipped:
        logger.warning("%s: skipped corpus files %s", spec, corpus.skipped)
    x = corpus.waveforms[:max_items] if max_items else corpus.waveforms
    if sample_rate != corpus.sample_rate:
        from genalign.rewards.preprocess import resample

        x = resample(x, corpus.sample_rate, sample_rate)
    if channels == 2:
        x = x.repeat(1, 2, 1)
    elif channels != 1:
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    if num_samples is not None:
        x = torch.stack([_fit(w, num_samples) for w in x])
    return AudioData(x.float().contiguous(), list(corpus.captions[: len(x)]), sample_rate,
                     list(corpus.pieces[: len(x)]), dict(corpus.skipped))


def load_exemplar_folder(folder: str | Path, sample_rate: int = 44_100, channels: int = 1,
                         num_samples: int | None = None, max_items: int | None = None) -> AudioData:
    """Every readable audio file of a folder (sorted by name), e.g. DRAGON's exemplar reference set.

    Prompts are the file stems. Unreadable files are skipped and counted (``skipped["unreadable_audio"]``).

    Raises:
        FileNotFoundError: not a folder. ValueError: no readable audio file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"exemplar folder {str(folder)!r} not found")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES)
    waves, names, skipped = [], [], {"unreadable_audio": 0}
    for f in files:
        if max_items and len(waves) >= max_items:
            break
        x, num_samples = _read_fixed(f, sample_rate, channels, num_samples)
        if x is None:
            skipped["unreadable_audio"] += 1
            continue
        waves.append(x)
        names.append(f.name)
    _log_skipped(folder, skipped)
    if not waves:
        raise ValueError(f"exemplar folder {str(folder)!r}: no readable audio file (skipped: {skipped})")
    return AudioData(torch.stack(waves), [Path(n).stem for n in names], sample_rate, names, skipped)


# -- synthetic music (tests, the CPU text-to-music demo) ---------------------------------------------------------

NOTE_NAMES = ("C", "D", "E", "F", "G", "A", "B")
_SEMITONES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
TEMPOS = {"slow": 60, "medium": 100, "fast": 150}
KINDS = ("tone", "chord", "rhythm")


def note_frequency(name: str, octave: int = 4) -> float:
    """Equal-tempered frequency (Hz) of a natural note name, A4 = 440 Hz."""
    midi = 12 * (octave + 1) + _SEMITONES[name]
    return 440.0 * 2 ** ((midi - 69) / 12)


def synth_clip(note: str = "A", tempo: str = "medium", kind: str = "tone", sample_rate: int = 8_000,
               duration: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A synthetic music clip ``(1, T)`` in [−1, 1]: a tone, a major chord, or a percussive rhythm on ``note``.

    Notes are struck on the beat (``TEMPOS[tempo]`` BPM) with an exponential decay, so pitch and tempo are both
    audible; ``seed`` adds a small random phase and amplitude jitter.
    """
    g = np.random.default_rng(seed)
    n = int(sample_rate * duration)
    t = np.arange(n) / sample_rate
    f0 = note_frequency(note)
    freqs = [f0] if kind != "chord" else [f0, f0 * 2 ** (4 / 12), f0 * 2 ** (7 / 12)]
    beat = 60.0 / TEMPOS[tempo]
    phase_in_beat = np.mod(t, beat)
    env = np.exp(-phase_in_beat * (12.0 if kind == "rhythm" else 4.0))
    x = sum(np.sin(2 * math.pi * f * t + g.uniform(0, 2 * math.pi)) for f in freqs) / len(freqs)
    if kind == "rhythm":
        x = 0.6 * x + 0.4 * g.standard_normal(n) * (phase_in_beat < 0.03)
    x = 0.8 * (0.8 + 0.2 * g.uniform()) * env * x
    return torch.from_numpy(np.clip(x, -1, 1).astype(np.float32))[None]


def synth_prompt(note: str, tempo: str, kind: str) -> str:
    """The caption of a synthetic clip, naming pitch and tempo: ``"a fast chord in A"``."""
    return f"a {tempo} {kind} in {note}"


def synthetic_music_dataset(n: int, sample_rate: int = 8_000, duration: float = 1.0,
                            seed: int = 0) -> AudioData:
    """``n`` synthetic clips with prompts naming pitch, tempo and kind (tones / chords / rhythms)."""
    g = np.random.default_rng(seed)
    waves, prompts = [], []
    for i in range(n):
        note, tempo, kind = NOTE_NAMES[g.integers(7)], list(TEMPOS)[g.integers(3)], KINDS[g.integers(3)]
        waves.append(synth_clip(note, tempo, kind, sample_rate, duration, seed=seed * 100_003 + i))
        prompts.append(synth_prompt(note, tempo, kind))
    return AudioData(torch.stack(waves), prompts, sample_rate)


__all__ = [
    "AUDIO_SUFFIXES", "AudioData", "AudioPreferencePairs", "MUSIC_SOURCES", "load_audio_data", "load_audio_preference_pairs",
    "load_audio_prompts", "load_exemplar_folder", "load_music_split", "note_frequency", "read_audio", "save_audio",
    "synth_clip", "synth_prompt", "synthetic_music_dataset",
]


def generate_audio_files(adapter, prompts: list[str], out_dir, num_inference_steps: int = 25,
                         guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 16,
                         progress: bool = False) -> list[dict]:
    """Generate one WAV per prompt (sample i seeded with ``seed + i``) into ``out_dir``; return metadata rows
    ``{"file_name", "prompt", "seed", "sample_rate"}`` (what ``genalign generate`` writes to metadata.jsonl).

    ``adapter``: an audio adapter (``sample``, ``sample_rate``), e.g. from
    :func:`genalign.pipelines.audio.audio_adapter_for`. ``progress``: a tqdm bar counting clips."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    rows = []
    with tqdm(total=len(prompts), desc="generate", unit="clip", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
            wavs = adapter.sample(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  generator=gens, batch_size=batch_size)
            for j, w in enumerate(wavs):
                name = f"{i + j:05d}.wav"
                save_audio(out_dir / name, w, adapter.sample_rate)
                rows.append({"file_name": name, "prompt": chunk[j], "seed": seed + i + j,
                             "sample_rate": adapter.sample_rate})
            bar.update(len(chunk))
    return rows
