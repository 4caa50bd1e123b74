"""genalign.evaluation.scoring: folder/jsonl reading, skipped images, per-sample/mean values, jsonl/csv output."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.rewards.style import InkMass
from genalign.evaluation.scoring import collect_samples, score_samples, write_scores


def _write_images(folder, n=3, size=(32, 24)):
    paths = []
    for i in range(n):
        arr = np.full((size[1], size[0], 3), 40 * (i + 1), dtype=np.uint8)
        arr[::2, :, 0] = 255
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_score_folder_with_metadata_and_skips(tmp_path):
    paths = _write_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for i, p in enumerate(paths):
            f.write(json.dumps({"file_name": p.name, "prompt": f"prompt {i}"}) + "\n")
        f.write(json.dumps({"file_name": "broken.png", "prompt": "x"}) + "\n")
        f.write(json.dumps({"file_name": "missing.png", "prompt": "y"}) + "\n")
    res = score_samples(tmp_path, ["ink_mass", {"name": "contrast"}, {"name": "vendi"}], batch_size=2)
    assert res["skipped"] == 2
    assert [r["prompt"] for r in res["per_sample"]] == ["prompt 0", "prompt 1", "prompt 2"]
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                     for p in paths])
    ink = InkMass()(x)
    for rec, v in zip(res["per_sample"], ink.tolist()):
        assert rec["ink_mass"] == pytest.approx(v, abs=1e-6)
        assert "vendi" not in rec  # set reward: whole-set value only
    assert res["mean"]["ink_mass"] == pytest.approx(ink.mean().item(), abs=1e-6)
    assert 1.0 <= res["mean"]["vendi"] <= 3.0 and res["set"]["vendi"] == res["mean"]["vendi"]

    out = write_scores(res, tmp_path / "out" / "scores.jsonl")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == res["per_sample"]
    out_csv = write_scores(res, tmp_path / "scores.csv")
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["file"].endswith("img0.png") and float(rows[1]["contrast"]) == pytest.approx(
        res["per_sample"][1]["contrast"], abs=1e-6)
    with pytest.raises(ValueError):
        write_scores(res, tmp_path / "scores.parquet")


def test_sidecar_txt_and_jsonl_input(tmp_path, tiny_pickscore):
    paths = _write_images(tmp_path, n=2)
    paths[0].with_suffix(".txt").write_text("a red cat\n")
    rows = collect_samples(tmp_path)
    assert rows == [(paths[0], "a red cat"), (paths[1], None)]
    jl = tmp_path / "list.jsonl"
    jl.write_text("".join(json.dumps({"file_name": p.name, "prompt": "a dog"}) + "\n" for p in paths))
    res = score_samples(jl, [{"name": "pickscore-v1", "kwargs": {"tiny": True}}])
    assert res["skipped"] == 0 and len(res["per_sample"]) == 2
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                     for p in paths])
    torch.testing.assert_close(torch.tensor([r["pickscore-v1"] for r in res["per_sample"]]),
                               tiny_pickscore.score(x, ["a dog", "a dog"]), atol=1e-4, rtol=1e-5)


def test_sixteen_bit_png_scores_by_bit_depth_not_as_white(tmp_path):
    # Issue "Nothing lost" item 8: a 16-bit mid-grey PNG (32768) was read as pure white (ink 1.0) by genalign score.
    import numpy as np
    from PIL import Image

    from genalign.evaluation.scoring import load_image

    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    x = load_image(tmp_path / "grey16.png")
    assert x.shape == (3, 4, 4) and abs(float(x.mean()) - 0.5) < 0.01
