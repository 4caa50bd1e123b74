"""Registries: built-ins, unknown names, and third-party plug-ins through entry points."""

import sys
import textwrap

import pytest

from genalign.registry import Registry, objectives, pipelines, rewards


def test_builtins_are_registered():
    assert {"mapo", "diffusion_dpo", "sft"} <= set(objectives.names())
    assert {"sd", "sdxl"} <= set(pipelines.names())
    assert "digit_classifier" in rewards.names()
    assert dict(objectives.describe())["mapo"].startswith("MaPO")


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="known objectives: .*mapo"):
        objectives.get("nope")


def test_third_party_objective_via_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "my_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from genalign.objectives.base import Objective, ObjectiveParams, LossOutput
        class Hinge(Objective):
            """Hinge loss on the pair margin (a plug-in)."""
            class Config(ObjectiveParams):
                margin: float = 1.0
    '''))
    dist = tmp_path / "my_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[genalign.objectives]\nhinge = my_plugin:Hinge\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Re-scan entry points of the real registry (restored after the test).
    reg = objectives
    monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    monkeypatch.setattr(reg, "_loaded", False)
    assert "hinge" in reg.names() and "mapo" in reg.names()
    cls = reg.get("hinge")
    assert cls.__name__ == "Hinge" and cls.Config().margin == 1.0
    assert "plug-in" in dict(reg.describe())["hinge"]
    sys.modules.pop("my_plugin", None)


def test_decorator_rejects_a_second_class_under_one_name():
    reg = Registry("reward", "genalign.none")

    @reg.register("r")
    class A:
        pass

    with pytest.raises(ValueError):
        @reg.register("r")
        class B:
            pass


def test_weight_free_rewards_are_declared_by_the_reward_classes():
    """`genalign plan` counts no network for a reward that declares ``weight_free`` (pixels/samples only); every
    reward with a network (including ones whose weights resolve another way, like the shipped music classifier)
    does not declare it."""
    from genalign.plan.estimate import _weight_free
    from genalign.registry import rewards

    free = {n for n in rewards.names() if getattr(rewards.get(n), "weight_free", False)}
    assert free == {"contrast", "ink_mass", "jpeg-compressibility", "jpeg-incompressibility", "canny", "soft_edges",
                    "vendi"}
    assert _weight_free("vendi") and not _weight_free("music_key") and not _weight_free("dpt_depth")
    assert not _weight_free("no-such-reward")  # unknown: not skipped silently (the plan notes it)
