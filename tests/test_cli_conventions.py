"""Conventions users expect from the command line (issue 17): a fast `genalign list` (static registry table checked
against the real registrations), `--set` on list elements with errors naming `--set`, the offline fast-fail."""

from __future__ import annotations

import sys
import textwrap

import pytest

from genalign.registry import Entry, Registry, module_exists, objectives


def _fresh(reg: Registry) -> Registry:
    return Registry(reg.kind, reg.group, reg._builtin_modules, reg._table)


def test_static_table_matches_the_real_registrations():
    """`genalign list` reads BUILTIN_TABLE; the built-in modules' decorators must register exactly it (same names,
    classes and descriptions). Run in a fresh interpreter so every decorator really runs."""
    import json
    import subprocess

    from genalign.registry import BUILTIN_TABLE

    code = textwrap.dedent("""
        import json
        import genalign.registry as R
        for d in R.BUILTIN_TABLE.values():
            d.clear()  # the registries hold these dicts: only the decorators' registrations remain
        out = {}
        for k, reg in (("objectives", R.objectives), ("rewards", R.rewards), ("pipelines", R.pipelines)):
            reg.import_builtins()
            out[k] = {n: [f"{e.load().__module__}:{e.load().__qualname__}", e.description]
                      for n, e in reg._entries.items() if e.source == "builtin"}
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    real = json.loads(res.stdout.strip().splitlines()[-1])
    for which in ("objectives", "rewards", "pipelines"):
        # entries of a module not written yet (another engineer's work in progress) are listed by neither
        table = {n: list(v) for n, v in BUILTIN_TABLE[which].items() if module_exists(v[0].partition(":")[0])}
        missing = sorted(set(real[which]) - set(table))
        stale = sorted(set(table) - set(real[which]))
        changed = sorted(n for n in set(table) & set(real[which]) if table[n] != real[which][n])
        assert not (missing or stale or changed), (
            f"genalign.registry.BUILTIN_TABLE[{which!r}] is out of date: missing {missing}, no longer registered "
            f"{stale}, different class/description {changed}")


def test_listing_imports_no_builtin_module_and_get_imports_one():
    code = textwrap.dedent("""
        import sys
        from genalign.registry import objectives, rewards, pipelines
        listed = [n for r in (objectives, rewards, pipelines) for n, _ in r.describe()]
        heavy = [m for m in ("torch", "diffusers", "transformers", "genalign.objectives.mapo",
                             "genalign.rewards.clip") if m in sys.modules]
        assert "mapo" in listed and "pickscore-v1" in listed and "sd" in listed and not heavy, heavy
        assert "digit_classifier" in rewards and "nope" not in rewards
        cls = objectives.get("mapo")
        assert cls.__name__ == "MaPO" and "genalign.objectives.dragon" not in sys.modules
        print("ok")
    """)
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_genalign_list_answers_without_importing_torch():
    # The speed figure (under 2 s, from 11 s) is measured, not timed in a test: what makes it fast is asserted —
    # `genalign list` prints every registry without importing torch or any built-in module.
    import subprocess

    code = ("import sys; from genalign.cli import main; rc = main(['list']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "mapo" in out.stdout and "digit_classifier" in out.stdout and "sdxl" in out.stdout
    assert out.stdout.strip().endswith("NO-TORCH")


def test_table_entry_loads_lazily_and_decorator_replaces_it():
    reg = _fresh(objectives)
    assert isinstance(reg._entries.get("sft", Entry("", "x", "", "")).target, str) or "sft" not in reg._entries
    reg._ensure_loaded()
    assert isinstance(reg._entries["sft"].target, str)  # listed, not imported
    assert reg.get("sft").__name__ == "SFT"
    with pytest.raises(KeyError, match="known objectives: .*mapo"):
        reg.get("nope")


# -- --set on list elements, errors naming --set ------------------------------------------------------------------
def test_set_addresses_list_elements():
    from genalign.config import load_config

    cfg = load_config(None, ["rewards.0.weight=2"])  # the quickstart's default rewards list (not in any YAML)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("digit_classifier", 2.0)]
    cfg = load_config(None, ["rewards=[{name: ink_mass}, {name: contrast}]", "rewards.1.weight=0.5",
                             "rewards.-2.kwargs={a: 1}", "pipeline.lora.target_modules.-1=to_k"])
    assert [(r.name, r.weight, r.kwargs) for r in cfg.rewards] == [("ink_mass", 1.0, {"a": 1}), ("contrast", 0.5, {})]
    assert cfg.pipeline.lora.target_modules == ["to_q", "to_k", "to_v", "to_k"]


def test_set_on_a_list_from_a_yaml_file(tmp_path):
    import yaml

    from genalign.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"rewards": [{"name": "ink_mass"}, {"name": "contrast", "weight": 3}]}))
    cfg = load_config(p, ["rewards.0.weight=2"])
    assert [(r.name, r.weight) for r in cfg.rewards] == [("ink_mass", 2.0), ("contrast", 3.0)]


@pytest.mark.parametrize("override,expected", [
    ("rewards.3.weight=2", "--set rewards.3.weight=2: rewards has 1 element(s); index 3 is out of range"),
    ("rewards.0.weight=abc", "--set rewards.0.weight=abc: rewards.0.weight: 'abc':"),
    ("rewards.0.name=nope", "--set rewards.0.name=nope: rewards.0.name: 'nope': unknown reward"),
    ("rewards.weight=2", "--set rewards.weight=2: rewards is a list; address an element by its index, e.g. "
                         "rewards.0.weight"),
    ("objective.beta_mapo=-1", "--set objective.beta_mapo=-1: objective.beta_mapo: -1:"),
    ("objective.name=dpo", "--set objective.name=dpo: objective.name: 'dpo': a language-model objective"),
    ("data.source.rounds=abc", "--set data.source.rounds=abc: data.source.rounds: 'abc':"),  # no union tag
    ("train.steps.x=1", "--set train.steps.x=1: train.steps:"),
    ("train..steps=1", "--set train..steps=1: empty part in the key"),
    ("train.steps=[1", "--set train.steps=[1: the value is not valid YAML"),
    ("train.steps", "--set train.steps: expected key.sub=value"),
])
def test_override_errors_say_set_and_name_the_key_as_written(tmp_path, override, expected):
    from genalign.config import ConfigError, load_config

    p = tmp_path / "run.yaml"
    p.write_text("train: {steps: 5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.log_every=1", override])
    msg = str(e.value)
    assert msg.startswith(expected) and "\n" not in msg and str(p) not in msg, msg


def test_file_errors_still_name_the_file_not_set(tmp_path):
    from genalign.config import ConfigError, load_config

    p = tmp_path / "run.yaml"
    p.write_text("train: {steps: -1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["rewards.0.weight=2"])
    assert str(e.value).startswith(f"{p}: train.steps: -1:") and "--set" not in str(e.value)


def test_cli_train_bad_override_is_one_line(capsys):
    from genalign.cli import main

    assert main(["train", "--set", "rewards.5.weight=2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "genalign train: error: --set rewards.5.weight=2: rewards has 1 element(s); index 5 is out of range"


# -- offline: a hub id fails at once with one line -----------------------------------------------------------------
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "https://no-such-host.invalid"}])
def test_offline_hub_id_fails_at_once_with_one_line(monkeypatch, tmp_path, env):
    from genalign.errors import WeightsNotFoundError
    from genalign.pipelines.base import hub_offline_reason, load_diffusers_pipeline

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert hub_offline_reason() is not None
    from diffusers import DiffusionPipeline

    # "At once" is asserted as "no network download attempted" (only a local cache look-up, no retries over 30 s),
    # not with a clock: tests are not timed.
    real = DiffusionPipeline.download.__func__
    attempts = []

    def spy(cls, *a, **k):
        attempts.append(k.get("local_files_only", False))
        return real(cls, *a, **k)

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(spy))
    with pytest.raises(WeightsNotFoundError) as e:
        load_diffusers_pipeline("no-such-org/no-such-model")
    msg = str(e.value)
    assert "\n" not in msg and all(attempts), (attempts, msg)  # every look-up was local_files_only
    assert msg.startswith("pipeline.model: 'no-such-org/no-such-model' is not a local Diffusers folder")
    reason = "HF_HUB_OFFLINE is set" if "HF_HUB_OFFLINE" in env else "no network: cannot reach no-such-host.invalid:443"
    assert reason in msg
    assert "hf download no-such-org/no-such-model --local-dir DIR" in msg and "set pipeline.model: DIR" in msg


def test_offline_vae_names_the_vae(monkeypatch, tmp_path):
    from genalign.config import PipelineConfig
    from genalign.errors import WeightsNotFoundError
    from genalign.pipelines.base import load_pipeline_from_config

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match=r"^pipeline.vae: 'madebyollin/sdxl-vae-fp16-fix' is not a local "
                                                   r"Diffusers folder.*HF_HUB_OFFLINE is set"):
        load_pipeline_from_config(PipelineConfig(model="tiny:sdxl", vae="madebyollin/sdxl-vae-fp16-fix"))


def test_missing_local_path_is_not_treated_as_a_hub_id(tmp_path):
    from genalign.errors import WeightsNotFoundError
    from genalign.pipelines.base import load_diffusers_pipeline

    with pytest.raises(WeightsNotFoundError, match="not a Diffusers folder .no such directory."):
        load_diffusers_pipeline(str(tmp_path / "models" / "nope"))


def test_cli_generate_offline_is_one_line(monkeypatch, tmp_path, capsys):
    from genalign.cli import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "no-such-org/no-such-model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hf download no-such-org/no-such-model" in err
