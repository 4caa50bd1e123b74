"""Benchmarks: the shared harness measures what it claims, and each benchmark's ``--quick`` mode runs and prints its
table. Nothing here is timed against a threshold of speed: the figures of the quick modes mean nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the folder is not a package; scripts import ``_harness``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses look their module up while the class is created
        spec.loader.exec_module(mod)
    return sys.modules[key]


@pytest.fixture
def keep_threads():
    """The benchmarks set torch's thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _busy(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def test_interleave_ratio_tracks_work_and_baseline_is_one():
    h = _load("_harness")
    out = h.interleave({"one": lambda: _busy(200_000), "two": lambda: _busy(400_000)}, baseline="one", rounds=5)
    assert set(out) == {"one", "two"}
    assert len(out["two"].cpu) == 5 and len(out["two"].cpu_ratio) == 5
    assert out["one"].cpu_ratio == [1.0] * 5
    assert 1.5 < out["two"].cpu_ratio_median < 2.7  # twice the work → about twice the CPU time
    assert out["two"].wall_median > 0
    with pytest.raises(ValueError, match="baseline"):
        h.interleave({"a": lambda: None}, baseline="b")


def test_measure_rise_sees_one_step_allocation_not_earlier_peaks():
    h = _load("_harness")
    big = torch.ones(32 * 2**20)  # 128 MiB peak BEFORE the measured step: must not count
    del big
    rise = h.measure_rise(lambda: torch.ones(16 * 2**20).sum())["rise_mib"]  # 64 MiB touched, then freed
    assert 56 < rise < 100
    idle = h.measure_rise(lambda: None)["rise_mib"]
    assert idle < 8


def test_markdown_table_aligns_and_rejects_pipes():
    h = _load("_harness")
    t = h.markdown_table(["name", "x"], [["a", "1.00"], ["bb", "10.5"]]).splitlines()
    assert t[0] == "| name |    x |" and t[1] == "|------|-----:|" and t[3] == "| bb   | 10.5 |"
    with pytest.raises(ValueError, match="'\\|'"):
        h.markdown_table(["a|b"], [])


def test_score_throughput_quick_prints_tables(capsys, keep_threads):
    res = _load("score_throughput").main(["--quick"])
    out = capsys.readouterr().out
    for name in ("| loop ", "| batched ", "| batched+text-once ", "| batched+text-once+torch-pre ", "pre-torch"):
        assert name in out
    assert res["speedup_vs_loop"]["loop"] == 1.0
    # Same PIL preprocessing: batching and text de-duplication change float rounding only.
    assert res["max_diff_vs_loop"]["batched"] < 1e-3 and res["max_diff_vs_loop"]["batched+text-once"] < 1e-3
    assert res["api_diff"] < 1e-4  # the composed contender 4 is what reward.score computes


def test_mapo_step_quick_prints_table(capsys, keep_threads):
    res = _load("mapo_step").main(["--quick", "--memory-repeats", "0"])
    out = capsys.readouterr().out
    for name in ("bare", "genalign", "genalign-uncached", "official-style"):
        assert f"| {name} " in out
        assert res[name]["cpu_ms"] > 0
    assert res["bare"]["cpu_ratio"] == 1.0
    assert "8× down" in out  # the default VAE is the SDXL-like 8× one


def test_dpo_memory_quick_prints_table_and_orders_agree(capsys, keep_threads):
    res = _load("dpo_memory").main(["--quick"])
    out = capsys.readouterr().out
    assert "VmHWM" in out and "| dpo-ref-after " in out
    assert res["ratio_to_mapo"]["mapo"] == 1.0
    assert all(v > 0 for v in res["rise_mib"].values())
    # Reference before or after the policy forward: the same loss and gradients, bit for bit.
    assert res["max_dloss"] == 0.0 and res["max_dgrad"] == 0.0
