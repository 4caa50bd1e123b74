"""Property-based bad input (issue "Nothing lost", items 13–14): random malformed preference rows, configs and
``--set`` strings give a ConfigError (one line) or a counted skip or success — never another exception, never a hang."""

import json
import signal
from contextlib import contextmanager

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genalign.config import ConfigError, load_config
from genalign.data.preference import load_preference_pairs


@contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""
    def boom(signum, frame):
        raise TimeoutError(f"input took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**20), st.floats(allow_nan=True), st.text(max_size=6))
anything = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
                        max_leaves=5)
row_values = st.one_of(st.just("a.png"), st.just("b.png"), st.just("missing.png"), scalars)
rows = st.one_of(
    st.fixed_dictionaries({"prompt": st.one_of(st.just("a digit"), scalars), "chosen": row_values,
                           "rejected": row_values},
                          optional={"label": st.one_of(st.sampled_from([0.0, 0.5, 1.0, "yes", "left"]), scalars)}),
    anything)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / name)
    return d


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(rows, min_size=1, max_size=6))
def test_malformed_preference_rows_are_skipped_and_counted_or_one_line(image_dir, data):
    f = image_dir / "pairs.jsonl"
    f.write_text("".join((json.dumps(r) if not isinstance(r, str) or r else "") + "\n" for r in data))
    with time_limit(60):
        try:
            pairs = load_preference_pairs(str(f), resolution=8)
        except ConfigError as err:
            assert "\n" not in str(err)
            return
        except ValueError as err:  # "no usable pair" style errors must still be one line naming the source
            assert "\n" not in str(err) and "pairs.jsonl" in str(err)
            return
    assert len(pairs.prompts) + sum(pairs.skipped.values()) >= 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_random_set_overrides_give_a_config_or_a_one_line_error(overrides):
    with time_limit(30):
        try:
            load_config(None, overrides)
        except ConfigError as err:
            assert "\n" not in str(err)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["seed", "train", "data", "pipeline", "rewards", "objective"]), anything,
                       max_size=3))
def test_random_yaml_configs_give_a_config_or_a_one_line_error(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    with time_limit(30):
        try:
            load_config(p)
        except ConfigError as err:
            assert "\n" not in str(err) and "c.yaml" in str(err)


def test_nested_alias_expansion_is_refused_at_once(tmp_path):
    # A 600-byte "billion laughs" YAML expanded to gigabytes in save_config before.
    lol = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    p = tmp_path / "lol.yaml"
    p.write_text(lol + "train: {steps: *i}\n")
    with time_limit(10):
        with pytest.raises(ConfigError, match="alias"):
            load_config(p)


@pytest.mark.parametrize("content", [b"\x00\x01\x02binary", None])
def test_binary_file_or_directory_as_config_is_one_line(tmp_path, content):
    p = tmp_path / "cfg.yaml"
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "\n" not in str(err.value) and "cfg.yaml" in str(err.value)


@pytest.mark.parametrize("override", ["seed=-1", "seed=1e20", "train.steps=true", "objective.name=dpo",
                                      "train.steps=!!python/object:os.system x", "train.steps=[unclosed",
                                      "rewards.0.name=x"])
def test_bad_overrides_are_one_line(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value) and "--set" in str(err.value)


def test_a_key_written_twice_is_refused_naming_it(tmp_path):
    # PyYAML keeps the last of two equal keys silently; a config that says `steps` twice is almost always a mistake.
    p = tmp_path / "twice.yaml"
    p.write_text("train:\n  steps: 5\n  batch_size: 2\n  steps: 7\n")
    with pytest.raises(ConfigError, match=r"train\.steps: the key appears twice.*line 4"):
        load_config(p)
