"""The shipped ADE20K palette (issue 14 item 12): RGB segmentation conditions map to the right class ids by default."""

from pathlib import Path

import pytest
import torch

from genalign.config import load_config
from genalign.rewards.condition import build_condition_reward
from genalign.rewards.segmentation import SegformerSeg, UperNetSeg, ade20k_classes, ade20k_palette, resolve_palette

ROOT = Path(__file__).resolve().parent.parent


def _palette_image(classes, extra_black=True, jitter=0):
    """A (1, 3, 1, N) condition whose pixels are the ADE20K colours of ``classes`` (+ one black pixel)."""
    pal = ade20k_palette()
    rows = [pal[c + 1] for c in classes] + ([torch.zeros(3)] if extra_black else [])
    px = torch.stack(rows)
    if jitter:
        px = (px + torch.randint(-jitter, jitter + 1, px.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    return (px / 255.0).t().reshape(1, 3, 1, -1)


def test_shipped_table_is_the_mmseg_ade20k_palette():
    pal = ade20k_palette()
    assert pal.shape == (151, 3) and pal.dtype == torch.float32
    assert pal[0].tolist() == [0, 0, 0]  # prepended "unlabelled" row
    assert pal[1].tolist() == [120, 120, 120] and pal[2].tolist() == [180, 120, 120]  # wall, building
    assert pal[150].tolist() == [92, 0, 255]  # flag
    assert pal[7].tolist() == pal[49].tolist() == [140, 140, 140]  # road / skyscraper share a colour (card §4)
    assert len({tuple(r) for r in pal.tolist()}) == 150  # only that one duplicate
    names = ade20k_classes()
    assert len(names) == 150 and names[0] == "wall" and names[6] == "road" and names[149] == "flag"


def test_palette_image_maps_to_class_ids():
    seg = UperNetSeg(tiny=True, palette="ade20k")
    cond = _palette_image([0, 6, 48, 149, 12, 93])
    labels = seg.target_from_condition(cond)
    # class 48 (skyscraper) has road's colour: the first row wins, as in the official argmin; black → 255 (ignored)
    assert labels.tolist() == [[[0, 6, 6, 149, 12, 93, 255]]]
    # small colour noise (resampling, JPEG) still lands on the nearest colour
    assert seg.target_from_condition(_palette_image([0, 6, 149, 12, 93], jitter=3)).tolist() == [[[0, 6, 149, 12, 93, 255]]]


def test_ade20k_recipe_uses_the_palette_by_default():
    params = load_config(ROOT / "configs" / "ctrl_u_ade20k_seg.yaml").objective_params()
    assert params.reward.name == "upernet" and params.reward.kwargs["palette"] == "ade20k"
    kw = {**params.reward.kwargs, "tiny": True, "size": 32}
    reward = build_condition_reward(params.reward.name, kw)
    assert torch.equal(reward.palette, ade20k_palette())
    # the red channel alone would give label 120 for "wall": the palette gives 0
    assert reward.target_from_condition(_palette_image([0], extra_black=False)).tolist() == [[[0]]]


def test_palette_auto_and_errors(tmp_path):
    assert torch.equal(resolve_palette("auto", 150), ade20k_palette())
    assert resolve_palette("auto", 5) is None and resolve_palette(None, 150) is None
    assert SegformerSeg(tiny=True).palette is None  # tiny 5-class model: labels from channel 0
    f = tmp_path / "pal.json"
    f.write_text('{"palette": [[0, 0, 0], [255, 0, 0]]}')
    assert resolve_palette(str(f)).tolist() == [[0, 0, 0], [255, 0, 0]]
    with pytest.raises(FileNotFoundError, match="palette"):
        resolve_palette(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="RGB rows"):
        resolve_palette([[1, 2]])
