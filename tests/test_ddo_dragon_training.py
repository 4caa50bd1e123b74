"""DDO and DRAGON objectives inside the trainer, on tiny real-architecture pipelines (CPU, offline)."""

import json
import math

import pytest
import torch

from genalign.config import LoraConfig, load_config
from genalign.objectives.ddo import DDO, DDOData
from genalign.objectives.dragon import DRAGON, DragonRewardTerm
from genalign.pipelines.denoising import paired_denoising_losses, shared_noise_losses
from genalign.pipelines.lora import merge_lora_into_base, trainable_snapshot
from genalign.pipelines.sampling import encode_prompts
from genalign.pipelines.sd import SDAdapter
from genalign.pipelines.tiny import tiny_sd_pipeline
from genalign.training.trainer import train

FAST = ["pipeline.model=tiny:sd", "validation.samples_per_prompt=1", "validation.num_inference_steps=2",
        "validation.max_prompts=2", "train.batch_size=4", "train.log_every=1", "export.enabled=false"]


@pytest.fixture
def sd():
    return SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4))


def _perturb_lora(model, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# -- shared (t, ε) plumbing ---------------------------------------------------------------------------------------
def test_shared_noise_losses_same_inputs_for_policy_and_reference_and_no_ref_grad(sd):
    calls = []
    orig = sd.predict

    def spy(x_t, t, cond, unet=None):
        calls.append((x_t.clone(), t.clone(), cond["encoder_hidden_states"].clone(), unet))
        return orig(x_t, t, cond, unet)

    sd.predict = spy
    _perturb_lora(sd)  # policy != reference, so a mix-up would show
    x0 = torch.randn(5, 4, 8, 8)
    cond = sd.encode_prompt(["a", "b", "c", "d", "e"])
    out = shared_noise_losses(sd, x0, cond, torch.Generator().manual_seed(0), reduction="sum")
    (ref, pol) = calls  # the reference pass runs first (pipelines/denoising.py: lower peak memory)
    assert pol[3] is None and ref[3] is not None  # the other call is the reference network
    assert torch.equal(pol[0], ref[0]) and torch.equal(pol[1], ref[1]) and torch.equal(pol[2], ref[2])
    assert len(set(out.timesteps.tolist())) > 1  # one t per sample, not one per batch
    # the shared x_t is exactly add_noise(x0, ε, t) of that draw
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (5,), generator=g)
    assert torch.equal(out.timesteps, t) and torch.allclose(out.x_t, sd.add_noise(x0, noise, t))
    assert out.losses.requires_grad and not out.ref_losses.requires_grad
    assert not torch.allclose(out.losses, out.ref_losses)
    out.losses.sum().backward()
    frozen = [p for n, p in sd.unet.named_parameters() if "lora" not in n]
    assert all(p.grad is None for p in frozen)  # the reference (base weights) never receives gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sd.trainable_parameters())


def test_paired_shared_losses_repeat_noise_within_pairs_any_rank(sd):
    lat = torch.randn(3, 4, 8, 8)
    cond = sd.encode_prompt(["a", "b", "c"])
    out = paired_denoising_losses(sd, lat, lat.clone(), cond, torch.Generator().manual_seed(0), with_reference=True)
    lw, ll, rw, rl = out.losses_w, out.losses_l, out.ref_w, out.ref_l
    assert torch.allclose(lw, ll) and torch.allclose(rw, rl)  # same latents + shared (t, ε) -> same loss
    assert torch.allclose(lw, rw)  # LoRA B = 0 at init: policy == reference


# -- DDO ---------------------------------------------------------------------------------------------------------
def _ddo(sd, **cfg):
    obj = DDO(DDO.Config(**cfg), sd)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(6, 4, 8, 8, generator=g)
    prompts = [f"a handwritten digit {i}" for i in range(6)]
    obj.data = DDOData(sd, lat, prompts, encode_prompts(sd, prompts))
    obj._null_cond = encode_prompts(sd, [""])
    obj.total_steps = 10
    fakes = {"latents": torch.randn(4, 4, 8, 8, generator=g), "rows": torch.arange(4), "round": 0,
             "ref_fingerprint": obj.reference_fingerprint()}
    obj._fakes = {**fakes, "cond": {k: v[:4] for k, v in obj.data.cond.items()}}
    return obj


def test_ddo_loss_at_init_is_one_plus_alpha_ln2_and_fakes_use_the_reference(sd):
    obj = _ddo(sd, alpha=4.0, beta=0.05)
    out = obj.loss(obj.data.batch(torch.arange(4)), torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(5 * math.log(2), abs=1e-6)
    assert out.metrics["d_real"] == pytest.approx(0.5) and out.metrics["d_fake"] == pytest.approx(0.5)
    assert "loss" not in out.metrics  # the trainer logs the loss itself (no double count)


def test_ddo_reduction_and_beta_change_the_loss(sd):
    _perturb_lora(sd, 0.05)
    obj = _ddo(sd, beta=0.05)
    a = obj.loss(obj.data.batch(torch.arange(4)), torch.Generator().manual_seed(0)).loss
    obj = _ddo(sd, beta=0.05, reduction="mean")
    b = obj.loss(obj.data.batch(torch.arange(4)), torch.Generator().manual_seed(0)).loss
    obj = _ddo(sd, beta=0.05 * 256, reduction="mean")  # D = 4*8*8 = 256: β_mean = D·β_sum gives the sum result
    c = obj.loss(obj.data.batch(torch.arange(4)), torch.Generator().manual_seed(0)).loss
    assert not torch.isclose(a, b) and torch.isclose(a, c, atol=1e-5)


def test_ddo_round_switch_replaces_the_reference(sd, tmp_path):
    obj = _ddo(sd)
    _perturb_lora(sd)  # a "trained" policy
    x_t, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    cond = sd.encode_prompt(["a", "b", "c"])
    with torch.no_grad():
        policy_before = sd.predict(x_t, t, cond)
        with sd.reference() as r:
            ref_before = sd.predict(x_t, t, cond, unet=r)
    fp0 = obj.reference_fingerprint()
    opt = torch.optim.AdamW(sd.trainable_parameters(), lr=1e-3)
    sd.predict(x_t, t, cond).sum().backward()
    opt.step()
    with torch.no_grad():
        trained = sd.predict(x_t, t, cond)
    res = obj.switch_reference()
    if res.reset_optimizer_state:  # what the trainer does with the objective's StepResult
        opt.state.clear()
    with torch.no_grad():
        with sd.reference() as r:
            ref_after = sd.predict(x_t, t, cond, unet=r)
        policy_after = sd.predict(x_t, t, cond)
    # new reference = the round's checkpoint (folded weights vs the LoRA path: fp32 rounding differs with the
    # thread count, up to ~2e-5 here; the old reference is 1e-3 away)
    assert torch.allclose(ref_after, trained, atol=1e-4)
    assert not torch.allclose(ref_after, ref_before, atol=1e-3)
    assert torch.allclose(policy_after, ref_after, atol=1e-6)  # and it is the new initialisation
    assert not torch.allclose(policy_before, policy_after, atol=1e-3)
    assert obj.round == 1 and obj._fakes is None and obj.reference_fingerprint() != fp0
    assert res.reset_optimizer_state and len(opt.state) == 0  # fresh optimizer moments for the new round
    # resume: a fresh model + the saved state rebuilds the same reference
    state = obj.state_dict()
    sd2 = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4))
    obj2 = DDO(DDO.Config(), sd2)
    obj2.load_state_dict(state)
    with torch.no_grad(), sd2.reference() as r:
        assert torch.allclose(sd2.predict(x_t, t, cond, unet=r), ref_after, atol=1e-5)
    assert obj2.round == 1


def test_merge_lora_without_reset_keeps_the_lora(sd):
    _perturb_lora(sd)
    snap = trainable_snapshot(sd.unet)
    merge_lora_into_base(sd.unet, snap, reset=False)
    after = trainable_snapshot(sd.unet)
    assert all(torch.equal(snap[k], after[k]) for k in snap)


def test_ddo_trains_with_rounds_in_the_trainer(tmp_path):
    cfg = load_config(None, FAST[:-1] + [
        "objective.name=ddo", "data.source={kind: images, source: 'digits:train', max_images: 32}",
        "objective.num_fakes=8", "objective.fake_num_inference_steps=2", "objective.rounds=2",
        "train.steps=4", "train.learning_rate=0.01"])
    s = train(cfg, tmp_path / "ddo", progress=False)
    h = s["history"]
    assert h[0]["loss"] == pytest.approx(5 * math.log(2), abs=1e-5)  # policy == reference at start
    assert h[2]["round"] == 1 and h[2]["loss"] == pytest.approx(5 * math.log(2), abs=1e-5)  # and after the switch
    assert h[1]["loss"] < h[0]["loss"]
    om = s["objective_metrics"]
    assert om["final_round"] == 1 and om["round_history"][0]["end_step"] == 2
    assert (tmp_path / "ddo" / "ddo" / "fakes_round0.pt").exists() and (tmp_path / "ddo" / "ddo" / "fakes_round1.pt").exists()
    f0 = torch.load(tmp_path / "ddo" / "ddo" / "fakes_round0.pt", weights_only=True)
    f1 = torch.load(tmp_path / "ddo" / "ddo" / "fakes_round1.pt", weights_only=True)
    assert f0["ref_fingerprint"] != f1["ref_fingerprint"] and not torch.allclose(f0["latents"], f1["latents"])
    # export after rounds = the merged network; equals the model rebuilt from the last checkpoint + round state
    from diffusers import StableDiffusionPipeline

    from genalign.training import checkpoint as ckpt

    exp = StableDiffusionPipeline.from_pretrained(tmp_path / "ddo" / "export")
    last = ckpt.list_checkpoints(tmp_path / "ddo")[-1]
    m = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=8))
    ckpt.load_trainable(m.unet, last / "trainable.safetensors")
    obj = DDO(DDO.Config(), m)
    obj.load_state_dict(torch.load(last / "training_state.pt", weights_only=True)["objective"])
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    cond = m.encode_prompt(["a handwritten digit 1", "a handwritten digit 2"])
    with torch.no_grad():
        want = m.predict(x_t, t, cond)
        got = exp.unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        base = tiny_sd_pipeline().unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-4)


# -- DRAGON ------------------------------------------------------------------------------------------------------
class _FakeTerm:
    def __init__(self, kind, weight=1.0):
        self.kind, self.label = kind, kind
        self.spec = DragonRewardTerm(name="x", weight=weight)
        self.weight, self.normalize = self.spec.weight, self.spec.normalize

    def set_fn(self, items):
        return float(-(items.mean(0) - 3.0).pow(2).sum())  # set reward: the set mean should be near 3

    def per_item(self, ev):
        from genalign.rewards.terms import leave_one_out_contributions

        return ev["values"].double() if ev["kind"] == "instance" else leave_one_out_contributions(ev["items"], self.set_fn)


def _dragon(sd, terms, **cfg):
    obj = DRAGON(DRAGON.Config(**cfg), sd)
    obj.terms = terms
    return obj


def test_dragon_pairs_built_as_configured(sd):
    lat = torch.arange(6).float().view(6, 1, 1, 1).expand(6, 4, 8, 8).clone()
    prompts = [p for p in ("p0", "p1", "p2") for _ in range(2)]
    inst = {"kind": "instance", "values": torch.tensor([0.1, 0.9, 0.5, 0.5, 0.8, 0.2])}
    # instance reward -> auto = DPO, best vs worst per prompt, ties dropped and counted
    obj = _dragon(sd, [_FakeTerm("instance")])
    assert obj.loss_kind == "dpo"
    d = obj.build_demonstrations(lat, prompts, [inst], 3, 2)
    assert d["paired"] and d["n"] == 2 and d["dropped"] == 1
    assert d["latents_w"][:, 0, 0, 0].tolist() == [1.0, 4.0] and d["latents_l"][:, 0, 0, 0].tolist() == [0.0, 5.0]
    # explicit KTO: unpaired, D+ = value > median
    obj = _dragon(sd, [_FakeTerm("instance")], loss="kto")
    d = obj.build_demonstrations(lat, prompts, [inst], 3, 2)
    assert not d["paired"] and d["labels"].tolist() == [0, 1, 0, 0, 1, 0]
    # single set reward -> auto = KTO with leave-one-out credit
    items = torch.tensor([[3.0], [3.1], [9.0], [2.9], [3.2], [3.0]])
    sev = {"kind": "set", "items": items, "value": 0.0}
    obj = _dragon(sd, [_FakeTerm("set")])
    assert obj.loss_kind == "kto"
    d = obj.build_demonstrations(lat, prompts, [sev], 3, 2)
    assert d["labels"].tolist() == [1, 0, 0, 1, 0, 1]  # items pulling the set mean away from 3 are in D-
    # set reward, DPO, greedy pairwise split (K = 2): chosen = the member whose selection raises r(D+)
    obj = _dragon(sd, [_FakeTerm("set")], loss="dpo")
    d = obj.build_demonstrations(lat, prompts, [sev], 3, 2)
    assert d["latents_w"][:, 0, 0, 0].tolist() == [0.0, 3.0, 4.0]  # only swapping the outlier out helps
    assert d["latents_l"][:, 0, 0, 0].tolist() == [1.0, 2.0, 5.0]
    obj = _dragon(sd, [_FakeTerm("set")], loss="dpo", set_pair_builder="best_worst")
    d2 = obj.build_demonstrations(lat, prompts, [sev], 3, 2)
    assert d2["n"] == 3 and d2["latents_w"][1, 0, 0, 0] == 3.0


def test_dragon_losses_at_init(sd):
    lat = torch.randn(4, 4, 8, 8)
    cond = sd.encode_prompt(["a", "b", "c", "d"])
    obj = _dragon(sd, [_FakeTerm("instance")])
    out = obj.loss({"latents_w": lat[:2], "latents_l": lat[2:], "cond": {k: v[:2] for k, v in cond.items()}},
                   torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    out = obj.loss({"latents": lat, "labels": torch.tensor([1.0, 0.0, 1.0, 0.0]), "cond": cond},
                   torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(0.5, abs=1e-6)


def test_dragon_runs_two_rounds_with_instance_and_set_rewards(tmp_path):
    cfg = load_config(None, FAST + [
        "objective.name=dragon", "data.source={kind: prompts, prompts: 'digits:train'}",
        "objective.rewards=[{name: digit_classifier, normalize: zscore}, "
        "{name: exemplar_fd, encoder: digits, exemplars: 'digits:thick', normalize: zscore}]",
        "objective.prompts_per_round=4", "objective.clips_per_prompt=2", "objective.num_inference_steps=2",
        "objective.win_rate_samples_per_prompt=2", "objective.steps_per_round=1", "objective.win_rate_subsets=20",
        "train.steps=2", "train.batch_size=2"])
    s = train(cfg, tmp_path / "dragon", progress=False)
    om = s["objective_metrics"]
    assert om["loss"] == "kto"  # a set reward among the terms -> unpaired by default
    assert [r["round"] for r in om["rounds"]] == [0, 1]
    assert set(om["win_rate"]) == {"digit_classifier", "exemplar_fd@digits:thick"}
    assert all(0.0 <= v <= 1.0 for v in om["win_rate"].values())
    assert om["terms"]["exemplar_fd@digits:thick"]["before"] <= 0
    for term in om["terms"].values():  # per-sample win rate with its binomial interval (issue 14 item 10)
        assert term["ci_low"] <= term["win_rate"] <= term["ci_high"] and term["n"] == 4
    assert "subset_bootstrap_preference" in om["terms"]["exemplar_fd@digits:thick"]
    assert (tmp_path / "dragon" / "dragon" / "round1.pt").exists()
    json.dumps(s)  # summary is JSON-serialisable
