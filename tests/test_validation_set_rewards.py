"""`validation.set_rewards`: a set reward (FD to reference statistics) is scored once over every validation sample,
not averaged over batches, and bad entries are refused with the config key named."""

from types import SimpleNamespace

import pytest
import torch

from genalign.config import ConfigError, RewardItem, ValidationConfig
from genalign.evaluation.validation import evaluate_rewards
from genalign.rewards.composite import CompositeReward
from genalign.rewards.fad import FADDataset, frechet_distance, gaussian_stats


class _SeededObjective:
    """Stands in for an objective: sample i is a fixed 3-vector drawn from its own generator (seed + i)."""

    model = SimpleNamespace(device=torch.device("cpu"), sample_rate=None)

    def sample(self, prompts, vcfg, generators):
        return torch.stack([torch.randn(3, generator=g) * 2.0 + 1.0 for g in generators])


class _Mean(torch.nn.Module):
    """An instance reward: the mean of each sample, ``(B, 3)`` → ``(B,)``."""

    kind = "instance"

    def forward(self, samples, prompts=None, **conditions):
        return samples.mean(-1)


def _run(batch_size: int, reward: FADDataset) -> dict:
    vcfg = ValidationConfig(prompts="x", samples_per_prompt=4, batch_size=batch_size, seed=7)
    comp = CompositeReward([("mean", _Mean(), 1.0, "none")]).eval()
    return evaluate_rewards(_SeededObjective(), comp, ["a", "b", "c"], vcfg, set_rewards={"fad-dataset": reward})


def test_set_reward_is_scored_once_over_all_samples_whatever_the_batch_size():
    ref = {"mu": torch.zeros(3), "cov": torch.eye(3)}
    fad = FADDataset(reference=ref)  # identity encoder: the samples are the embeddings
    whole = _run(12, fad)
    assert _run(2, fad)["fad-dataset"] == pytest.approx(whole["fad-dataset"], rel=1e-6)
    # by hand: the 12 samples (seeds 7..18), one Gaussian, FD to N(0, I)
    x = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(7 + i)) * 2.0 + 1.0 for i in range(12)])
    mu, cov = gaussian_stats(x.double())
    expected = -float(frechet_distance(mu, cov, torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)))
    assert whole["fad-dataset"] == pytest.approx(expected, rel=1e-4)
    assert whole["fad-dataset"] < -3.0  # mean 1 and std 2 are far from N(0, I): the value is not a batch artefact
    # the batch mean of per-batch FDs (what averaging would give) differs: batches of 2 have a poor covariance
    per_batch = [float(fad.score_embeddings(x[i:i + 2])) for i in range(0, 12, 2)]
    assert abs(sum(per_batch) / 6 - whole["fad-dataset"]) > 0.5
    assert whole["mean"] == pytest.approx(float(x.mean()), rel=1e-5)  # instance rewards keep their means


def test_build_set_rewards_refuses_an_instance_reward_and_names_the_key():
    from genalign.training.trainer import build_set_rewards

    with pytest.raises(ConfigError, match=r"validation.set_rewards.0: 'contrast' is not a set reward"):
        build_set_rewards([RewardItem(name="contrast")], "cpu")
    with pytest.raises(ConfigError, match=r"validation.set_rewards.0: .*unexpected keyword"):
        build_set_rewards([RewardItem(name="fad-dataset", kwargs={"nope": 1})], "cpu")
    got = build_set_rewards([RewardItem(name="fad-dataset", kwargs={"tiny": True}),
                             RewardItem(name="fad-dataset", kwargs={"tiny": True})], "cpu")
    assert list(got) == ["fad-dataset", "fad-dataset#2"]
