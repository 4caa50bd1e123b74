"""Shipped architecture specs for AudioLDM2-music and the reward models (``genalign/assets/model_configs``).

Each new spec builds on the meta device and its parameter count lands on the published size of the model (the
``published_approx`` entries: a stated count, or one derived from the fp32 checkpoint size, each with its source);
``genalign plan`` then counts the reward of a config and plans an AudioLDM2 run offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genalign.plan import MODEL_CONFIGS, build_meta, count_params, plan
from genalign.plan.models import _library, shipped_config

ROOT = Path(__file__).resolve().parent.parent
NEW_SPECS = ["audioldm2_music.json", "reward_clap_larger_music.json", "reward_dpt_hybrid_midas.json",
             "reward_imagereward_v1.json", "reward_mask2former_swin_large_ade.json",
             "reward_segformer_b0_ade.json", "reward_upernet_convnext_small.json"]
# registered rewards without weights of their own (or demo / encoder-dependent ones): nothing to ship
WEIGHT_FREE = {"contrast", "ink_mass", "jpeg-compressibility", "jpeg-incompressibility", "canny", "soft_edges",
               "vendi", "fad-dataset", "fad-song", "digit_classifier", "digit_stroke_mask", "music_clap",
               "music_key", "music_style"}
AUDIOLDM2 = ["pipeline.name=audioldm2", "pipeline.model=cvssp/audioldm2-music"]


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, int]]:
    """{spec file: {component: parameters on meta}} of every new spec (built once for the module)."""
    out = {}
    for name in NEW_SPECS:
        spec = json.loads((MODEL_CONFIGS / name).read_text())
        out[name] = {c: count_params(build_meta(comp))[0] for c, comp in spec["components"].items()}
    return out


@pytest.mark.parametrize("name", NEW_SPECS)
def test_new_spec_builds_on_meta_and_matches_the_published_size(counts, name):
    spec = json.loads((MODEL_CONFIGS / name).read_text())
    assert spec["model"] and spec["source"] and spec["published_approx"], name
    built = counts[name]
    assert all(n > 0 for n in built.values()), built
    for comp, n in spec["reported_params"].items():
        assert built[comp] == n, (name, comp)
    for comp, pub in spec["published_approx"].items():
        assert pub["cite"]
        n = sum(built.values()) if comp == "total" else built[comp]
        assert n == pytest.approx(pub["params"], rel=pub["rel_tol"]), (name, comp, n, pub["params"])


def test_audioldm2_music_components_and_sizes(counts):
    """The diffusers AudioLDM2 layout minus tokenizers / feature extractor / scheduler; UNet ≈ 350 M and the
    pipeline ≈ 1.1 B (diffusers docs table), Flan-T5-large encoder and GPT-2 base counted once each."""
    built = counts["audioldm2_music.json"]
    assert set(built) == {"unet", "vae", "text_encoder", "text_encoder_2", "language_model", "projection_model",
                          "vocoder"}
    assert built["language_model"] == 124_439_808  # GPT2Model (no LM head) of the 124M GPT-2
    assert built["projection_model"] == 512 * 768 + 768 + 1024 * 768 + 768 + 4 * 768
    assert 335e6 < built["text_encoder_2"] < 345e6  # T5 shared embedding tied to encoder.embed_tokens, once


def test_tied_embeddings_are_counted_once():
    """Tying happens outside ``init_empty_weights`` (inside it accelerate re-wraps the tied parameter)."""
    t5 = build_meta(shipped_config("cvssp/audioldm2-music")["components"]["text_encoder_2"])
    assert t5.shared.weight is t5.encoder.embed_tokens.weight and t5.shared.weight.is_meta


def test_every_reward_with_weights_has_a_shipped_spec():
    from genalign.registry import rewards

    missing = [r for r in rewards.names() if r not in WEIGHT_FREE and shipped_config(f"reward:{r}") is None]
    assert not missing, missing
    assert shipped_config("reward:pickscore")["model"] == "yuvalkirstain/PickScore_v1"
    assert shipped_config("reward:imagereward")["file"] == "reward_imagereward_v1.json"


def test_imagereward_composite_has_the_reward_module_names_and_shapes():
    """``composite`` + ``genalign`` components: the same parameter names and shapes as genalign's ImageReward, so
    a converted upstream checkpoint would load into the planned module."""
    from accelerate import init_empty_weights
    from transformers import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from genalign.rewards.aesthetic import MLPHead
    from genalign.rewards.imagereward import imagereward_configs

    planned = build_meta(shipped_config("reward:imagereward-v1.0")["components"]["model"])
    vcfg, tcfg = imagereward_configs()
    with init_empty_weights():
        ref = {"vision_model": BlipVisionModel(vcfg), "text_encoder": BlipTextModel(tcfg, add_pooling_layer=False),
               "mlp": MLPHead(tcfg.hidden_size)}
    shapes = {f"{k}.{n}": tuple(p.shape) for k, m in ref.items() for n, p in m.named_parameters()}
    assert {n: tuple(p.shape) for n, p in planned.named_parameters()} == shapes
    with pytest.raises(ValueError, match="not a genalign class"):
        build_meta({"library": "genalign", "class": "os.path.join", "config": {}})


def test_model_index_libraries():
    """Pipeline-local diffusers modules (``audioldm2``, ``stable_audio``) are diffusers classes."""
    assert _library(["audioldm2", "AudioLDM2UNet2DConditionModel"]) == "diffusers"
    assert _library(["stable_audio", "StableAudioProjectionModel"]) == "diffusers"
    assert _library(["transformers", "GPT2Model"]) == "transformers"


def test_plan_counts_the_reward_of_a_config(counts):
    p = plan(str(ROOT / "configs" / "dragon_stable_audio.yaml"), check_data=False, trace=False, device="cpu")
    rewards = {c.name: c for c in p.components if c.role == "reward"}
    assert rewards["reward:clap"].total == counts["reward_clap_larger_music.json"]["model"]
    assert not any("size not modelled" in n for n in p.notes), p.notes


def test_audioldm2_music_plans_offline(counts):
    """``pipeline.name=audioldm2`` on the hub id plans from the shipped spec (no hub access): every component
    counted, LoRA on the UNet, the UNet traced at the adapter's 10.24 s window, the reward still listed."""
    p = plan(str(ROOT / "configs" / "dragon_stable_audio.yaml"), AUDIOLDM2, check_data=False, device="cpu")
    comps = {c.name: c for c in p.components}
    built = counts["audioldm2_music.json"]
    assert comps["unet"].role == "trainable" and 0 < comps["unet"].trainable < comps["unet"].total
    assert comps["unet"].total - comps["unet"].trainable == built["unet"]
    for name in set(built) - {"unet"}:
        assert comps[name].role == "frozen" and comps[name].total == built[name], name
    assert "reward:clap" in comps and not p.problems and p.fits
    assert "model config: audioldm2_music.json" in p.notes
    assert p.memory["activations (traced)"] > 0 and p.flops_per_step > 0 and "1024 mel frames" in p.shape


def test_objective_rewards_are_counted_once_with_the_evaluation_rewards():
    """Ctrl-U's condition reward (objective.reward) and DRAGON's training rewards (objective.rewards) are loaded by
    the run, so the plan lists them; a reward named in both places is one component."""
    from genalign.plan import plan

    p = plan(str(ROOT / "configs" / "ctrl_u_depth.yaml"), check_data=False, trace=False)
    names = [c.name for c in p.components]
    assert "reward:dpt_depth" in names and names.count("reward:clipscore") == 1
    q = plan(str(ROOT / "configs" / "dragon_stable_audio.yaml"), check_data=False, trace=False)
    assert [c.name for c in q.components].count("reward:clap") == 1
