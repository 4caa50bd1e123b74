"""Preference data: ties dropped and counted, winner first, corrupt images skipped, Pick-a-Pic parquet schema."""

import io
import json

import pytest
import torch
from PIL import Image

from genalign.data.digits import digit_of_prompt, digits_prompts, load_digits_split
from genalign.data.onpolicy import best_worst_pairs
from genalign.data.preference import load_preference_pairs
from genalign.data.prompts import load_prompts


def png(color, size=(16, 12)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_jsonl_pairs_skip_ties_and_corrupt_images(tmp_path, caplog):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "w.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "l.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [{"prompt": "ok", "chosen": "w.png", "rejected": "l.png"},
            {"prompt": "tie", "chosen": "w.png", "rejected": "l.png", "label": 0.5},
            {"prompt": "corrupt", "chosen": "bad.png", "rejected": "l.png"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{truncated\n")
    pairs = load_preference_pairs(str(tmp_path / "pairs.jsonl"), resolution=8)
    assert pairs.prompts == ["ok"]
    assert pairs.skipped == {"ties": 1, "unreadable_images": 1, "bad_rows": 1}
    assert pairs.chosen.shape == (1, 3, 8, 8) and pairs.chosen[0, 0].mean() == 1.0  # red winner
    with pytest.raises(ValueError, match="tie"):
        load_preference_pairs(str(tmp_path / "pairs.jsonl"), resolution=8, ties="error")


def test_pickapic_parquet_winner_first_and_ties(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "caption": ["a", "b", "c"],
        "jpg_0": [png((255, 0, 0)), png((255, 0, 0)), png((255, 0, 0))],
        "jpg_1": [png((0, 0, 255)), png((0, 0, 255)), png((0, 0, 255))],
        "label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5],
    })
    ds.to_parquet(str(tmp_path / "train.parquet"))
    pairs = load_preference_pairs(str(tmp_path), resolution=8)
    assert pairs.prompts == ["a", "b"] and pairs.skipped["ties"] == 1
    assert pairs.chosen[0, 0].mean() == 1.0 and pairs.chosen[1, 2].mean() == 1.0  # label_0 = 0 -> swapped
    assert pairs.original_sizes[0].tolist() == [12, 16]


def test_best_worst_pairs_and_gap():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.4, 0.4, 0.4], [0.2, 0.3, 0.25]])
    keep, best, worst = best_worst_pairs(scores, min_gap=0.05)
    assert keep.tolist() == [True, False, True] and best.tolist()[0] == 1 and worst.tolist()[0] == 0


def test_prompt_sets_disjoint_and_parti():
    train, held = digits_prompts("train"), digits_prompts("heldout")
    assert not set(train) & set(held) and len(train) == len(held) == 20
    assert [digit_of_prompt(p) for p in held[:4]] == [0, 0, 1, 1]
    parti = load_prompts("parti")
    assert len(parti) == 1632
    assert len(load_prompts("parti:Animals")) > 10
    with pytest.raises(ValueError, match="category"):
        load_prompts("parti:Nope")


def test_real_digits_split():
    x, y = load_digits_split("train")
    xt, yt = load_digits_split("test")
    assert x.shape[1:] == (3, 8, 8) and len(x) + len(xt) == 1797 and 0 <= x.min() and x.max() <= 1
