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
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from genalign.data.segments import segment_ids_from_diff, segment_ids_from_tags, tag_token_variants

logger = logging.getLogger(__name__)

__all__ = [
    "VideoReadError",
    "has_pyav",
    "sample_frame_indices",
    "load_video_frames",
    "probe_video",
    "read_preference_jsonl",
    "filter_readable",
    "VideoPreferenceCollator",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TAG_COLUMNS = (("chosen_masked", "rejected_masked"), ("answer_masked", "pred_masked"))


class VideoReadError(RuntimeError):
    """A video (file or frame folder) could not be read."""


def has_pyav() -> bool:
    """Whether PyAV (``import av``) is installed."""
    return importlib.util.find_spec("av") is not None


def sample_frame_indices(num_total: int, num_frames: int) -> list[int]:
    """Uniformly spaced frame indices including the first and last frame.

    ``np.linspace(0, num_total − 1, num_frames)`` truncated to int, as LLaVA-Video's loader
    (``uniform_sampled_frames``) does; when ``num_frames > num_total`` frames repeat.

    Raises:
        ValueError: ``num_total < 1`` or ``num_frames < 1``.
    """
    if num_total < 1 or num_frames < 1:
        raise ValueError(f"need num_total >= 1 and num_frames >= 1, got {num_total}, {num_frames}")
    return np.linspace(0, num_total - 1, num_frames, dtype=int).tolist()


def _resolve(path: str, root: str | None) -> str:
    return path if root is None or os.path.isabs(path) else os.path.join(root, path)


def _frame_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))


def load_video_frames(path: str, num_frames: int, video_root: str | None = None) -> np.ndarray:
    """Load ``num_frames`` uniformly sampled RGB frames.

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
            for i in sample_frame_indices(len(files), num_frames):
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
    return np.stack([frames[i] for i in sample_frame_indices(len(frames), num_frames)])


def probe_video(path: str, num_frames: int = 1, video_root: str | None = None) -> bool:
    """True if :func:`load_video_frames` succeeds (a full read; used once per row before training)."""
    try:
        load_video_frames(path, num_frames, video_root)
        return True
    except VideoReadError:
        return False


def read_preference_jsonl(path: str) -> list[dict]:
    """Read video preference rows.

    Returns:
        list of dicts with at least ``prompt``, ``video``, ``chosen``, ``rejected`` (``media_path`` is accepted as
        an alias of ``video``, as in the official RRPO loader; ``question`` / ``answer`` / ``pred`` as aliases of
        prompt / chosen / rejected).

    Raises:
        ValueError: a line that is not JSON or lacks a required field (message gives the line number).
    """
    aliases = {"media_path": "video", "question": "prompt", "answer": "chosen", "pred": "rejected"}
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
            for a, b in aliases.items():
                if a in row and b not in row:
                    row[b] = row.pop(a)
            missing = {"prompt", "video", "chosen", "rejected"} - set(row)
            if missing:
                raise ValueError(f"{path}:{n}: missing fields {sorted(missing)}")
            rows.append(row)
    return rows


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


@dataclass
class VideoPreferenceCollator:
    """Collate video preference rows into a ``[2B, L]`` batch for a video-LM (Qwen2-VL, LLaVA-OneVision/Video).

    Args:
        processor: the model's ``ProcessorMixin`` (tokenizer + video processor).
        num_frames: frames sampled uniformly per video (same frames for chosen and rejected).
        video_root: prefix for relative video paths.
        max_length: truncate sequences (keep start) to this many tokens; ``None`` = no truncation.
        prompt_template: used when ``use_chat_template`` is False: ``{video}`` is replaced by the processor's video
            placeholder, ``{prompt}`` by the prompt (a leading ``<image>``/``<video>`` tag of the official data is
            removed).
        use_chat_template: render ``[{"role": "user", "content": [video, text]}]`` with the processor's chat
            template and ``add_generation_prompt=True`` (real checkpoints).
        segment_mode: ``None`` (no segment ids), ``"diff"``, ``"tags"`` or ``"auto"`` (tags if the row has tag
            columns, else diff) — RRPO segment ids on the completion tokens; rows without a phrase are skipped.
        min_match: diff minimum matching block (1 [code]). fused_space_tags: see ``tag_token_variants``.
        add_eos: append the EOS token to both completions (as TRL does for plain text).

    Returns (``__call__``):
        dict with ``input_ids``, ``attention_mask``, ``completion_mask`` ``[2B, L]`` (right-padded), the
        processor's video tensors (``pixel_values_videos``, ``video_grid_thw``, …, duplicated for both halves),
        ``mm_token_type_ids`` if the processor returns it, and ``segment_ids`` ``[2B, L]`` if ``segment_mode``.

    Raises:
        RuntimeError: every row of the batch was skipped (unreadable video / no phrase).

    Attributes:
        counts: ``Counter`` of skipped rows (``unreadable_videos``, ``no_phrase``) and tag statuses.
    """

    processor: Any
    num_frames: int = 16
    video_root: str | None = None
    max_length: int | None = None
    prompt_template: str = "{video}{prompt}"
    use_chat_template: bool = False
    segment_mode: str | None = "auto"
    min_match: int = 1
    fused_space_tags: bool = True
    add_eos: bool = True
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self._tag_variants = None

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

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
            tt.add_special_tokens({"additional_special_tokens": ["<MASK>", "</MASK>"]})
            self._tag_tok = tt
            self._tag_variants = tag_token_variants(tt, fused_space=self.fused_space_tags)
        out = []
        for col, plain in ((cols[0], c_ids), (cols[1], r_ids)):
            text = ex[col] + (self.tokenizer.eos_token if self.add_eos else "")
            tagged = self._tag_tok(text, add_special_tokens=False)["input_ids"]
            seg, status = segment_ids_from_tags(tagged, plain, *self._tag_variants)
            self.counts[f"tags/{status}"] += 1
            out.append(seg)
        return out[0], out[1]

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        tok = self.tokenizer
        eos = tok.eos_token if self.add_eos else ""
        kept, videos, chosen_ids, rejected_ids, segs = [], [], [], [], []
        for ex in examples:
            try:
                frames = load_video_frames(ex["video"], self.num_frames, self.video_root)
            except VideoReadError as err:
                self.counts["unreadable_videos"] += 1
                logger.warning("skipping row with unreadable video (%d so far): %s", self.counts["unreadable_videos"],
                               err)
                continue
            c = tok(ex["chosen"] + eos, add_special_tokens=False)["input_ids"]
            r = tok(ex["rejected"] + eos, add_special_tokens=False)["input_ids"]
            if self.segment_mode:
                sc, sr = self._segments(ex, c, r)
                if not (any(s > 0 for s in sc) or any(s > 0 for s in sr)):
                    self.counts["no_phrase"] += 1
                    continue
                segs.append((sc, sr))
            kept.append(ex)
            videos.append(frames)
            chosen_ids.append(c)
            rejected_ids.append(r)
        if not kept:
            raise RuntimeError(f"every row of the batch was skipped ({dict(self.counts)})")

        prompts = [self._prompt_text(ex["prompt"]) for ex in kept]
        proc = self.processor(text=prompts * 2, videos=videos * 2, padding=True, return_tensors="pt",
                              add_special_tokens=False)
        p_ids, p_mask = proc["input_ids"], proc["attention_mask"]
        mm = proc.get("mm_token_type_ids")
        completions = chosen_ids + rejected_ids
        seg_rows = [s[0] for s in segs] + [s[1] for s in segs] if segs else None
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
        if self.max_length is not None:
            cut = lambda rows: [r[: self.max_length] for r in rows]  # noqa: E731
            seqs, cms, mms, sgs = cut(seqs), cut(cms), cut(mms), cut(sgs)
        width = max(map(len, seqs))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def mat(rows, value):
            t = torch.full((len(rows), width), value, dtype=torch.long)
            for i, r in enumerate(rows):
                t[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            return t

        out = {k: v for k, v in proc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        out["input_ids"] = mat(seqs, pad)
        out["attention_mask"] = mat([[1] * len(s) for s in seqs], 0)
        out["completion_mask"] = mat(cms, 0)
        if mm is not None:
            out["mm_token_type_ids"] = mat(mms, 0)
        if seg_rows is not None:
            out["segment_ids"] = mat(sgs, 0)
        return out
