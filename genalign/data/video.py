"""Video preference data: jsonl rows, uniform frame sampling, and a collator for video-LM preference training.

Row schema (jsonl, one object per line): ``prompt`` (str), ``video`` (path to a video file or to a folder of frame
images), ``chosen``, ``rejected`` (str); optional ``chosen_masked`` / ``rejected_masked`` (the official RRPO
``answer_masked`` / ``pred_masked`` are accepted too) with differing phrases in ``<MASK>…</MASK>`` (card rrpo.md §4).

Video decoding: PyAV (``pip install av``) if installed; otherwise only frame folders are readable. (torchvision
0.29 no longer ships video decoding, and this environment has neither PyAV nor decord.) Unreadable videos are
skipped and counted (``counts["unreadable_videos"]``), never fatal for a single row.

The collator produces TRL's ``[chosen; rejected]`` layout with the video duplicated for both halves (as the
official RRPO code and TRL's image path do), the same sampled frames for both, a completion mask and, for RRPO,
per-token segment ids.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from genalign.data.segments import segment_ids_from_diff, segment_ids_from_tags, tag_token_variants
from genalign.data.jsonl import read_checked_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "VideoReadError",
    "has_pyav",
    "sample_frame_indices",
    "load_video_frames",
    "probe_video",
    "read_preference_jsonl",
    "video_row_problem",
    "filter_readable",
    "VideoPreferenceCollator",
    "has_chat_template",
    "FRAME_SAMPLING",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TAG_COLUMNS = (("chosen_masked", "rejected_masked"), ("answer_masked", "pred_masked"))


class VideoReadError(RuntimeError):
    """A video (file or frame folder) could not be read."""


def has_pyav() -> bool:
    """Whether PyAV (``import av``) is installed."""
    return importlib.util.find_spec("av") is not None


FRAME_SAMPLING = ("official", "linspace")


def sample_frame_indices(num_total: int, num_frames: int, mode: str = "official") -> list[int]:
    """Frame indices for ``num_frames`` frames out of ``num_total``.

    - ``official`` (default): ``int(i·n/k)`` for i < k — RRPO's loader with ``force_sample``
      (``pritamqu/RRPO@a905573``), the rule its recipes train with.
    - ``linspace``: ``np.linspace(0, n − 1, k)`` truncated to int (includes the last frame; LLaVA-Video's
      ``uniform_sampled_frames``).

    When ``num_frames > num_total`` frames repeat.

    Raises:
        ValueError: ``num_total < 1``, ``num_frames < 1`` or an unknown ``mode``.
    """
    if num_total < 1 or num_frames < 1:
        raise ValueError(f"need num_total >= 1 and num_frames >= 1, got {num_total}, {num_frames}")
    if mode == "official":
        return [int(i * num_total / num_frames) for i in range(num_frames)]
    if mode == "linspace":
        return np.linspace(0, num_total - 1, num_frames, dtype=int).tolist()
    raise ValueError(f"frame sampling must be one of {FRAME_SAMPLING}, got {mode!r}")


def _resolve(path: str, root: str | None) -> str:
    return path if root is None or os.path.isabs(path) else os.path.join(root, path)


def _frame_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))


def load_video_frames(path: str, num_frames: int, video_root: str | None = None,
                      sampling: str = "official") -> np.ndarray:
    """Load ``num_frames`` RGB frames sampled by :func:`sample_frame_indices` (``sampling``).

    Args:
        path: video file (needs PyAV) or directory of frame images (sorted by file name).
        num_frames: frames to sample (RRPO LLaVA-Video recipe: 16 [code]).
        video_root: prefix for relative paths.

    Returns:
        uint8 array ``[num_frames, H, W, 3]``.

    Raises:
        VideoReadError: missing path, empty folder, undecodable file, frames of different sizes, or a video file
            without PyAV installed.
    """
    from PIL import Image

    full = _resolve(path, video_root)
    if os.path.isdir(full):
        files = _frame_files(full)
        if not files:
            raise VideoReadError(f"no frame images in {full}")
        frames = []
        try:
            for i in sample_frame_indices(len(files), num_frames, sampling):
                with Image.open(os.path.join(full, files[i])) as im:
                    frames.append(np.asarray(im.convert("RGB")))
        except OSError as err:
            raise VideoReadError(f"cannot read frame in {full}: {err}") from err
        if len({f.shape for f in frames}) != 1:
            raise VideoReadError(f"frames in {full} have different sizes")
        return np.stack(frames)
    if not os.path.isfile(full):
        raise VideoReadError(f"video not found: {full}")
    if not has_pyav():
        raise VideoReadError(
            f"cannot decode {full}: PyAV is not installed (pip install av); or extract the frames into a folder of "
            "images and point `video` at it"
        )
    import av

    try:
        with av.open(full) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as err:  # PyAV raises several error types
        raise VideoReadError(f"cannot decode {full}: {err}") from err
    if not frames:
        raise VideoReadError(f"no frames decoded from {full}")
    return np.stack([frames[i] for i in sample_frame_indices(len(frames), num_frames, sampling)])


def probe_video(path: str, num_frames: int = 1, video_root: str | None = None) -> bool:
    """True if :func:`load_video_frames` succeeds (a full read; used once per row before training)."""
    try:
        load_video_frames(path, num_frames, video_root)
        return True
    except VideoReadError:
        return False


def read_preference_jsonl(path: str, counts: Counter | None = None) -> list[dict]:
    """Read video preference rows; malformed rows are skipped, counted and logged (never fatal).

    Args:
        path: jsonl file. counts: optional ``Counter`` receiving ``bad_rows/<reason>`` counts.

    Returns:
        list of dicts with at least ``prompt``, ``video``, ``chosen``, ``rejected`` (strings; ``media_path`` is
        accepted as an alias of ``video``, as in the official RRPO loader; ``question`` / ``answer`` / ``pred`` as
        aliases of prompt / chosen / rejected).

    Raises:
        ConfigError: the file does not exist or cannot be read (one line naming it).
    """
    counts = counts if counts is not None else Counter()
    return read_checked_jsonl(path, video_row_problem, counts)


_ALIASES = {"media_path": "video", "question": "prompt", "answer": "chosen", "pred": "rejected"}


def video_row_problem(row) -> str | None:
    """Why a video preference row is unusable (None if usable); renames the official loader's aliases in place."""
    if not isinstance(row, dict):
        return "not_an_object"
    for a, b in _ALIASES.items():
        if a in row and b not in row:
            row[b] = row.pop(a)
    missing = {"prompt", "video", "chosen", "rejected"} - set(row)
    if missing:
        return "missing_" + "_".join(sorted(missing))
    if not all(isinstance(row[k], str) for k in ("prompt", "video", "chosen", "rejected")):
        return "non_string_field"
    return None


def filter_readable(rows: list[dict], num_frames: int = 1, video_root: str | None = None) -> tuple[list[dict], int]:
    """Drop rows whose video cannot be read; returns ``(kept_rows, n_dropped)`` and logs the count."""
    kept = [r for r in rows if probe_video(r["video"], num_frames, video_root)]
    bad = len(rows) - len(kept)
    if bad:
        logger.warning("skipped %d/%d rows with unreadable videos", bad, len(rows))
    return kept, bad


def _video_placeholder(processor) -> str:
    tok = getattr(processor, "tokenizer", processor)
    video = getattr(processor, "video_token", None) or "<video>"
    vocab = tok.get_vocab()
    if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:  # Qwen2-VL family
        return f"<|vision_start|>{video}<|vision_end|>"
    return video


def _video_token_ids(processor) -> set[int]:
    """Ids of the tokens that make up the expanded video span (pads + vision start/end / newline markers)."""
    tok = getattr(processor, "tokenizer", processor)
    vocab = tok.get_vocab()
    names = [getattr(processor, "video_token", None), "<|vision_start|>", "<|vision_end|>", "<video>"]
    return {vocab[n] for n in names if n and n in vocab}


def has_chat_template(processor) -> bool:
    """Whether the processor (or its tokenizer) defines a chat template, i.e. is a chat model's."""
    tok = getattr(processor, "tokenizer", processor)
    return bool(getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None))


@dataclass
class VideoPreferenceCollator:
    """Collate video preference rows into a ``[2B, L]`` batch for a video-LM (Qwen2-VL, LLaVA-OneVision/Video).

    Args:
        processor: the model's ``ProcessorMixin`` (tokenizer + video processor).
        num_frames: frames sampled per video (same frames for chosen and rejected, policy and reference).
        video_root: prefix for relative video paths.
        max_length: truncate completions so prompt + completion fits (keep start); ``None`` = no truncation. The
            prompt with its **expanded** video tokens (e.g. 16·14²+1 = 3,137 for LLaVA-OneVision at 16 frames) is
            never cut: a row whose prompt is longer raises ``ValueError`` naming the row.
        frame_sampling: ``official`` (RRPO ``int(i·n/k)``) | ``linspace`` (see :func:`sample_frame_indices`).
        chat_template: ``auto`` (the processor's chat template when it has one — chat models, e.g. LLaVA-Video's
            Qwen ChatML with its system prompt, RRPO ``--version qwen_1_5`` [code]) | ``on`` | ``off``
            (``prompt_template``).
        prompt_template: without chat template: ``{video}`` → the processor's video placeholder, ``{prompt}`` → the
            prompt (a leading ``<image>``/``<video>`` tag of the official data is removed).
        segment_mode: ``None`` (no segment ids), ``"diff"``, ``"tags"`` or ``"auto"`` — RRPO segment ids on the
            completion tokens; rows without a phrase (before or after truncation) are skipped and counted.
        min_match: diff minimum matching block (1 [code]). fused_space_tags: see ``tag_token_variants``.
        tag_open, tag_close: phrase tags (``objective.tag_open`` / ``tag_close``; [code] ``<MASK>``/``</MASK>``).
        add_eos: append the EOS token to both completions (as TRL does for plain text).

    Returns (``__call__``):
        dict with ``input_ids``, ``attention_mask``, ``completion_mask`` ``[2B, L]`` (right-padded), the
        processor's video tensors (``pixel_values_videos``, ``video_grid_thw``, …, duplicated for both halves),
        ``mm_token_type_ids`` if the processor returns it, and ``segment_ids`` ``[2B, L]`` if ``segment_mode``.

    Raises:
        RuntimeError: every row of the batch was skipped (unreadable video / no phrase).
        ValueError: ``max_length`` would cut inside a row's prompt / video span (names the row and both lengths).

    Attributes:
        counts: ``Counter`` of skipped rows (``unreadable_videos``, ``no_phrase``, ``no_phrase_after_truncation``),
            tag statuses and ``max_video_tokens`` (largest expanded video span seen).
    """

    processor: Any
    num_frames: int = 16
    video_root: str | None = None
    max_length: int | None = None
    frame_sampling: str = "official"
    chat_template: str = "auto"
    prompt_template: str = "{video}{prompt}"
    segment_mode: str | None = "auto"
    min_match: int = 1
    fused_space_tags: bool = True
    tag_open: str = "<MASK>"
    tag_close: str = "</MASK>"
    add_eos: bool = True
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.chat_template not in ("auto", "on", "off"):
            raise ValueError(f"chat_template must be auto, on or off, got {self.chat_template!r}")
        if self.frame_sampling not in FRAME_SAMPLING:
            raise ValueError(f"frame_sampling must be one of {FRAME_SAMPLING}, got {self.frame_sampling!r}")
        self._tag_variants = None
        self._video_ids = _video_token_ids(self.processor)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def use_chat_template(self) -> bool:
        """Whether prompts go through the processor's chat template."""
        return self.chat_template == "on" or (self.chat_template == "auto" and has_chat_template(self.processor))

    def _prompt_text(self, prompt: str) -> str:
        p = prompt
        for tag in ("<image>\n", "<video>\n", "<image>", "<video>"):
            if p.startswith(tag):
                p = p[len(tag):]
                break
        if self.use_chat_template:
            msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": p}]}]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return self.prompt_template.format(video=_video_placeholder(self.processor), prompt=p)

    def _segments(self, ex, c_ids, r_ids):
        cols = next((c for c in TAG_COLUMNS if c[0] in ex), None)
        mode = self.segment_mode if self.segment_mode != "auto" else ("tags" if cols else "diff")
        if mode == "diff":
            return segment_ids_from_diff(c_ids, r_ids, min_match=self.min_match)
        if cols is None:
            raise ValueError("segment_mode='tags' needs chosen_masked/rejected_masked columns")
        if self._tag_variants is None:
            tt = copy.deepcopy(self.tokenizer)
            tt.add_special_tokens({"additional_special_tokens": [self.tag_open, self.tag_close]})
            self._tag_tok = tt
            self._tag_variants = tag_token_variants(tt, self.tag_open, self.tag_close, fused_space=self.fused_space_tags)
        out = []
        for col, plain in ((cols[0], c_ids), (cols[1], r_ids)):
            text = ex[col] + (self.tokenizer.eos_token if self.add_eos else "")
            tagged = self._tag_tok(text, add_special_tokens=False)["input_ids"]
            seg, status = segment_ids_from_tags(tagged, plain, *self._tag_variants)
            self.counts[f"tags/{status}"] += 1
            out.append(seg)
        return out[0], out[1]

    def _process(self, rows):
        prompts = [self._prompt_text(r["ex"]["prompt"]) for r in rows]
        videos = [r["frames"] for r in rows]
        return self.processor(text=prompts * 2, videos=videos * 2, padding=True, return_tensors="pt",
                              add_special_tokens=False)

    def _fit(self, rows, proc) -> list[dict]:
        """Check the prompt (video span included) fits ``max_length`` and truncate completions; rows whose phrase
        falls wholly past the cut are dropped and counted."""
        lengths = proc["attention_mask"].sum(1).tolist()
        kept = []
        for j, r in enumerate(rows):
            n_p = int(lengths[j])
            ids = proc["input_ids"][j][proc["attention_mask"][j].bool()].tolist()
            video = [i for i, t in enumerate(ids) if t in self._video_ids]
            if video:
                self.counts["max_video_tokens"] = max(self.counts["max_video_tokens"], video[-1] - video[0] + 1)
            if self.max_length is not None and n_p >= self.max_length:
                raise ValueError(
                    f"row {r['ex'].get('row_id', r['index'])}: the prompt is {n_p} tokens with its expanded video "
                    f"({len(video)} video tokens, {self.num_frames} frames) but max_length is {self.max_length}; "
                    f"raise data.max_length (a cut inside the video span would break the model's forward)")
            room = None if self.max_length is None else self.max_length - n_p
            c, rj = r["chosen"][:room], r["rejected"][:room]
            if r["segs"] is not None:
                sc, sr = r["segs"][0][:room], r["segs"][1][:room]
                if not (any(x > 0 for x in sc) or any(x > 0 for x in sr)):
                    self.counts["no_phrase_after_truncation"] += 1
                    logger.warning("row %s: its differing phrase is cut off by max_length=%s; skipped",
                                   r["ex"].get("row_id", r["index"]), self.max_length)
                    continue
                r = dict(r, segs=(sc, sr))
            kept.append(dict(r, chosen=c, rejected=rj))
        return kept

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        tok = self.tokenizer
        eos = tok.eos_token if self.add_eos else ""
        rows = []
        for i, ex in enumerate(examples):
            try:
                frames = load_video_frames(ex["video"], self.num_frames, self.video_root, self.frame_sampling)
            except VideoReadError as err:
                self.counts["unreadable_videos"] += 1
                logger.warning("skipping row with unreadable video (%d so far): %s", self.counts["unreadable_videos"],
                               err)
                continue
            c = tok(ex["chosen"] + eos, add_special_tokens=False)["input_ids"]
            r = tok(ex["rejected"] + eos, add_special_tokens=False)["input_ids"]
            segs = None
            if self.segment_mode:
                segs = self._segments(ex, c, r)
                if not (any(x > 0 for x in segs[0]) or any(x > 0 for x in segs[1])):
                    self.counts["no_phrase"] += 1
                    continue
            rows.append({"ex": ex, "index": i, "frames": frames, "chosen": c, "rejected": r, "segs": segs})
        if not rows:
            raise RuntimeError(f"every row of the batch was skipped ({dict(self.counts)})")
        proc = self._process(rows)
        kept = self._fit(rows, proc)
        if not kept:
            raise RuntimeError(f"every row of the batch was skipped ({dict(self.counts)})")
        if len(kept) < len(rows):  # rare: re-process the survivors so the video tensors match the rows
            proc = self._process(kept)
        p_ids, p_mask = proc["input_ids"], proc["attention_mask"]
        mm = proc.get("mm_token_type_ids")
        completions = [r["chosen"] for r in kept] + [r["rejected"] for r in kept]
        seg_rows = ([r["segs"][0] for r in kept] + [r["segs"][1] for r in kept]) if self.segment_mode else None
        seqs, mms, cms, sgs = [], [], [], []
        for j, comp in enumerate(completions):
            valid = p_mask[j].bool()
            pi = p_ids[j][valid].tolist()
            seqs.append(pi + list(comp))
            cms.append([0] * len(pi) + [1] * len(comp))
            if mm is not None:
                mms.append(mm[j][valid].tolist() + [0] * len(comp))
            if seg_rows is not None:
                sgs.append([0] * len(pi) + list(seg_rows[j]))
        width = max(map(len, seqs))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def mat(rows_, value):
            t = torch.full((len(rows_), width), value, dtype=torch.long)
            for i, r in enumerate(rows_):
                t[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            return t

        out = {k: v for k, v in proc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        out["input_ids"] = mat(seqs, pad)
        out["attention_mask"] = mat([[1] * len(x) for x in seqs], 0)
        out["completion_mask"] = mat(cms, 0)
        if mm is not None:
            out["mm_token_type_ids"] = mat(mms, 0)
        if seg_rows is not None:
            out["segment_ids"] = mat(sgs, 0)
        return out
