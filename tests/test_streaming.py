"""Streamed preference data: Pick-a-Pic parquet read lazily, exact resume, workers = in-process, MaPO crop rule,
caption dropout, fixed time_ids, per-step latent draws, and memory that does not grow with the number of pairs."""

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.data.batches import CachedPairs
from genalign.data.preference import PreferencePairs, PreferenceSource, prepare_pair, resize_crop
from genalign.data.streaming import (StreamedPairs, conditioning, dropout_mask, locate_micro_step,
                                     micro_batch_indices, stream_position)

ROOT = Path(__file__).resolve().parent.parent


def jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def write_pickapic(folder: Path, n: int, size=(40, 30), ties_every: int = 0, row_group: int = 50) -> Path:
    """A Pick-a-Pic-schema parquet folder of real JPEG bytes (two files, small row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    half = n // 2
    for k, (a, b) in enumerate(((0, half), (half, n))):
        rows = range(a, b)
        l0 = [0.5 if ties_every and i % ties_every == 0 else float(i % 2) for i in rows]
        table = pa.table({
            "caption": [f"a handwritten digit {i % 10}" for i in rows],
            "jpg_0": pa.array([jpeg(2 * i, size) for i in rows], pa.binary()),
            "jpg_1": pa.array([jpeg(2 * i + 1, size) for i in rows], pa.binary()),
            "label_0": l0, "label_1": [1 - x if x != 0.5 else 0.5 for x in l0],
        })
        pq.write_table(table, folder / f"train-{k:05d}.parquet", row_group_size=row_group)
    return folder


def test_parquet_source_reads_lazily_winner_first_and_counts_ties(tmp_path):
    d = write_pickapic(tmp_path / "pp", 40, ties_every=10)
    src = PreferenceSource(str(d))
    assert src.n == 36 and src.skipped["ties"] == 4
    # Row 1 of file 0 has label_0 = 1 (jpg_0 wins); row 2 has label_0 = 0 → swapped (jpg_1 first).
    w, l = src._raw_images(0)  # usable row 0 = raw row 1
    assert w == jpeg(2) and l == jpeg(3)
    w, l = src._raw_images(1)  # raw row 2, label_0 = 0
    assert w == jpeg(5) and l == jpeg(4)
    assert src.prompt(1) == "a handwritten digit 2"
    # Only the light columns are held in memory.
    assert not hasattr(src, "_prompts") and len(src._captions) == 36
    # Second file (raw rows 20..39): usable row 18 = raw 21 (row 20 is a tie).
    assert src._raw_images(18)[0] == jpeg(2 * 21)
    with pytest.raises(ValueError, match="tie"):
        PreferenceSource(str(d), ties="error")


def test_parquet_missing_column_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp_path.joinpath("bad").mkdir()
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "label_0": [1.0]}), tmp_path / "bad" / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: missing Pick-a-Pic column\(s\) jpg_1"):
        PreferenceSource(str(tmp_path / "bad"))


def test_locate_micro_step_inverts_the_stream():
    for n, b, world in ((10, 3, 1), (7, 2, 2), (5, 8, 1)):
        for rank in range(world):
            for m in (0, 1, 4, 13):
                idx = micro_batch_indices(n, m, b, rank, world, seed=3)
                found = locate_micro_step(n, idx, b, rank, world, 3)  # rows only: the earliest step drawing them
                assert found <= m and micro_batch_indices(n, found, b, rank, world, 3).tolist() == idx.tolist()
                assert locate_micro_step(n, idx, b, rank, world, 3, hint=m) == m
                assert stream_position(idx, n, b, rank, world, 3) == m  # the tag: exact even when rows repeat
                assert stream_position(idx.clone(), n, b, rank, world, 3) == found  # untagged: falls back
    assert locate_micro_step(7, micro_batch_indices(7, 13, 2, 0, 2, 3), 2, 0, 2, 3) == 9  # a genuine repeat
    # Rows that are no micro-batch of this stream (a permutation never starts 0, 1, 2 here) → None.
    idx = micro_batch_indices(10, 2, 3, 0, 1, 3)
    assert locate_micro_step(10, idx.flip(0), 3, 0, 1, 3, max_micro_steps=50) is None
    assert locate_micro_step(10, torch.tensor([0, 1]), 3, 0, 1, 3) is None  # wrong length


def _stream(src, **kw):
    model = SimpleNamespace(resolution=16)
    return StreamedPairs(model, src, batch_size=3, seed=5, hflip=True, random_crop=True, **kw)


def test_streamed_batches_are_exact_on_resume_and_equal_with_workers(tmp_path):
    src = PreferenceSource(str(write_pickapic(tmp_path / "pp", 30, size=(40, 30))))
    run = _stream(src)
    full = [run.decoded(micro_batch_indices(src.n, m, 3, 0, 1, 5))[1] for m in range(6)]
    resumed = _stream(src)  # a fresh object starting at micro-step 4, as after --resume
    for m in (4, 5):
        mm, d = resumed.decoded(micro_batch_indices(src.n, m, 3, 0, 1, 5))
        assert mm == m
        assert torch.equal(d["chosen"], full[m]["chosen"]) and d["crop_top_lefts"].tolist() == full[m]["crop_top_lefts"].tolist()
    workers = _stream(src, num_workers=1, prefetch=2)
    for m in range(3):
        d = workers.decoded(micro_batch_indices(src.n, m, 3, 0, 1, 5))[1]
        assert torch.equal(d["chosen"], full[m]["chosen"]) and torch.equal(d["rejected"], full[m]["rejected"])
        assert d["prompts"] == full[m]["prompts"] and d["ids"] == full[m]["ids"]
    # Augmentation is per stream position: rows see different crops / flips in different epochs.
    crops = {tuple(c) for f in full for c in f["crop_top_lefts"].tolist()}
    assert len(crops) > 3 and full[0]["chosen"].shape == (3, 3, 16, 16)


def test_unreadable_pair_is_replaced_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pp"
    d.mkdir()
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "jpg_0": [b"garbage", jpeg(1), jpeg(2)],
                             "jpg_1": [jpeg(3), jpeg(4), jpeg(5)], "label_0": [1.0, 1.0, 1.0]}), d / "t.parquet")
    s = StreamedPairs(SimpleNamespace(resolution=8), PreferenceSource(str(d)), batch_size=3, seed=0)
    out = s.decoded(torch.tensor([0, 1, 2]))[1]
    assert out["ids"] == [1, 1, 2] and s.skipped["unreadable_images"] == 1


def test_mapo_crop_rule_centre_random_and_joint():
    img = Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3) % 251)
    # Shorter side 20 → 8: 30×20 → 12×8; centre offset round((12 − 8) / 2) = 2.
    x, size, crop = resize_crop(img, 8)
    assert size == (20, 30) and crop == (0, 2)
    ref = np.asarray(img.resize((12, 8), Image.BILINEAR), dtype=np.float32)[:, 2:10] / 255
    assert torch.allclose(x, torch.from_numpy(ref).permute(2, 0, 1))
    offs = set()
    for s in range(40):
        x, _, (top, left) = resize_crop(img, 8, hflip=True, random_crop=True, rng=np.random.default_rng(s))
        assert top == 0 and 0 <= left <= 4
        flipped = np.asarray(img.resize((12, 8), Image.BILINEAR).transpose(Image.FLIP_LEFT_RIGHT), dtype=np.float32)
        assert torch.allclose(x, torch.from_numpy(flipped[:, left:left + 8] / 255).permute(2, 0, 1))
        offs.add(left)
    assert offs == {0, 1, 2, 3, 4}  # uniform over [0, size − r]
    # joint: the loser gets the winner's flip and crop; independent: not always.
    for s in range(20):
        xw, xl, _, crop = prepare_pair(img, img, 8, np.random.default_rng(s), True, "joint", True)
        assert torch.equal(xw, xl)
    differ = sum(not torch.equal(*prepare_pair(img, img, 8, np.random.default_rng(s), True, "independent", True)[:2])
                 for s in range(20))
    assert differ > 5


class FakeModel:
    """Just enough of a pipeline adapter for the data layer: a linear 'VAE' with posterior std 0.5, SDXL ids."""

    resolution, device = 8, torch.device("cpu")

    def __init__(self):
        self.vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=2.0, shift_factor=None), encode=self._encode)

    def _encode(self, x):
        mean = x[:, :2, ::2, ::2]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.5)))

    def encode_prompt(self, prompts):
        return {"encoder_hidden_states": torch.tensor([[float(len(p))] for p in prompts]).unsqueeze(-1)}

    def pair_extra_cond(self, batch):
        from genalign.pipelines.sdxl import make_time_ids

        return {"time_ids": make_time_ids(batch["original_sizes"], batch["crop_top_lefts"], (8, 8))}


def _pairs(n=4):
    g = torch.Generator().manual_seed(0)
    return PreferencePairs([f"prompt {i}" for i in range(n)], torch.rand(n, 3, 8, 8, generator=g),
                           torch.rand(n, 3, 8, 8, generator=g), torch.full((n, 2), 30), torch.ones(n, 2, dtype=torch.long))


def test_cached_latents_fresh_draw_per_step_exact_on_resume():
    pairs, n, b = _pairs(), 4, 2
    data = CachedPairs(FakeModel(), pairs, encode_seed=7, stream_batch_size=b)
    seen = {}
    for m in range(6):  # 3 epochs of 4 rows
        idx = micro_batch_indices(n, m, b, 0, 1, 7)
        out = data.batch(idx)
        for r, lw in zip(idx.tolist(), out["latents_w"]):
            seen.setdefault(r, []).append(lw)
        mean = pairs.chosen[idx][:, :2, ::2, ::2] * 2 * 2 - 2  # ((x·2 − 1) mean) × scaling 2
        # A draw around the posterior mean with std 0.5 × 2: neither the mean nor a constant.
        assert 0.3 < (out["latents_w"] - mean).std() < 2.0
    for r, lats in seen.items():
        assert len(lats) == 3 and not torch.equal(lats[0], lats[1])  # same image, different steps → new sample
    resumed = CachedPairs(FakeModel(), pairs, encode_seed=7, stream_batch_size=b)
    idx = micro_batch_indices(n, 4, b, 0, 1, 7)
    again = resumed.batch(idx)
    assert torch.equal(again["latents_w"], data.batch(idx)["latents_w"])
    assert torch.equal(again["latents_l"], data.batch(idx)["latents_l"])
    # frozen: the same sample of an image every time it is used (the old behaviour)
    frozen = CachedPairs(FakeModel(), pairs, encode_seed=7, stream_batch_size=b, latent_sample="frozen")
    a = frozen.batch(micro_batch_indices(n, 0, b, 0, 1, 7))
    rows = micro_batch_indices(n, 0, b, 0, 1, 7).tolist()
    for m in range(1, 6):
        idx = micro_batch_indices(n, m, b, 0, 1, 7)
        out = frozen.batch(idx)
        for j, r in enumerate(idx.tolist()):
            if r in rows:
                assert torch.equal(out["latents_w"][j], a["latents_w"][rows.index(r)])


def test_caption_dropout_and_fixed_time_ids():
    pairs, n = _pairs(8), 8
    drop = dropout_mask(0, list(range(4000)), 0.2)
    assert abs(sum(drop) / 4000 - 0.2) < 0.02 and dropout_mask(0, list(range(10)), 0.0) == [False] * 10
    data = CachedPairs(FakeModel(), pairs, encode_seed=1, stream_batch_size=8, proportion_empty_prompts=0.5)
    idx = micro_batch_indices(n, 0, 8, 0, 1, 1)
    out = data.batch(idx)
    emb = out["cond"]["encoder_hidden_states"].flatten().tolist()
    expect = dropout_mask(1, list(range(8)), 0.5)
    assert [e == 0.0 for e in emb] == expect and 0 < sum(expect) < 8  # "" has length 0 in the fake encoder
    ids = conditioning(FakeModel(), ["a", "b"], torch.tensor([[30, 40], [50, 60]]), torch.tensor([[1, 2], [3, 4]]),
                       "fixed")["time_ids"]
    assert ids.tolist() == [[8, 8, 0, 0, 8, 8]] * 2
    per = conditioning(FakeModel(), ["a"], torch.tensor([[30, 40]]), torch.tensor([[1, 2]]))["time_ids"]
    assert per.tolist() == [[30, 40, 1, 2, 8, 8]]


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from genalign.config import load_config
    from genalign.training.trainer import train
    data, out = sys.argv[1], sys.argv[2]
    cfg = load_config(Path(sys.argv[3]), [
        "pipeline.model=tiny:sdxl", "pipeline.vae=null", "pipeline.resolution=48", "train.use_8bit_adam=false",
        "pipeline.gradient_checkpointing=false",
        "train.mixed_precision=no", "train.steps=2", "train.batch_size=1", "train.gradient_accumulation_steps=1",
        "data.source.source=" + data, "data.cache_latents=false", "export.enabled=false", "export.report=false",
        "validation.prompts=digits:heldout", "validation.max_prompts=1", "validation.samples_per_prompt=1",
        "validation.num_inference_steps=1", "rewards=[{name: digit_classifier}]",
    ])
    s = train(cfg, Path(out), progress=False)
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": s["num_rows"],
                      "steps": s["steps"], "loss": [h["loss"] for h in s["history"]]}))
""")


def test_pickapic_parquet_trains_two_steps_and_memory_does_not_grow(tmp_path):
    """2 MaPO steps of the SDXL recipe on a parquet folder of real JPEGs (model swapped by --set); peak RSS with
    2,000 pairs within 60 MB of 100 pairs. Images are 72×60 at resolution 48: decoding all 2,000 pairs up front
    (the old loader) would hold 2 × 2,000 × 3 × 48² float32 = 111 MB. The two runs are separate processes (peak RSS
    is per process), started side by side."""
    script = tmp_path / "run.py"
    script.write_text(_RSS_SCRIPT)
    procs = {}
    for n in (100, 2000):
        d = write_pickapic(tmp_path / f"pp{n}", n, size=(72, 60))
        procs[n] = subprocess.Popen([sys.executable, str(script), str(d), str(tmp_path / f"run{n}"),
                                     str(ROOT / "configs" / "mapo_sdxl.yaml")], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    res = {}
    for n, p in procs.items():
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        res[n] = json.loads(out.strip().splitlines()[-1])
    print("peak RSS (MB):", {n: round(r["rss_mb"], 1) for n, r in res.items()})  # shown with -s / -rA
    assert res[100]["rows"] == 100 and res[2000]["rows"] == 2000 and res[2000]["steps"] == 2
    assert all(np.isfinite(res[2000]["loss"]))
    assert res[2000]["rss_mb"] - res[100]["rss_mb"] < 60, res


@pytest.mark.parametrize("recipe", ["mapo_sdxl.yaml", "dpo_sdxl.yaml"])
def test_sdxl_recipe_trains_two_steps_on_pickapic_parquet(tmp_path, recipe):
    """The recipe as written (streamed, cache_latents false) on a Pick-a-Pic parquet folder of real JPEGs, with
    the model swapped by --set as in tests/test_training.py, one DataLoader worker, random crops."""
    from genalign.config import load_config
    from genalign.training.trainer import train

    d = write_pickapic(tmp_path / "pp", 24, size=(20, 14), ties_every=6)
    cfg = load_config(ROOT / "configs" / recipe, [
        "pipeline.model=tiny:sdxl", "pipeline.vae=null", "pipeline.resolution=8", "train.use_8bit_adam=false",
        "train.optimizer=adamw", "train.mixed_precision=no", "train.steps=2", "train.batch_size=2",
        "train.gradient_accumulation_steps=1", f"data.source.source={d}", "data.source.random_crop=true",
        "data.num_workers=1", "export.enabled=false", "export.report=false", "validation.prompts=digits:heldout",
        "validation.max_prompts=1", "validation.samples_per_prompt=1", "validation.num_inference_steps=2",
        "rewards=[{name: digit_classifier}]",
    ])
    assert cfg.data.cache_latents is False
    s = train(cfg, tmp_path / "run", progress=False)
    assert s["steps"] == 2 and s["num_rows"] == 20 and s["data_skipped"]["ties"] == 4
    assert all(np.isfinite(h["loss"]) for h in s["history"] if "loss" in h)
