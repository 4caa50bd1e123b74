"""Config loading: overrides, one-line errors naming file/key/value, resolved config saved."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genalign.cli import main
from genalign.config import ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, data):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_are_the_quickstart_and_recipes_load():
    cfg = load_config()
    assert cfg.pipeline.model == "builtin:digits" and cfg.objective.name == "mapo"
    for f in ["quickstart.yaml", "mapo_sdxl.yaml", "dpo_sdxl.yaml"]:
        load_config(ROOT / "configs" / f)


def test_objective_params_are_typed_and_defaulted():
    cfg = load_config(None, ["objective.name=diffusion_dpo"])
    assert cfg.objective.model_dump()["beta"] == 5000.0
    assert cfg.objective_params().half_factor is True


def test_overrides_nested_and_yaml_typed():
    cfg = load_config(None, ["train.steps=7", "pipeline.lora.rank=4", "train.trackers=[tensorboard]", "pipeline.lora=null"])
    assert cfg.train.steps == 7 and cfg.pipeline.lora is None and cfg.train.trackers == ["tensorboard"]
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("data,key,value", [
    ({"train": {"stepz": 3}}, "train.stepz", "3"),
    ({"train": {"steps": "many"}}, "train.steps", "'many'"),
    ({"train": {"learning_rate": -1}}, "train.learning_rate", "-1"),
    ({"objective": {"name": "mapo", "betta": 1}}, "objective.betta", "1"),
    ({"objective": {"name": "nope"}}, "objective.name", "'nope'"),
    ({"rewards": [{"name": "no_such_reward"}]}, "rewards.0.name", "'no_such_reward'"),
    ({"data": {"source": {"kind": "preference"}}}, "data.source.source", ""),
])
def test_bad_config_gives_one_line_naming_file_key_value(tmp_path, data, key, value):
    p = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and key in msg and value in msg


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"--set train.steps=-3.*train.steps"):
        load_config(None, ["train.steps=-3"])


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    p = write(tmp_path, {"train": {"bogus": 1}})
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.bogus" in err


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["train.steps=11", "objective.beta=0.2"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


SECTIONS = ["seed", "pipeline", "data", "objective", "rewards", "train", "validation", "export", "junk"]
values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                                st.text(max_size=5)),
                      lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)),
                      max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(SECTIONS), values, max_size=3))
def test_fuzz_invalid_configs_give_one_line_errors(tmp_path, data):
    p = tmp_path / "f.yaml"
    p.write_text(yaml.safe_dump(data))
    try:
        load_config(p)
    except ConfigError as e:
        assert "\n" not in str(e) and str(p) in str(e)


# ------------------------------------------------------------------------------------------ language models
def test_lm_configs_load_through_the_same_load_config():
    from genalign.config import LMRunConfig
    from genalign.objectives.rrpo import RRPO
    from genalign.objectives.treg import TREG

    cfg = load_config(ROOT / "configs" / "treg_tiny.yaml")
    assert isinstance(cfg, LMRunConfig) and cfg.pipeline.name == "language"
    assert isinstance(cfg.objective_params(), TREG.Config) and cfg.objective_params().alpha == 0.25
    video = load_config(ROOT / "configs" / "rrpo_llava_video.yaml")
    assert video.pipeline.name == "video_language" and isinstance(video.objective_params(), RRPO.Config)
    assert video.pipeline.lora.dropout == 0.05  # issue 14 item 4: the official train_llavavideo.py default


@pytest.mark.parametrize("override,key", [
    ("train.bogus=1", "train.bogus"),
    ("data.bogus=1", "data.bogus"),
    ("pipeline.lora.rnk=4", "pipeline.lora.rnk"),
    ("objective.betta=1", "objective.betta"),
    ("objective.name=mapo", "objective.name"),
    ("pipeline.lora=null", "pipeline.reference"),
])
def test_lm_unknown_keys_and_mismatches_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "treg_tiny.yaml", [override])
    assert "\n" not in str(e.value) and key in str(e.value)


def test_lm_objective_on_a_diffusion_pipeline_names_diffusion_dpo():
    with pytest.raises(ConfigError, match="language-model objective.*diffusion_dpo"):
        load_config(None, ["objective.name=dpo"])
    with pytest.raises(ConfigError, match="video-LM training is implemented for rrpo only"):
        load_config(ROOT / "configs" / "treg_tiny.yaml", ["pipeline.name=video_language"])


def test_a_key_with_a_newline_still_gives_one_line(tmp_path):
    p = write(tmp_path, {"pipeline": {"\n": None}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "\n" not in str(e.value) and "pipeline.'\\n'" in str(e.value)
