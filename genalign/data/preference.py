"""Preference pairs: Pick-a-Pic v2 schema (parquet folder / hub id / arrow folder) or jsonl + images.

Pick-a-Pic schema: ``caption, jpg_0, jpg_1, label_0, label_1`` (encoded image bytes; label 1 = won, 0.5 = tie).
genalign's jsonl schema: ``{"prompt", "chosen", "rejected"}`` (image paths relative to the jsonl file) with an
optional ``label`` (0.5 = tie). Ties are dropped by default (``ties: error`` raises instead); the winner is put
first; undecodable images are skipped and counted — never a crash halfway through an epoch.

Two ways to read a source:

- :class:`PreferenceSource` — a lazy random-access table. Building it reads only the light columns (caption and
  labels; for parquet through pyarrow, in place, no second copy on disk); the image bytes of row ``i`` are read
  when :meth:`PreferenceSource.load_pair` asks for them (per batch, in DataLoader workers —
  :mod:`genalign.data.streaming`).
- :func:`load_preference_pairs` — decode every pair up front into tensors (small sets whose latents are cached).

Augmentation follows MaPO's preprocessing (``utils.py::get_dataset_preprocessor``, mapo.md §5): the loser is
resized to the winner's size (PIL default filter), shorter side → ``resolution`` (bilinear), horizontal flip,
then a centre crop at ``round((size − resolution) / 2)`` or, with ``random_crop``, a uniform crop offset in
``[0, size − resolution]``; the crop (top, left) and the winner's original (h, w) feed SDXL ``time_ids``.

Source: MaPO ``train.py`` L278–279 / ``utils.py`` L218–224 and Diffusion-DPO ``train.py`` L855–863 (tie filter,
winner first).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from genalign.data.decode import decode_image  # noqa: F401  (public here too: the loaders' decoder)

logger = logging.getLogger(__name__)

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


@dataclass
class PreferencePairs:
    """Decoded pairs: ``chosen`` / ``rejected`` float ``(N, 3, H, W)`` in [0, 1], prompts, SDXL size info, counts."""

    prompts: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    original_sizes: torch.Tensor  # (N, 2) (h, w) of the chosen image before resizing
    crop_top_lefts: torch.Tensor  # (N, 2)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


# -- decoding ------------------------------------------------------------------------------------------------
def resize_crop(img: Image.Image, resolution: int, hflip: bool = False, random_crop: bool = False,
                rng: np.random.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Shorter side → ``resolution`` (bilinear), optional horizontal flip, then a centre or random crop.

    Returns ``(x, (h, w), (top, left))``: ``x`` float ``(3, r, r)`` in [0, 1], the original size and the crop
    offset (for SDXL micro-conditioning). The flip comes before the crop and the random offset is drawn in the
    flipped frame, as in MaPO's ``preprocess_train``; centre offsets are ``round((size − r) / 2)``.

    Raises:
        ValueError: ``random_crop`` without ``rng``.
    """
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, int(w * scale)), max(resolution, int(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    if hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if random_crop:
        if rng is None:
            raise ValueError("resize_crop: random_crop needs a seeded rng")
        top, left = int(rng.integers(0, nh - resolution + 1)), int(rng.integers(0, nw - resolution + 1))
    else:
        top, left = max(0, int(round((nh - resolution) / 2.0))), max(0, int(round((nw - resolution) / 2.0)))
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x, (h, w), (top, left)


def resize_center_crop(img: Image.Image, resolution: int, hflip: bool = False) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """:func:`resize_crop` with a centre crop (kept for callers that never crop at random)."""
    return resize_crop(img, resolution, hflip)


def prepare_pair(img_w: Image.Image, img_l: Image.Image, resolution: int, rng: np.random.Generator,
                 hflip: bool = False, pair_augment: str = "joint", random_crop: bool = False):
    """Winner / loser images → ``(x_w, x_l, original_size, crop_top_left)`` (tensors ``(3, r, r)`` in [0, 1]).

    The loser is first resized to the winner's size (MaPO ``utils.py``); ``pair_augment`` "joint" gives both the
    same flip and crop (MaPO / diffusers transform the 6-channel stack), "independent" draws each on its own
    (SF-DPO). The size / crop returned are the winner's (both members share one ``time_ids``).
    """
    if img_l.size != img_w.size:
        img_l = img_l.resize(img_w.size)
    flip_w = bool(hflip and rng.random() < 0.5)
    state = rng.bit_generator.state  # "joint": replay the winner's crop draw for the loser
    xw, size, crop = resize_crop(img_w, resolution, flip_w, random_crop, rng)
    if pair_augment == "joint":
        rng.bit_generator.state = state
        xl, _, _ = resize_crop(img_l, resolution, flip_w, random_crop, rng)
    else:
        flip_l = bool(hflip and rng.random() < 0.5)
        xl, _, _ = resize_crop(img_l, resolution, flip_l, random_crop, rng)
    return xw, xl, size, crop


# -- lazy random-access table --------------------------------------------------------------------------------
def _label(v) -> float:
    """A Pick-a-Pic label as float; raises ValueError on anything else (a bad row)."""
    if isinstance(v, bool) or v is None:
        raise ValueError(f"label {v!r}")
    return float(v)


class PreferenceSource:
    """A preference data source as a random-access table of usable rows (ties and malformed rows removed).

    Building reads only captions and labels; :meth:`load_pair` reads and decodes one row's images. Picklable
    (DataLoader workers reopen parquet files lazily in their own process).

    Args:
        source: a ``.jsonl`` file, a folder with a jsonl / ``*.parquet`` files (read in place with pyarrow) /
            a ``datasets.save_to_disk`` folder, or a `datasets` hub id (its parquet files are read remotely,
            row group by row group, through ``huggingface_hub.HfFileSystem``: only captions and labels up front).
        split: split name for hub ids / DatasetDict folders.
        ties: "drop" (count and skip) or "error".
        max_pairs: keep the first N usable rows.

    Attributes:
        n: number of usable rows. skipped: ``{"ties", "bad_rows", "unreadable_images"}`` counts so far.

    Raises:
        FileNotFoundError: a missing file / folder, or a hub id that cannot be reached.
        ValueError: a tie with ``ties="error"``, missing Pick-a-Pic columns (names the file), no usable row.
    """

    def __init__(self, source: str, split: str = "train", ties: str = "drop", max_pairs: int | None = None):
        self.source, self.split, self.ties_mode = str(source), split, ties
        self.skipped = {"ties": 0, "unreadable_images": 0, "bad_rows": 0}
        self.kind = ""
        self._files: list[str] = []
        self._fs_hub = False
        self._rg_starts: list[np.ndarray] = []
        self._handles: dict = {}
        self._rg_cache: dict = {}
        self._pid = os.getpid()
        self._build(max_pairs)
        for k, v in self.skipped.items():
            if v:
                logger.warning("data.source %s: skipped %d %s", source, v, k.replace("_", " "))
        if self.n == 0:
            raise ValueError(f"data.source {source!r}: no usable preference pair (skipped: {self.skipped})")

    # building -------------------------------------------------------------------------------------------------
    def _keep(self, prompt, l0: float, where: str) -> bool | None:
        """None = drop (counted), else ``swap`` (True when label_0 == 0: the winner is jpg_1)."""
        if prompt is None or not isinstance(prompt, str):
            self.skipped["bad_rows"] += 1
            return None
        if l0 == 0.5:
            if self.ties_mode == "error":
                raise ValueError(f"data.source {self.source!r}: tie in preference labels for prompt {prompt!r} "
                                 f"({where}; ties: error)")
            self.skipped["ties"] += 1
            return None
        return l0 == 0

    def _build(self, max_pairs):
        path = Path(self.source)
        jsonl = path if path.suffix == ".jsonl" else None
        if jsonl is None and path.is_dir():
            cands = sorted(path.glob("*.jsonl"))
            jsonl = cands[0] if cands else None
        if jsonl is not None:
            return self._build_jsonl(jsonl, max_pairs)
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*.parquet"))
            if files:
                return self._build_parquet(files, max_pairs)
            return self._build_arrow(path, max_pairs)
        if path.exists():
            raise ValueError(f"data.source: {self.source!r} is a file but not .jsonl; give a .jsonl file or a folder")
        return self._build_hub(max_pairs)

    def _build_jsonl(self, jsonl: Path, max_pairs):
        if not jsonl.exists():
            raise FileNotFoundError(f"data.source: {str(jsonl)!r} not found")
        self.kind, base = "jsonl", jsonl.parent
        prompts, ws, ls = [], [], []
        with open(jsonl) as f:
            for i, line in enumerate(f):
                if max_pairs and len(prompts) >= max_pairs:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not an object")
                    chosen, rejected = row["chosen"], row["rejected"]
                    if not isinstance(chosen, str) or not isinstance(rejected, str):
                        raise ValueError("image paths must be strings")
                    label = _label(row.get("label", 1.0))
                except (ValueError, KeyError, TypeError):
                    self.skipped["bad_rows"] += 1
                    continue
                swap = self._keep(row.get("prompt"), label if label == 0.5 else 1.0, f"line {i + 1}")
                if swap is None:
                    continue
                prompts.append(row["prompt"])
                ws.append(str(base / chosen))
                ls.append(str(base / rejected))
        self._prompts, self._w, self._l = prompts, ws, ls
        self.n = len(prompts)

    def _index_table(self, table, where: str, max_pairs, offset: int):
        """Filter one arrow table of (caption, label_0) → kept row numbers, swaps, captions."""
        caps = table.column("caption").to_pylist()
        labels = table.column("label_0").to_pylist()
        rows, swaps, kept_caps = [], [], []
        for r, (c, l0) in enumerate(zip(caps, labels)):
            if max_pairs and offset + len(rows) >= max_pairs:
                break
            try:
                l0 = _label(l0)
            except (ValueError, TypeError):
                self.skipped["bad_rows"] += 1
                continue
            swap = self._keep(c, l0, f"{where} row {r}")
            if swap is None:
                continue
            rows.append(r)
            swaps.append(swap)
            kept_caps.append(c)
        return rows, swaps, kept_caps

    def _build_parquet(self, files: list[str], max_pairs, hub: bool = False):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.kind, self._files, self._fs_hub = "parquet", files, hub
        file_idx, row_idx, swaps, caps = [], [], [], []
        for k, f in enumerate(files):
            if max_pairs and len(row_idx) >= max_pairs:
                break
            pf = self._parquet(k)
            names = set(pf.schema_arrow.names)
            missing = [c for c in PICKAPIC_COLUMNS if c not in names]
            if missing:
                raise ValueError(f"data.source {f}: missing Pick-a-Pic column(s) {', '.join(missing)} "
                                 f"(has: {', '.join(sorted(names))})")
            md = pf.metadata
            self._rg_starts.append(np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)]))
            rows, sw, cs = self._index_table(pf.read(columns=["caption", "label_0"]), f, max_pairs, len(row_idx))
            file_idx.extend([k] * len(rows))
            row_idx.extend(rows)
            swaps.extend(sw)
            caps.extend(cs)
        self._file_idx = np.asarray(file_idx, dtype=np.int32)
        self._row_idx = np.asarray(row_idx, dtype=np.int64)
        self._swap = np.asarray(swaps, dtype=bool)
        self._captions = pa.array(caps, type=pa.string())  # arrow: ~1 byte a character, not a Python object each
        self.n = len(row_idx)
        self._handles.clear()  # reopened lazily (and per worker process)

    def _build_arrow(self, path: Path, max_pairs):
        import pyarrow as pa

        try:
            import datasets
        except ImportError:
            raise ImportError("data.source: reading arrow folders needs `pip install datasets`") from None
        try:
            ds = datasets.load_from_disk(str(path))  # memory-mapped: no copy
        except Exception as err:
            raise FileNotFoundError(f"data.source: {str(path)!r} has no jsonl, parquet or saved dataset "
                                    f"({type(err).__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[self.split]
        missing = [c for c in PICKAPIC_COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"data.source {path}: missing Pick-a-Pic column(s) {', '.join(missing)}")
        rows, swaps, caps = self._index_table(ds.data.table.select(["caption", "label_0"]), str(path), max_pairs, 0)
        self.kind, self._ds = "arrow", ds
        self._row_idx, self._swap = np.asarray(rows, dtype=np.int64), np.asarray(swaps, dtype=bool)
        self._captions = pa.array(caps, type=pa.string())
        self.n = len(rows)

    def _build_hub(self, max_pairs):
        try:
            from huggingface_hub import HfFileSystem

            fs = HfFileSystem()
            files = sorted(p for p in fs.glob(f"datasets/{self.source}/**/*.parquet")
                           if Path(p).name.split("-")[0] == self.split or f"/{self.split}/" in p)
            if not files:
                raise FileNotFoundError("no parquet files for this split")
        except Exception as err:
            raise FileNotFoundError(
                f"data.source: cannot load {self.source!r} ({type(err).__name__}); give a local folder of parquet/"
                "arrow files or a jsonl file, or allow network access to the Hugging Face Hub") from None
        self._build_parquet(["hf://" + f for f in files], max_pairs, hub=True)

    # reading --------------------------------------------------------------------------------------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_rg_cache"] = {}, {}  # open files / cached row groups stay per process
        return state

    def _parquet(self, k: int):
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # a forked worker: never share file handles with the parent
            self._handles, self._rg_cache, self._pid = {}, {}, os.getpid()
        if k not in self._handles:
            f = self._files[k]
            if f.startswith("hf://"):
                from huggingface_hub import HfFileSystem

                self._handles[k] = pq.ParquetFile(HfFileSystem().open(f[len("hf://"):], "rb"))
            else:
                self._handles[k] = pq.ParquetFile(f)
        return self._handles[k]

    def prompt(self, i: int) -> str:
        """Caption of usable row ``i``."""
        return self._prompts[i] if self.kind == "jsonl" else self._captions[int(i)].as_py()

    def _raw_images(self, i: int):
        """(winner, loser) as stored: paths, bytes or ``{"bytes"}`` dicts."""
        i = int(i)
        if self.kind == "jsonl":
            return self._w[i], self._l[i]
        if self.kind == "arrow":
            row = self._ds[int(self._row_idx[i])]
            a, b = row["jpg_0"], row["jpg_1"]
        else:
            k, r = int(self._file_idx[i]), int(self._row_idx[i])
            starts = self._rg_starts[k]
            g = int(np.searchsorted(starts, r, side="right") - 1)
            table = self._rg_cache.get((k, g))
            if table is None:
                # Why a whole row group: parquet's unit of random access; keep the last two for neighbours.
                table = self._parquet(k).read_row_group(g, columns=["jpg_0", "jpg_1"])
                if len(self._rg_cache) >= 2:
                    self._rg_cache.pop(next(iter(self._rg_cache)))
                self._rg_cache[(k, g)] = table
            o = r - int(starts[g])
            a, b = table.column("jpg_0")[o].as_py(), table.column("jpg_1")[o].as_py()
        return (b, a) if self._swap[i] else (a, b)

    def load_pair(self, i: int) -> tuple[str, Image.Image, Image.Image]:
        """Row ``i`` → (prompt, winner image, loser image), decoded to RGB.

        Raises:
            OSError / ValueError / TypeError: an undecodable image (the caller counts and skips it).
        """
        w, l = self._raw_images(i)
        return self.prompt(i), decode_image(w), decode_image(l)

    def head(self, k: int = 8) -> list[dict]:
        """The first ``k`` usable rows as ``{"prompt", "ok", "error"}`` (images decoded), for ``genalign plan``."""
        out = []
        for i in range(min(k, self.n)):
            try:
                self.load_pair(i)
                out.append({"prompt": self.prompt(i), "ok": True, "error": ""})
            except Exception as err:  # report, do not raise: plan lists every bad row it sees
                out.append({"prompt": self.prompt(i), "ok": False, "error": f"{type(err).__name__}: {err}"})
        return out


def iter_source_rows(source: str, split: str):
    """Yield every raw row, ties and bad rows included (``genalign relabel`` in scoring.py re-judges them all):
    Pick-a-Pic dicts, or jsonl dicts with a ``_base`` folder for relative image paths (``{"_bad": reason}`` for a
    line that is not a JSON object). Parquet is read in place in batches of 64 rows; hub ids are streamed."""
    path = Path(source)
    jsonl = path if path.suffix == ".jsonl" else None
    if path.is_dir() and not jsonl:
        cands = sorted(path.glob("*.jsonl"))
        jsonl = cands[0] if cands else None
    if jsonl is not None:
        if not jsonl.exists():
            raise FileNotFoundError(f"data.source: {str(jsonl)!r} not found")
        with open(jsonl) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield {"_bad": f"line {i + 1}: not JSON"}
                    continue
                if isinstance(row, dict):
                    row["_base"] = jsonl.parent
                    yield row
                else:
                    yield {"_bad": f"line {i + 1}: not an object"}
        return
    if path.is_dir() and sorted(path.rglob("*.parquet")):
        import pyarrow.parquet as pq

        for f in sorted(path.rglob("*.parquet")):
            pf = pq.ParquetFile(str(f))
            for batch in pf.iter_batches(batch_size=64):
                yield from batch.to_pylist()
        return
    try:
        import datasets
    except ImportError:
        raise ImportError("data.source: reading arrow/hub datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source, split=split,
                                                                                            streaming=True)
    except Exception as err:
        raise FileNotFoundError(
            f"data.source: cannot load {source!r} ({type(err).__name__}); give a local folder of parquet/arrow "
            "files or a jsonl file, or allow network access to the Hugging Face Hub") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    yield from ds


def load_preference_pairs(source: str, resolution: int, split: str = "train", ties: str = "drop",
                          max_pairs: int | None = None, hflip: bool = False, pair_augment: str = "joint",
                          seed: int = 0, random_crop: bool = False) -> PreferencePairs:
    """Read, filter and decode every preference pair up front (small sets whose latents are cached).

    Args:
        source: jsonl file, folder with a jsonl / parquet / arrow data, or a `datasets` hub id.
        resolution: output size in pixels (shorter-side resize + centre or random crop, see module docstring).
        ties: "drop" (count and skip) or "error" (raise on the first tie).
        hflip / random_crop: augmentation frozen at load time (as latents are cached), seeded per row by
            ``(seed, row)``; ``pair_augment`` "joint" (MaPO / diffusers) or "independent" (SF-DPO).

    Returns:
        :class:`PreferencePairs` with ``skipped`` counts ``{"ties", "unreadable_images", "bad_rows"}``.

    Raises:
        ValueError: a tie with ``ties="error"``, or no usable pair at all.
    """
    src = PreferenceSource(source, split=split, ties=ties)
    prompts, chosen, rejected, sizes, crops = [], [], [], [], []
    skipped = dict(src.skipped)
    for i in range(src.n):
        if max_pairs and len(prompts) >= max_pairs:
            break
        try:
            prompt, pw, pl = src.load_pair(i)
        except Exception:  # any decoder error: skip and count
            skipped["unreadable_images"] += 1
            continue
        rng = np.random.default_rng([seed, 1, i])
        xw, xl, size, crop = prepare_pair(pw, pl, resolution, rng, hflip, pair_augment, random_crop)
        prompts.append(prompt)
        chosen.append(xw)
        rejected.append(xl)
        sizes.append(size)
        crops.append(crop)
    if skipped["unreadable_images"]:
        logger.warning("data.source %s: skipped %d unreadable images", source, skipped["unreadable_images"])
    if not prompts:
        raise ValueError(f"data.source {source!r}: no usable preference pair (skipped: {skipped})")
    return PreferencePairs(prompts, torch.stack(chosen), torch.stack(rejected), torch.tensor(sizes),
                           torch.tensor(crops), skipped)
