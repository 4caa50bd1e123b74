"""Conventions users expect from the command line (issue 17): a fast `genalign list` (static registry table checked
against the real registrations), `--set` on list elements with errors naming `--set`, the offline fast-fail."""

from __future__ import annotations

import sys
import textwrap

import pytest

from genalign.registry import Entry, Registry, module_exists, objectives, pipelines, rewards


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


def test_genalign_list_answers_in_under_two_seconds():
    import subprocess
    import time

    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "genalign.cli", "list"], capture_output=True, text=True, timeout=120)
    dt = time.perf_counter() - t0
    assert out.returncode == 0 and "mapo" in out.stdout and "digit_classifier" in out.stdout and "sdxl" in out.stdout
    assert dt < 2.0, f"genalign list took {dt:.2f} s"


def test_table_entry_loads_lazily_and_decorator_replaces_it():
    reg = _fresh(objectives)
    assert isinstance(reg._entries.get("sft", Entry("", "x", "", "")).target, str) or "sft" not in reg._entries
    reg._ensure_loaded()
    assert isinstance(reg._entries["sft"].target, str)  # listed, not imported
    assert reg.get("sft").__name__ == "SFT"
    with pytest.raises(KeyError, match="known objectives: .*mapo"):
        reg.get("nope")
