"""Real music from the ``music21`` corpus, rendered to audio clips with captions (the ``builtin:music`` data).

``music21`` (BSD-3) bundles real scores. Four collections are used, each a *style* (the ``music_style`` label):

=================  ===========================  ==========================================  ==============
style id            corpus folder                caption phrase                              timbre
=================  ===========================  ==========================================  ==============
``chorale``         ``bach/bwv*``                "a four-voice Bach chorale"                 organ
``mass``            ``palestrina/*.krn``         "a Palestrina mass movement"                choir
``madrigal``        ``monteverdi/*.mxl``         "a Monteverdi madrigal"                     choir
``fiddle``          ``ryansMammoth/*.abc``       "an Irish reel" / "a jig" / "a hornpipe" ..  fiddle
=================  ===========================  ==========================================  ==============

Pipeline, all deterministic (same arguments → bit-identical float32 clips):

1. :func:`list_corpus_paths`: sorted corpus paths, the first ``per_style`` of each collection.
2. :func:`parse_piece`: ``music21.converter.parse`` under a per-file wall-clock bound (SIGALRM); a file that fails
   to parse, times out, or has no notes is skipped and counted (:class:`MusicCorpus` ``skipped``), never a crash.
3. :func:`piece_info`: key and mode from the score (``score.analyze("key")``: music21's Krumhansl–Schmuckler
   key finder on the notes), meter (first time signature), voices (parts), dance type (fiddle titles), a tempo
   drawn deterministically per piece from the style's range (the corpus files carry almost no tempo marks).
4. :func:`score_notes` → :func:`render_notes`: notes (onset s, duration s, MIDI pitch) → an additive synthesizer
   written in numpy (harmonic partials below Nyquist with a per-style spectrum, attack/decay envelope, no
   randomness, no sound fonts). Training pieces are also rendered transposed (one deterministic shift in
   [−5, +6] semitones, key label shifted with it) so every key appears.
5. Clips: consecutive non-overlapping windows of ``clip_seconds`` from the start of the rendering; near-silent
   windows are dropped; at most ``clips_per_piece`` per rendering. Peak-normalised to 0.8 per clip.
6. Captions (:func:`caption`): "a four-voice Bach chorale in G major, 4/4, slow". Train and held-out captions use
   different templates (word order), and the split is by piece (a stable hash of the corpus path), so held-out
   pieces and held-out caption phrasings are never trained on.

Source: music21 corpus and ``Stream.analyze("key")`` (Krumhansl & Kessler 1982 profiles); synthesis is genalign's
own. Requires the ``music`` extra (``pip install genalign[music]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from genalign.data.synth import SAMPLE_RATE, render_notes  # noqa: F401  (the corpus' synthesizer)

logger = logging.getLogger(__name__)

# 4 kHz: the highest melody notes (~1.3 kHz) keep their fundamental and first partial, and the Oobleck VAE and
# DiT of the base model stay affordable on 2 shared CPU cores (their cost is linear in samples / latent frames).
CLIP_SECONDS = 4.096  # 16,384 samples at 4 kHz = 256 latent frames at the base model's hop of 64

STYLES = ("chorale", "mass", "madrigal", "fiddle")
STYLE_FOLDERS = {"chorale": "bach", "mass": "palestrina", "madrigal": "monteverdi", "fiddle": "ryansMammoth"}
STYLE_SUFFIX = {"chorale": (".mxl",), "mass": (".krn",), "madrigal": (".mxl",), "fiddle": (".abc",)}
# Beats per minute (beat = the time signature's beat) drawn per piece in this range.
STYLE_BPM = {"chorale": (56, 84), "mass": (54, 80), "madrigal": (70, 110), "fiddle": (96, 132)}
DANCES = ("reel", "jig", "hornpipe", "strathspey", "waltz", "polka", "march", "clog")
TEMPO_WORDS = ((72.0, "slow"), (104.0, "moderate"), (math.inf, "fast"))

PITCH_CLASS_NAMES = {  # tonic pitch class → caption name (one spelling per key: the common key signature)
    "major": ["C", "D flat", "D", "E flat", "E", "F", "F sharp", "G", "A flat", "A", "B flat", "B"],
    "minor": ["C", "C sharp", "D", "E flat", "E", "F", "F sharp", "G", "G sharp", "A", "B flat", "B"],
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}

STYLE_TIMBRE = {"chorale": "organ", "mass": "choir", "madrigal": "choir", "fiddle": "fiddle"}


def key_label(tonic_pc: int, mode: str) -> int:
    """Key index in [0, 24): ``tonic_pc`` (0 = C) for major, ``12 + tonic_pc`` for minor.

    Raises:
        ValueError: mode not "major"/"minor".
    """
    if mode not in ("major", "minor"):
        raise ValueError(f"mode must be 'major' or 'minor', got {mode!r}")
    return int(tonic_pc) % 12 + (12 if mode == "minor" else 0)


def key_name(label: int) -> str:
    """Key index → caption words, e.g. 7 → "G major", 21 → "A minor"."""
    mode = "minor" if label >= 12 else "major"
    return f"{PITCH_CLASS_NAMES[mode][label % 12]} {mode}"


KEY_NAMES = tuple(key_name(i) for i in range(24))


def tempo_word(bpm: float) -> str:
    """Beats per minute → "slow" (< 72), "moderate" (< 104) or "fast"."""
    return next(w for limit, w in TEMPO_WORDS if bpm < limit)


def stable_hash(text: str) -> int:
    """A platform-independent 64-bit hash of a string (sha256 prefix); Python's ``hash`` is salted per process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_heldout(corpus_path: str, heldout_fraction: float = 0.2) -> bool:
    """The split by piece: held out iff the stable hash of the corpus-relative path falls in the fraction."""
    return (stable_hash(corpus_path) % 10_000) < heldout_fraction * 10_000


@dataclass
class PieceInfo:
    """Metadata of one corpus piece (what captions and labels are made of).

    Attributes:
        path: corpus-relative path (e.g. ``bach/bwv2.6.mxl``). style: one of :data:`STYLES`.
        tonic_pc: tonic pitch class (0 = C). mode: "major" / "minor". meter: e.g. "4/4". voices: number of parts.
        dance: fiddle-tune dance type from the title ("reel", "jig", ...) or "". bpm: rendering tempo (beats/min).
        beat_quarters: quarter notes per beat (1 in 4/4, 2 in 4/2, 1.5 in 6/8). title: as in the file.
    """

    path: str
    style: str
    tonic_pc: int
    mode: str
    meter: str
    voices: int
    dance: str
    bpm: float
    beat_quarters: float
    title: str = ""

    @property
    def key(self) -> int:
        return key_label(self.tonic_pc, self.mode)


@dataclass
class MusicCorpus:
    """Rendered clips with captions and labels.

    Attributes:
        waveforms: ``(N, 1, T)`` float32 in [−1, 1] at ``sample_rate`` (T = clip samples).
        captions: N captions. keys: ``(N,)`` int64 key labels in [0, 24). styles: ``(N,)`` int64 indices into
            :data:`STYLES`. pieces: N corpus paths (the split unit). transpose: ``(N,)`` semitone shifts (0 =
            original). split: "train" / "heldout" / "all". skipped: reason → count (parse failures, timeouts,
            empty scores, silent clips).
    """

    waveforms: torch.Tensor
    captions: list[str]
    keys: torch.Tensor
    styles: torch.Tensor
    pieces: list[str]
    transpose: torch.Tensor
    sample_rate: int
    split: str
    infos: list[PieceInfo] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


# ----------------------------------------------------------------------------------------------------------------
# corpus → scores


def list_corpus_paths(styles: tuple[str, ...] = STYLES, per_style: int | None = None) -> list[tuple[str, str]]:
    """``(style, absolute path)`` of the corpus files of each style, sorted, at most ``per_style`` each.

    Raises:
        ImportError: music21 is not installed (``pip install genalign[music]``).
        ValueError: an unknown style.
    """
    from music21 import corpus

    for s in styles:
        if s not in STYLE_FOLDERS:
            raise ValueError(f"unknown music style {s!r}; known: {', '.join(STYLES)}")
    paths = sorted(str(p) for p in corpus.getCorePaths())
    out = []
    for s in styles:
        folder = f"/corpus/{STYLE_FOLDERS[s]}/"
        sel = [p for p in paths if folder in p and p.endswith(STYLE_SUFFIX[s])]
        if s == "chorale":
            sel = [p for p in sel if Path(p).name.startswith("bwv")]
        out += [(s, p) for p in sel[:per_style]]
    return out


def corpus_relative(path: str) -> str:
    """``.../music21/corpus/bach/bwv2.6.mxl`` → ``bach/bwv2.6.mxl`` (machine-independent id of a piece)."""
    p = str(path)
    return p.split("/corpus/", 1)[1] if "/corpus/" in p else Path(p).name


class ParseTimeout(Exception):
    """A corpus file took longer than the per-file bound to parse."""


@contextlib.contextmanager
def _time_bound(seconds: float):
    # SIGALRM works only in the main thread; elsewhere the bound is not enforced (logged once per call).
    if seconds is None or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise ParseTimeout

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def parse_piece(path: str, timeout_s: float = 10.0):
    """Parse one corpus file with ``music21.converter.parse`` in at most ``timeout_s`` seconds.

    Returns:
        ``(score, None)`` or ``(None, reason)`` with reason in {"timeout", "parse_error", "not_a_score",
        "no_notes"}. Never raises for a bad file.
    """
    from music21 import converter, stream

    try:
        with _time_bound(timeout_s):
            s = converter.parse(path)
    except ParseTimeout:
        return None, "timeout"
    except Exception as err:  # music21 raises many exception types on malformed files
        logger.debug("music21 failed on %s: %s", path, err)
        return None, "parse_error"
    if isinstance(s, stream.Opus) or not isinstance(s, stream.Stream):
        return None, "not_a_score"
    if len(s.flatten().notes) == 0:
        return None, "no_notes"
    return s, None


def _dance_of(title: str) -> str:
    t = title.lower()
    return next((d for d in DANCES if d in t), "")


def piece_info(score, path: str, style: str) -> PieceInfo:
    """Metadata of a parsed score (see :class:`PieceInfo`); the tempo is drawn from the style's range by a stable
    hash of the path (deterministic)."""
    from music21 import meter, stream

    rel = corpus_relative(path)
    k = score.analyze("key")
    mode = "minor" if k.mode == "minor" else "major"
    ts = score.recurse().getElementsByClass(meter.TimeSignature).first()
    meter_s = ts.ratioString if ts is not None else "4/4"
    beat_q = float(ts.beatDuration.quarterLength) if ts is not None else 1.0
    parts = score.parts if isinstance(score, stream.Score) else []
    title = (score.metadata.title if score.metadata is not None and score.metadata.title else "") or ""
    lo, hi = STYLE_BPM[style]
    bpm = lo + (hi - lo) * ((stable_hash("bpm:" + rel) % 1000) / 999.0)
    return PieceInfo(path=rel, style=style, tonic_pc=int(k.tonic.pitchClass), mode=mode, meter=meter_s,
                     voices=max(1, len(parts)), dance=_dance_of(title) if style == "fiddle" else "",
                     bpm=round(bpm, 1), beat_quarters=beat_q, title=title)


def score_notes(score, bpm: float, beat_quarters: float = 1.0, max_seconds: float | None = None) -> np.ndarray:
    """Notes of a score as an array ``(n, 3)`` float64: onset (s), duration (s), MIDI pitch.

    Ties are merged (``stripTies``), chords give one row per pitch, grace notes (zero length) are dropped; repeats
    are not expanded. ``bpm`` beats per minute of ``beat_quarters`` quarter notes each.
    """
    sec_per_quarter = 60.0 / (bpm * beat_quarters)
    rows = []
    for n in score.stripTies().flatten().notes:
        ql = float(n.quarterLength)
        if ql <= 0:
            continue
        on = float(n.offset) * sec_per_quarter
        if max_seconds is not None and on >= max_seconds:
            continue
        for p in n.pitches:
            rows.append((on, ql * sec_per_quarter, float(p.midi)))
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return arr[np.lexsort((arr[:, 2], arr[:, 0]))] if len(arr) else arr


# ----------------------------------------------------------------------------------------------------------------
# captions


STYLE_PHRASE = {"chorale": "Bach chorale", "mass": "Palestrina mass movement", "madrigal": "Monteverdi madrigal"}


def _subject(info: PieceInfo) -> tuple[str, str]:
    """(voices word, subject words): ("four-voice", "Bach chorale"), ("", "Irish reel")."""
    if info.style == "fiddle":
        return "", {"reel": "Irish reel", "": "fiddle tune"}.get(info.dance, f"fiddle {info.dance}")
    voices = f"{NUMBER_WORDS.get(info.voices, str(info.voices))}-voice"
    return voices, STYLE_PHRASE[info.style]


def caption(info: PieceInfo, key: int | None = None, template: int = 0) -> str:
    """Caption of a piece (key overridable for transposed renderings).

    Templates 0 and 1 are the training phrasings; template 2 is held out (prompts the model never saw):

    0. "a four-voice Bach chorale in G major, 4/4, slow"
    1. "slow four-voice Bach chorale, 4/4, in G major"
    2. "a Bach chorale for four voices, slow, G major, in 4/4"

    Raises:
        ValueError: template not in {0, 1, 2}.
    """
    k = key_name(info.key if key is None else key)
    voices, subj = _subject(info)
    tempo = tempo_word(info.bpm)
    if template == 0:
        art = "an" if (voices or subj)[0].lower() in "aeiou" else "a"
        return f"{art} {voices + ' ' if voices else ''}{subj} in {k}, {info.meter}, {tempo}"
    if template == 1:
        return f"{tempo} {voices + ' ' if voices else ''}{subj}, {info.meter}, in {k}"
    if template == 2:
        art = "an" if subj[0].lower() in "aeiou" else "a"
        v = f" for {voices.split('-')[0]} voices" if voices else ""
        return f"{art} {subj}{v}, {tempo}, {k}, in {info.meter}"
    raise ValueError(f"caption template must be 0, 1 or 2, got {template}")


def caption_words() -> list[str]:
    """Every word a caption can contain (the base model's word-level tokenizer vocabulary)."""
    words = "a an in for voices voice - , / slow moderate fast major minor flat sharp Bach chorale Palestrina mass " \
            "movement Monteverdi madrigal Irish fiddle tune".split()
    words += list("ABCDEFG") + [str(i) for i in range(1, 17)] + list(NUMBER_WORDS.values()) + list(DANCES)
    return list(dict.fromkeys(words))


def parse_prompt(prompt: str) -> tuple[int | None, int | None]:
    """(key label, style index) named by a caption/prompt, each None when the prompt names none.

    Keys: "<A-G>[ flat| sharp] <major|minor>" (also "F#"/"Bb" spellings); styles: chorale, mass, madrigal, and
    fiddle (reel, jig, hornpipe, ... or "fiddle").
    """
    import re

    key = None
    m = re.search(r"\b([A-G])\s*(#|b\b|sharp\b|flat\b)?\s*(major|minor)\b", prompt, flags=re.IGNORECASE)
    if m:
        base = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}[m.group(1).upper()]
        acc = (m.group(2) or "").lower()
        base += 1 if acc in ("#", "sharp") else -1 if acc in ("b", "flat") else 0
        key = key_label(base % 12, m.group(3).lower())
    low = prompt.lower()
    style = None
    for i, s in enumerate(STYLES):
        words = {"chorale": ("chorale",), "mass": ("mass",), "madrigal": ("madrigal",),
                 "fiddle": ("fiddle",) + DANCES}[s]
        if any(re.search(rf"\b{w}\b", low) for w in words):
            style = i
            break
    return key, style


# ----------------------------------------------------------------------------------------------------------------
# corpus → clips


def transpose_of(rel_path: str) -> int:
    """The deterministic extra transposition of a training piece, in [−5, +6] semitones, never 0."""
    t = stable_hash("transpose:" + rel_path) % 11 - 5
    return t if t != 0 else 6


def cut_clips(wave: np.ndarray, clip_samples: int, max_clips: int, min_rms: float = 0.01) -> list[np.ndarray]:
    """Consecutive non-overlapping windows of ``clip_samples`` from the start (a partial tail is dropped), skipping
    windows whose RMS (after normalising the rendering's peak to 1) is below ``min_rms``; each clip peak-normalised
    to 0.8. At most ``max_clips``."""
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak <= 0:
        return []
    out = []
    for i in range(len(wave) // clip_samples):
        c = wave[i * clip_samples:(i + 1) * clip_samples]
        if float(np.sqrt(np.mean((c / peak) ** 2))) < min_rms:
            continue
        out.append((0.8 * c / max(float(np.abs(c).max()), 1e-8)).astype(np.float32))
        if len(out) >= max_clips:
            break
    return out


def render_corpus(split: str = "train", per_style: int | None = 100, clips_per_piece: int = 3,
                  sample_rate: int = SAMPLE_RATE, clip_seconds: float = CLIP_SECONDS, timeout_s: float = 10.0,
                  transpose_train: bool = True, heldout_fraction: float = 0.2, styles: tuple[str, ...] = STYLES,
                  paths: list[tuple[str, str]] | None = None, progress: bool = False) -> MusicCorpus:
    """Render the corpus to captioned clips (module docstring). Deterministic.

    Args:
        split: "train" (captions with templates 0/1, plus one transposed rendering per piece when
            ``transpose_train``), "heldout" (held-out pieces, template 2, original key) or "all" (every piece,
            template 0, original key; for tests).
        per_style: corpus files per style (sorted order) before the split; None = all.
        clips_per_piece: clips per rendering. timeout_s: per-file parse bound.
        paths: explicit ``(style, path)`` list instead of :func:`list_corpus_paths`.

    Returns:
        :class:`MusicCorpus` (``skipped`` counts parse failures / timeouts / empty / silent pieces).

    Raises:
        ValueError: unknown split. ImportError: music21 missing.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    from tqdm import tqdm

    clip_samples = int(round(clip_seconds * sample_rate))
    todo = paths if paths is not None else list_corpus_paths(styles, per_style)
    waves, caps, keys, sty, pcs, trs, infos = [], [], [], [], [], [], []
    skipped: dict[str, int] = {}
    for style, path in tqdm(todo, desc=f"music21 corpus ({split})", disable=not progress):
        rel = corpus_relative(path)
        held = is_heldout(rel, heldout_fraction)
        if (split == "train" and held) or (split == "heldout" and not held):
            continue
        score, why = parse_piece(path, timeout_s)
        if score is None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        try:
            info = piece_info(score, path, style)
            notes = score_notes(score, info.bpm, info.beat_quarters, max_seconds=clip_seconds * clips_per_piece)
        except Exception as err:  # a score music21 parsed but cannot analyse
            logger.debug("metadata failed on %s: %s", path, err)
            skipped["metadata_error"] = skipped.get("metadata_error", 0) + 1
            continue
        infos.append(info)
        shifts = [0] + ([transpose_of(rel)] if split == "train" and transpose_train else [])
        for r, shift in enumerate(shifts):
            wave = render_notes(notes, sample_rate, clip_seconds * clips_per_piece, STYLE_TIMBRE[style], shift)
            clips = cut_clips(wave, clip_samples, clips_per_piece)
            if not clips:
                skipped["silent"] = skipped.get("silent", 0) + 1
                continue
            key = key_label(info.tonic_pc + shift, info.mode)
            for j, c in enumerate(clips):
                tmpl = 2 if split == "heldout" else 0 if split == "all" else (stable_hash(f"{rel}:{r}:{j}") % 2)
                waves.append(torch.from_numpy(c))
                caps.append(caption(info, key, tmpl))
                keys.append(key)
                sty.append(STYLES.index(style))
                pcs.append(rel)
                trs.append(shift)
    if skipped:
        logger.warning("music corpus (%s): skipped %s", split, ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
    w = torch.stack(waves)[:, None] if waves else torch.zeros(0, 1, clip_samples)
    return MusicCorpus(waveforms=w, captions=caps, keys=torch.tensor(keys, dtype=torch.long),
                       styles=torch.tensor(sty, dtype=torch.long), pieces=pcs, transpose=torch.tensor(trs),
                       sample_rate=sample_rate, split=split, infos=infos, skipped=skipped)


DEMO_PER_STYLE = 40  # corpus files per style of the shipped demo (scripts/build_music.py --per-style)


__all__ = [
    "CLIP_SECONDS", "DEMO_PER_STYLE", "KEY_NAMES", "MusicCorpus", "PieceInfo", "SAMPLE_RATE", "STYLES", "caption",
    "caption_words", "cut_clips", "is_heldout", "key_label", "key_name", "list_corpus_paths", "parse_piece", "parse_prompt",
    "piece_info", "render_corpus", "render_notes", "score_notes", "tempo_word", "transpose_of",
]
