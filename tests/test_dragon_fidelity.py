"""DRAGON fidelity fixes (issue 14 items 8-10, 15): round length with accumulation, ties at the top, per-sample win
rates with binomial intervals, one config, β logged in both conventions."""

import logging
import math

import pytest
import torch
from scipy import stats

from genalign.config import LoraConfig
from genalign.evaluation.demonstrations import build_unpaired_threshold
from genalign.evaluation.winrate import (
    paired_win_rate, set_swap_win_rate, subset_bootstrap_preference, term_win_rates, wilson_interval,
)
from genalign.objectives.dragon import DRAGON, DragonRewardTerm
from genalign.objectives.rounds import optimizer_steps_per_pass


# -- item 8: a round's "one pass" counts optimizer steps -------------------------------------------------------
def test_optimizer_steps_per_pass_counts_accumulation_and_ranks():
    assert optimizer_steps_per_pass(16, 2) == 8
    assert optimizer_steps_per_pass(16, 2, gradient_accumulation_steps=4) == 2  # 8 micro-steps = 2 optimizer steps
    assert optimizer_steps_per_pass(16, 2, num_processes=2, gradient_accumulation_steps=4) == 1
    assert optimizer_steps_per_pass(17, 2, gradient_accumulation_steps=4) == 3  # the partial pass counts
    assert optimizer_steps_per_pass(0, 4) == 1
    with pytest.raises(ValueError):
        optimizer_steps_per_pass(8, 2, gradient_accumulation_steps=0)


def test_dragon_round_is_one_pass_of_optimizer_steps_with_accumulation():
    obj = DRAGON(DRAGON.Config(), model=None)
    obj.demos = {"n": 256 * 4 // 2}  # dragon_stable_audio.yaml: P·K = 1024 clips -> 512 pairs
    obj.batch_size, obj.world, obj.accumulation = 4, 1, 4  # the recipe: batch 4, accumulation 4
    assert obj.round_steps() == 32  # 512 rows / (4 rows · 4 micro-steps); counting micro-steps gave 128 (4 passes)
    obj = DRAGON(DRAGON.Config(steps_per_round=5), model=None)
    obj.demos = {"n": 512}
    assert obj.round_steps() == 5


# -- item 9: ties at the maximum never empty D+ -----------------------------------------------------------------
def test_ties_at_the_maximum_are_split_deterministically():
    labels = build_unpaired_threshold(torch.tensor([0.5, 1.0, 1.0, 1.0]))
    assert labels.tolist() == [False, True, True, False]  # was [False] * 4: every sample undesirable
    assert build_unpaired_threshold(torch.tensor([1.0, 1.0, 1.0, 1.0])).tolist() == [True, True, False, False]
    assert build_unpaired_threshold(torch.tensor([2.0, 2.0, 2.0])).tolist() == [True, False, False]
    assert build_unpaired_threshold(torch.tensor([1.0, 1.0, 1.0]), "mean").tolist() == [True, False, False]
    # ties below the top keep the documented rule: equal to the threshold -> D-
    assert build_unpaired_threshold(torch.tensor([0.1, 0.9, 0.5, 0.5, 0.8, 0.2])).tolist() == \
        [False, True, False, False, True, False]
    # deterministic: same input, same split; an explicit number is taken literally
    x = torch.tensor([3.0, 3.0, 1.0, 3.0, 3.0])
    assert torch.equal(build_unpaired_threshold(x), build_unpaired_threshold(x.clone()))
    assert build_unpaired_threshold(x).sum() == 2
    assert not build_unpaired_threshold(torch.tensor([1.0, 1.0]), 5.0).any()


# -- item 10: per-sample win rate with a binomial interval ----------------------------------------------------------
def test_wilson_interval_matches_scipy():
    for k, n in ((0, 10), (3, 10), (41, 50), (50, 50), (7, 80)):
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_paired_win_rate_counts_ties_half_and_reports_interval_and_sign_test():
    new = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    base = torch.tensor([0.0, 2.0, 5.0, 1.0, 4.0, 6.0])  # wins at 0, 3, 4; ties at 1, 5; loss at 2
    r = paired_win_rate(new, base)
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (3, 2, 1, 6)
    assert r["win_rate"] == pytest.approx((3 + 0.5 * 2) / 6)
    lo, hi = wilson_interval(4.0, 6)
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert r["ci_low"] < r["win_rate"] < r["ci_high"]
    assert r["p_value"] == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue)
    # a clear improvement on 60 pairs: the interval excludes 1/2
    g = torch.Generator().manual_seed(0)
    b = torch.randn(60, generator=g)
    strong = paired_win_rate(b + 1.0 + 0.1 * torch.randn(60, generator=g), b)
    assert strong["win_rate"] == 1.0 and strong["ci_low"] > 0.9 and strong["p_value"] < 1e-10


def test_same_distribution_models_give_an_interval_around_one_half_unlike_the_subset_bootstrap():
    # Two "models" drawn from one distribution: the per-sample win rate's interval covers 1/2; the subset bootstrap
    # figure (the old "win rate") swings far from 1/2 on the same data, which is why it is no longer called that.
    fn = lambda x: -float(((x.mean(0) - 0.0) ** 2).sum())  # noqa: E731
    covered, pref = 0, []
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
        r = set_swap_win_rate(a, b, fn)
        covered += r["ci_low"] <= 0.5 <= r["ci_high"]
        pref.append(subset_bootstrap_preference(a, b, fn, num_subsets=100, generator=torch.Generator().manual_seed(0)))
    assert covered >= 7
    assert max(pref) - min(pref) > 0.3


def test_set_swap_win_rate_hand_case():
    fn = lambda x: -float((x.mean(0) ** 2).sum())  # noqa: E731  set reward: the set mean should be 0
    base = torch.tensor([[1.0], [1.0], [1.0], [-1.0]])  # mean 0.5
    new = torch.tensor([[0.0], [1.0], [2.0], [-1.0]])  # swap 0 -> mean 0.25 (win), 1, 3 tie, 2 -> mean .75 (loss)
    r = set_swap_win_rate(new, base, fn)
    assert (r["wins"], r["ties"], r["losses"]) == (1, 2, 1) and r["win_rate"] == 0.5


def test_term_win_rates_name_the_bootstrap_figure():
    class Term:
        def __init__(self, label, kind):
            self.label, self.kind = label, kind

        def set_fn(self, items):
            return -float((items.mean(0) ** 2).sum())

    g = torch.Generator().manual_seed(0)
    base = {"inst": {"kind": "instance", "values": torch.zeros(10)},
            "set": {"kind": "set", "items": torch.randn(10, 2, generator=g) + 1, "value": -1.0}}
    new = {"inst": {"kind": "instance", "values": torch.ones(10)},
           "set": {"kind": "set", "items": torch.randn(10, 2, generator=g) * 0.1, "value": -0.01}}
    out = term_win_rates([Term("inst", "instance"), Term("set", "set")], new, base, num_subsets=20)
    assert out["inst"]["win_rate"] == 1.0 and out["inst"]["ci_low"] > 0.6 and out["inst"]["n"] == 10
    assert "win_rate" in out["set"] and "subset_bootstrap_preference" in out["set"]
    assert "not a win rate" in out["set"]["subset_bootstrap_note"]


# -- item 15 + issue 12: one config, reward members in the top-level shape, β logged --------------------------------
def test_dragon_reward_terms_use_the_top_level_reward_shape():
    from genalign.config import RewardItem

    t = DragonRewardTerm(name="clap", weight=0.5, normalize="zscore", kwargs={"tiny": True})
    assert isinstance(t, RewardItem) and (t.name, t.weight, t.kwargs) == ("clap", 0.5, {"tiny": True})
    with pytest.raises(ValueError):
        DragonRewardTerm(name="clap", normalize="running")  # within-round normalisation only
    import genalign.objectives.dragon as dragon_module

    assert not hasattr(dragon_module, "DRAGONConfig")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_dragon_logs_beta_in_both_conventions(tmp_path):
    from genalign.config import load_config
    from genalign.training.trainer import train

    cfg = load_config(None, ["pipeline.model=tiny:sd", "validation.samples_per_prompt=1",
                             "validation.num_inference_steps=2", "validation.max_prompts=2", "train.batch_size=2",
                             "export.enabled=false", "objective.name=dragon",
                             "data.source={kind: prompts, prompts: 'digits:train'}", "objective.loss=kto",
                             "objective.prompts_per_round=2", "objective.clips_per_prompt=2",
                             "objective.num_inference_steps=2", "objective.win_rate_samples_per_prompt=1",
                             "train.steps=1"])
    log, h = logging.getLogger("genalign.objectives.dragon"), _Collect()  # the trainer resets the root handlers
    log.addHandler(h)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        train(cfg, tmp_path / "run", progress=False)
    finally:
        log.removeHandler(h)
        log.setLevel(old)
    d = 4 * 8 * 8
    line = next(m for m in h.lines if "reduction over D=" in m)
    assert f"beta=1000 with mean reduction over D={d}" in line and f"beta={1000 / d:g} with sum" in line
    assert math.isclose(1000 / d, 3.90625)


def test_dragon_without_terms_uses_the_run_composite_as_one_instance_reward(tmp_path):
    from genalign.config import load_config
    from genalign.training.trainer import train

    cfg = load_config(None, ["pipeline.model=tiny:sd", "validation.samples_per_prompt=1",
                             "validation.num_inference_steps=2", "validation.max_prompts=2", "train.batch_size=2",
                             "export.enabled=false", "objective.name=dragon",
                             "data.source={kind: prompts, prompts: 'digits:train'}",
                             "objective.prompts_per_round=3", "objective.clips_per_prompt=2",
                             "objective.num_inference_steps=2", "objective.win_rate_samples_per_prompt=1",
                             "train.steps=1"])
    om = train(cfg, tmp_path / "run", progress=False)["objective_metrics"]
    assert om["loss"] == "dpo" and set(om["win_rate"]) == {"composite"}  # auto: an instance reward -> paired DPO
    t = om["terms"]["composite"]
    assert t["kind"] == "instance" and t["n"] == 2 and t["ci_low"] <= t["win_rate"] <= t["ci_high"]
