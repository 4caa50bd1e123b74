"""The export's model card (huggingface_hub ModelCard: front matter, license, hyperparameters, rewards, a loading
snippet that runs in vanilla Diffusers) and export.push_to_hub (set-up check, upload through HfApi)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
from huggingface_hub import ModelCard

from genalign.config import load_config
from genalign.model_card import HubPushError, base_license, check_push_to_hub, model_card, push_to_hub

SUMMARY = {"reward_before": {"digit_classifier": 0.77}, "reward_after": {"digit_classifier": 0.92},
           "heldout_prompts": "digits:heldout", "samples_per_prompt": 16}


def _snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert blocks, "no python block in the card"
    return blocks[0]


def test_front_matter_is_hub_metadata():
    cfg = load_config(None, ["pipeline.model=stabilityai/stable-diffusion-xl-base-1.0", "pipeline.name=sdxl"])
    data = ModelCard(model_card(cfg, SUMMARY)).data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert data["license"] == "openrail++"  # inherited from the base (its hub card's license)
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"genalign", "mapo", "lora"} <= set(data["tags"])
    full = load_config(None, ["pipeline.lora=null", "pipeline.reference=none"])
    assert "lora" not in ModelCard(model_card(full)).data.tags


def test_license_inherited_from_a_local_base_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    assert base_license(str(base)) == "mit"
    assert base_license("builtin:digits") == "apache-2.0"
    assert base_license("someone/unknown-model") is None
    cfg = load_config(None, [f"pipeline.model={base}"])
    card = model_card(cfg)
    data = ModelCard(card).data.to_dict()
    assert data["license"] == "mit" and "base_model" not in data  # a local folder is no hub id
    unknown = model_card(load_config(None, ["pipeline.model=someone/unknown-model"]))
    assert "license" not in ModelCard(unknown).data.to_dict() and "License: that of the base model" in unknown


def test_hyperparameters_table_and_rewards():
    cfg = load_config(None, ["train.steps=7", "train.learning_rate=0.003", "pipeline.lora.rank=4"])
    card = model_card(cfg, SUMMARY)
    for row in ("| objective | mapo |", "| objective.beta | 0.1 |", "| steps | 7 |", "| learning rate | 0.003 |",
                "| LoRA rank / alpha | 4 / 4 |", "| LoRA target modules | to_q, to_k, to_v, to_out.0 |",
                "| digit_classifier | 0.7700 | 0.9200 | +0.1500 |"):
        assert row in card, row
    assert "Not measured" in model_card(cfg)


def test_snippet_uses_vanilla_diffusers_only():
    card = model_card(load_config(None), SUMMARY)
    code = [line for line in _snippet(card).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert code[0] == "from diffusers import DiffusionPipeline"
    assert not any("genalign" in line for line in code)
    pushed = model_card(load_config(None, ["export.push_to_hub=true", "export.hub_model_id=me/digits-mapo"]))
    assert "DiffusionPipeline.from_pretrained('me/digits-mapo')" in pushed


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny SD run exported through export_pipeline (the path training takes)."""
    from genalign.export import export_pipeline
    from genalign.registry import pipelines

    cfg = load_config(None, ["pipeline.model=tiny:sd", "validation.num_inference_steps=2",
                             "validation.guidance_scale=1.0"])
    model = pipelines.get(cfg.pipeline.name).from_config(cfg.pipeline)
    return export_pipeline(model, cfg, tmp_path_factory.mktemp("card") / "export", summary=SUMMARY)


def test_snippet_runs_against_the_export_without_genalign(exported):
    card = (exported / "README.md").read_text()
    assert ModelCard(card).data.library_name == "diffusers"
    runner = textwrap.dedent("""
        import sys
        sys.modules["genalign"] = None  # any `import genalign` in the snippet fails
        code = sys.stdin.read()
        exec(compile(code, "snippet", "exec"), {})
        from PIL import Image
        print(Image.open("sample.png").size)
    """)
    res = subprocess.run([sys.executable, "-c", runner], input=_snippet(card), cwd=exported, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "(8, 8)"  # the tiny pipeline's native resolution


# -- push to hub --------------------------------------------------------------------------------------------------
def _push_cfg(*extra):
    return load_config(None, ["export.push_to_hub=true", "export.hub_model_id=me/digits-mapo", *extra])


def test_check_push_to_hub_fails_in_one_line_before_training(monkeypatch):
    check_push_to_hub(load_config(None))  # off: nothing checked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubPushError) as e:
        check_push_to_hub(_push_cfg())
    assert "\n" not in str(e.value) and "HF_HUB_OFFLINE is set" in str(e.value) and "export.push_to_hub" in str(e.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    with pytest.raises(HubPushError, match="no network: cannot reach no-such-host.invalid"):
        check_push_to_hub(_push_cfg())
    with pytest.raises(HubPushError, match="export.hub_model_id: needed"):
        check_push_to_hub(load_config(None, ["export.push_to_hub=true"]))
    with pytest.raises(HubPushError, match="export.enabled"):
        check_push_to_hub(_push_cfg("export.enabled=false"))


def test_check_push_to_hub_needs_a_token(monkeypatch):
    import genalign.model_card as mc
    import huggingface_hub

    monkeypatch.setattr(mc, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        check_push_to_hub(_push_cfg())


def test_push_to_hub_uploads_the_export(monkeypatch, exported):
    import genalign.model_card as mc
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, folder_path, commit_message))

    monkeypatch.setattr(mc, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(load_config(None), exported) is None and calls == []  # off
    url = push_to_hub(_push_cfg("export.hub_private=true"), exported)
    assert url == "https://huggingface.co/me/digits-mapo"
    assert calls == [("create_repo", "me/digits-mapo", True, True),
                     ("upload_folder", "me/digits-mapo", str(exported), "genalign: mapo on builtin:digits")]
