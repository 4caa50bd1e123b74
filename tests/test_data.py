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


def _png16_rgb(rgb16, size=(8, 6)) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one): colour type 2, bit depth 16."""
    import struct
    import zlib

    w, h = size
    raw = b"".join(b"\x00" + struct.pack(">" + "H" * 3 * w, *(list(rgb16) * w)) for _ in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _odd_images(folder):
    """name → (file name, expected RGB of the decoded image in 0..255, expected (w, h) after EXIF)."""
    import numpy as np

    Image.fromarray(np.full((6, 8), 32768, dtype=np.uint16)).save(folder / "grey16.png")  # mode I;16
    (folder / "rgb16.png").write_bytes(_png16_rgb((65535, 32768, 0)))
    Image.new("RGB", (8, 6), (0, 128, 255)).convert("P", palette=Image.ADAPTIVE).save(folder / "pal.png")
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    rot = Image.new("RGB", (8, 6), (255, 255, 255))
    rot.paste((0, 0, 0), (0, 0, 4, 6))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90° clockwise to display
    rot.save(folder / "exif.jpg", exif=exif, quality=95)
    return {"grey16": ("grey16.png", (128, 128, 128), (8, 6)), "rgb16": ("rgb16.png", (255, 128, 0), (8, 6)),
            "pal": ("pal.png", (0, 128, 255), (8, 6)), "cmyk": ("cmyk.jpg", (255, 0, 0), (8, 6)),
            "exif": ("exif.jpg", None, (6, 8))}


def test_decode_image_by_bit_depth_palette_cmyk_exif(tmp_path):
    import numpy as np

    from genalign.data.preference import decode_image

    for name, (f, rgb, size) in _odd_images(tmp_path).items():
        img = decode_image(tmp_path / f)
        assert img.mode == "RGB" and img.size == size, name
        a = np.asarray(img, dtype=np.int32)
        if rgb is not None:
            assert np.abs(a - np.array(rgb)).max() <= 3, (name, a[0, 0])  # 16-bit mid-grey is grey, not white
    # EXIF 6: the black left half of the stored image is the top after rotating clockwise.
    a = np.asarray(decode_image((tmp_path / "exif.jpg").read_bytes()), dtype=np.int32)
    assert a[:3].mean() < 40 and a[-3:].mean() > 215
    assert decode_image({"bytes": (tmp_path / "grey16.png").read_bytes()}).getpixel((0, 0)) == (128, 128, 128)


def test_preference_and_image_folder_loaders_decode_16bit_and_exif(tmp_path):
    from genalign.data.images import load_image_data

    odd = _odd_images(tmp_path)
    rows = [{"prompt": n, "chosen": f, "rejected": "pal.png"} for n, (f, _, _) in odd.items()]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_preference_pairs(str(tmp_path / "pairs.jsonl"), resolution=6)
    assert pairs.prompts == list(odd) and pairs.skipped["unreadable_images"] == 0
    grey = pairs.chosen[0]
    assert abs(grey.mean().item() - 128 / 255) < 0.01  # was 1.0 (white) before bit-depth conversion
    assert torch.allclose(pairs.chosen[1][:, 2, 2], torch.tensor([1.0, 128 / 255, 0.0]), atol=0.02)
    assert pairs.original_sizes[4].tolist() == [8, 6]  # EXIF-rotated: (h, w) of the upright image
    meta = [{"file_name": f, "prompt": n} for n, (f, _, _) in odd.items()]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    data = load_image_data(str(tmp_path), resolution=6)
    assert abs(data.images[0].mean().item() - 128 / 255) < 0.01
    assert torch.allclose(data.images[3][:, 2, 2], torch.tensor([1.0, 0.0, 0.0]), atol=0.05)
