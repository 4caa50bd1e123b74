"""Round bookkeeping shared by DDO and DRAGON (genalign/objectives/rounds.py) and the seeded sampler it relies on."""

import pytest
import torch

from genalign.objectives.rounds import BestCheckpoint, RoundClock, fingerprint, load_or_build_round


def test_fingerprint_identifies_tensors_and_values():
    a = {"round": 1, "merged": [{"w": torch.ones(2, 2)}]}
    assert fingerprint(a) == fingerprint({"merged": [{"w": torch.ones(2, 2)}], "round": 1})  # key order irrelevant
    assert fingerprint(a) != fingerprint({"round": 1, "merged": [{"w": torch.ones(2, 2) * (1 + 1e-6)}]})
    assert fingerprint(a) != fingerprint({"round": 2, "merged": [{"w": torch.ones(2, 2)}]})


def test_load_or_build_round_caches_and_refuses_another_model_state(tmp_path):
    calls = []

    def build(fp="A"):
        calls.append(1)
        return {"x": torch.arange(3), "fingerprint": fp, "round": 0}

    path = tmp_path / "m" / "round0.pt"
    first = load_or_build_round(path, build, "A")
    again = load_or_build_round(path, lambda: pytest.fail("must not rebuild"), "A")  # resume: read from disk
    assert len(calls) == 1 and torch.equal(first["x"], again["x"]) and path.exists()
    assert not path.with_suffix(".tmp").exists()  # written atomically
    with pytest.raises(RuntimeError, match="round0.pt"):
        load_or_build_round(path, build, "B")  # a cache from another reference is refused, naming the file
    assert load_or_build_round(None, lambda: {"v": 1}, None) == {"v": 1}  # no run folder: in memory
    assert load_or_build_round(tmp_path / "k.pt", lambda: {"ref": "Z"}, "Z", key="ref")["ref"] == "Z"


def test_round_clock_round_trip():
    c = RoundClock()
    c.advance(7)
    c.history.append({"round": 0, "end_step": 7})
    c.finished = True
    d = RoundClock()
    d.load_state_dict(c.state_dict())
    assert (d.round, d.start_step, d.history, d.finished) == (1, 7, [{"round": 0, "end_step": 7}], True)
    assert d.steps_in_round(10) == 3
    fresh = RoundClock()
    fresh.load_state_dict({})
    assert (fresh.round, fresh.start_step, fresh.finished) == (0, 0, False)


def test_best_checkpoint_keeps_the_lowest_score_and_snapshots_only_then():
    b = BestCheckpoint()
    taken = []

    def snap(tag):
        return lambda: taken.append(tag) or {"w": torch.tensor([float(len(taken))])}

    assert b.consider(10, 5.0, snap("a")) and b.best["step"] == 10
    assert not b.consider(20, 6.0, snap("b"))  # worse: no snapshot taken
    assert b.consider(30, 4.0, snap("c")) and b.best["step"] == 30 and b.best["score"] == 4.0
    assert taken == ["a", "c"]
    b.reset()
    assert b.best == {}


def test_sample_latents_is_batch_independent_on_an_image_pipeline():
    from genalign.config import LoraConfig
    from genalign.pipelines.sampling import sample_latents
    from genalign.pipelines.sd import SDAdapter
    from genalign.pipelines.tiny import tiny_sd_pipeline

    sd = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4))
    prompts = ["a handwritten digit 1", "a handwritten digit 2", "a handwritten digit 3"]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12, 13)]  # noqa: E731
    a = sample_latents(sd, prompts, gens(), 2, batch_size=3)
    b = sample_latents(sd, prompts, gens(), 2, batch_size=1)
    assert a.shape == (3, 4, 8, 8) and a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5)
    ref = sample_latents(sd, prompts, gens(), 2, use_reference=True)
    assert torch.allclose(ref, a, atol=1e-5)  # LoRA B = 0: the reference samples what the policy samples
    assert sd.denoiser().training  # training mode restored
    with pytest.raises(ValueError):
        sample_latents(sd, prompts, gens()[:2])


def test_ddo_fd_selection_loads_the_best_candidate_and_switches_from_it():
    from genalign.config import LoraConfig
    from genalign.objectives.ddo import DDO
    from genalign.pipelines.lora import trainable_snapshot
    from genalign.pipelines.sd import SDAdapter
    from genalign.pipelines.tiny import tiny_sd_pipeline

    sd = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4))
    obj = DDO(DDO.Config(rounds=2, steps_per_round=3, round_selection="fd", selection_every=1), sd)
    obj.total_steps = 6
    scores = iter([3.0, 1.0, 2.0])  # candidates at steps 1, 2, then the round end at step 3
    obj.selection_score = lambda: next(scores)
    snaps, g = {}, torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in sd.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        snaps[step] = trainable_snapshot(sd.denoiser())
        res = obj.on_step_end(step)
    assert res.reset_optimizer_state and obj.round == 1  # the round ended and the reference switched
    assert [h.get("fd") for h in obj.history if "fd" in h] == [3.0, 1.0, 2.0]
    assert obj.history[-1] == {"round": 0, "selected_step": 2, "end_step": 3}
    assert len(obj.merged) == 1 and all(torch.equal(obj.merged[0][k], snaps[2][k]) for k in snaps[2])  # step 2 won
    assert obj.best.best == {}


def test_frechet_selector_is_deterministic_and_pools_features():
    from genalign.config import LoraConfig
    from genalign.evaluation.selection import FrechetSelector, pool_features
    from genalign.pipelines.sd import SDAdapter
    from genalign.pipelines.tiny import tiny_sd_pipeline

    assert pool_features(torch.randn(5, 4, 8, 8)).shape == (5, 64)
    assert pool_features(torch.randn(5, 8, 64)).shape == (5, 32)
    assert pool_features(torch.randn(5, 4, 2, 2)).shape == (5, 16)
    sd = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4))
    real = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sel = FrechetSelector([f"a handwritten digit {i % 10}" for i in range(32)], real, num_samples=8,
                          num_inference_steps=2)
    a, b = sel.score(sd), sel.score(sd)
    assert a == b and a > 0  # same prompts and seeds for every candidate
    with pytest.raises(ValueError):
        FrechetSelector(["x"], real, features="digits")
