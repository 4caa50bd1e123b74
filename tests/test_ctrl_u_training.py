"""Ctrl-U / ControlNet++ / plain ControlNet objectives, condition rewards and evaluation helpers (issue 6)."""

import json
from pathlib import Path

import pytest
import torch

from genalign.data.conditions import ConditionData
from genalign.objectives.ctrl_u import ControlNetPP, ControlNetSFT, CtrlU
from genalign.pipelines.controlnet import ControlNetAdapter
from genalign.pipelines.tiny import tiny_sd_pipeline
from genalign.rewards.condition import CannyEdges, DigitStrokeMask, DPTDepth, SoftEdges
from genalign.rewards.segmentation import Mask2FormerSeg, SegformerSeg, UperNetSeg, labels_from_palette

ROOT = Path(__file__).resolve().parent.parent


# -- condition rewards ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", [(DigitStrokeMask, {}), (SoftEdges, {}), (SegformerSeg, {"tiny": True}),
                                    (UperNetSeg, {"tiny": True}), (DPTDepth, {"tiny": True}),
                                    (Mask2FormerSeg, {"tiny": True})])
def test_condition_rewards_are_differentiable(cls, kw):
    r = cls(**kw)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g).requires_grad_(True)
    real = torch.rand(2, 3, 16, 16, generator=g)
    cond = r.condition_from_image(real)
    assert cond.shape == (2, 3, 16, 16) and 0 <= cond.min() and cond.max() <= 1
    score = r(x, condition=cond)
    assert score.shape == (2,) and r.differentiable
    score.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in r.parameters())


def test_canny_is_marked_non_differentiable():
    r = CannyEdges()
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    assert not r.differentiable and not r.predict(x).requires_grad
    assert CannyEdges(soft=True).predict(x).requires_grad


def test_stroke_mask_reward_prefers_the_matching_image():
    from genalign.data.digits import load_digits_split

    x, _ = load_digits_split("test")
    r = DigitStrokeMask()
    cond = r.condition_from_image(x[:8])
    assert set(cond.unique().tolist()) <= {0.0, 1.0}
    good, bad = r(x[:8], condition=cond), r(x[8:16], condition=cond)
    assert (good > bad).all()


def test_soft_edges_hand_case():
    img = torch.zeros(1, 3, 5, 5)
    img[..., 2:] = 1.0  # vertical step: Sobel x = (1+2+1)/8 = 0.5 on the two columns around the step
    e = SoftEdges(scale=0.1).predict(img)[0, 0]
    assert torch.allclose(e[2, 1], 1 - torch.exp(torch.tensor(-5.0)), atol=1e-5)
    assert e[2, 0] < 1e-3 and e[2, 4] < 1e-3


def test_labels_from_palette_shift_and_ignore():
    pal = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 0, 0]])  # rows 1 and 3 share a colour
    cond = torch.tensor([[0, 0, 0], [250, 5, 0], [0, 250, 0]], dtype=torch.float32).t().reshape(1, 3, 1, 3) / 255
    assert labels_from_palette(cond, pal).tolist() == [[[255, 0, 1]]]  # row 0 → ignore; tie → first row


def test_align_resizes_like_the_official_code():
    seg = SegformerSeg(tiny=True)
    logits = torch.randn(2, 5, 4, 4)
    labels = torch.arange(4).repeat_interleave(4).view(1, 8, 2).expand(2, 8, 2).reshape(2, 4, 4).repeat(1, 2, 2)
    p, t = seg.align(logits, labels)
    assert t.shape == (2, 4, 4) and t.dtype == torch.long
    d = DPTDepth(tiny=True)
    pred = torch.rand(2, 4, 4) + 0.1
    p, t = d.align(pred, torch.rand(2, 8, 8))
    assert p.shape == (2, 8, 8) and torch.allclose(p.flatten(1).amax(1), torch.ones(2))


# -- evaluation helpers -----------------------------------------------------------------------------------------
def test_evaluation_metrics_hand_cases():
    from genalign.evaluation.condition import depth_rmse, edge_f1, mask_iou, mean_iou, ssim

    pred = torch.tensor([[[0, 0], [1, 1]]])
    tgt = torch.tensor([[[0, 1], [1, 255]]])
    r = mean_iou(pred, tgt, 2)
    # class 0: inter 1, union 2 → 0.5; class 1: inter 1, union 2 → 0.5 (pixel with 255 ignored)
    assert r["iou"] == [0.5, 0.5] and r["miou"] == 0.5 and abs(r["pixel_accuracy"] - 2 / 3) < 1e-9
    assert mean_iou(pred, tgt, 3)["miou"] == 0.5  # absent class: nan, excluded
    m = mask_iou(torch.tensor([[[1, 1], [0, 0]]]), torch.tensor([[[1, 0], [0, 0]]]))
    assert m.tolist() == [0.5]
    assert mask_iou(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)).tolist() == [1.0]
    d = torch.rand(2, 6, 6) + 0.1
    assert depth_rmse(3 * d, d).abs().max() < 1e-4  # max-normalised: scale invariant
    a = torch.tensor([[[1.0, 0.5]]])
    b = torch.tensor([[[1.0, 1.0]]])
    assert torch.allclose(depth_rmse(a, b), torch.tensor([255 * 0.5 / 2 ** 0.5], dtype=torch.float64))
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert (ssim(x, 1 - x) < 0.5).all()
    f = edge_f1(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(f, torch.tensor([2 / 3], dtype=torch.float64))


def test_score_condition_dataset(tmp_path):
    from PIL import Image

    from genalign.data.digits import load_digits_split
    from genalign.evaluation.condition import score_condition_dataset

    x, _ = load_digits_split("test")
    mask = DigitStrokeMask().condition_from_image(x[:4])
    rows = []
    for i in range(4):
        gen = x[(i + 1) % 4] if i == 3 else x[i]  # the last one is wrong
        # truncation keeps grey 0.5 below the mask threshold
        Image.fromarray((gen.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / f"g{i}.png")
        Image.fromarray((mask[i].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / f"c{i}.png")
        rows.append({"file_name": f"g{i}.png", "condition": f"c{i}.png", "prompt": "a digit"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = score_condition_dataset(tmp_path, "digit_stroke_mask", metric="mask_iou")
    assert res["n"] == 4 and res["per_image"][:3] == [1.0, 1.0, 1.0] and res["per_image"][3] < 1
    assert score_condition_dataset(tmp_path, "digit_stroke_mask")["metric"] == "miou"


# -- objectives ---------------------------------------------------------------------------------------------------
def _objective(cls, **kw):
    model = ControlNetAdapter(tiny_sd_pipeline())
    obj = cls(cls.Config(reward="digit_stroke_mask", **kw), model)
    return obj, model


def _batch(model, reward, b=4, seed=0):
    from genalign.data.digits import load_digits_split

    x, _ = load_digits_split("train")
    x = x[seed * b:(seed + 1) * b]
    conds = reward.condition_from_image(x)
    data = ConditionData(model, x, [f"a handwritten digit {i}" for i in range(b)], conds, reward)
    return data.batch(torch.arange(b))


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.controlnet.named_parameters()}


def test_reward_term_gradient_reaches_the_controlnet():
    torch.manual_seed(0)
    obj, model = _objective(CtrlU, t_max=999, lambda_ramp_steps=None, grad_scale=1.0, u_scale=1.0)
    batch = _batch(model, obj.reward)
    out = obj.loss(batch, torch.Generator().manual_seed(1))
    out.loss.backward()
    with_reward = _grads(model)
    model.controlnet.zero_grad(set_to_none=True)
    obj.config.grad_scale = 0.0
    obj.loss(batch, torch.Generator().manual_seed(1)).loss.backward()
    without = _grads(model)
    diff = sum((with_reward[n] - without[n]).abs().sum() for n in with_reward)
    assert out.metrics["reward_loss"] > 0 and diff > 1e-6
    assert out.metrics["num_gated"] == 4


def test_u_scale_zero_ctrl_u_reward_equals_controlnet_pp():
    # Segmentation: U = u_scale·KL = 0 ⇒ weights 1, reg 0, so Ctrl-U's reward on the primary rows is exactly the
    # ControlNet++ reward of the same samples (same noise, same t): card §8 test 1, through the whole pipeline.
    kw = dict(t_max=999, lambda_ramp_steps=None)
    cu, model = _objective(CtrlU, u_scale=0.0, **kw)
    pp = ControlNetPP(ControlNetPP.Config(reward="digit_stroke_mask", **kw), model)
    batch = _batch(model, cu.reward)
    a = cu.loss(batch, torch.Generator().manual_seed(3)).metrics
    b = pp.loss(batch, torch.Generator().manual_seed(3)).metrics
    assert a["reg_loss"] == 0.0
    assert abs(a["reward_loss"] - b["reward_loss"]) < 1e-6
    c = cu.__class__(cu.Config(reward="digit_stroke_mask", u_scale=1.0, **kw), model).loss(
        batch, torch.Generator().manual_seed(3)).metrics
    assert c["reward_loss"] <= a["reward_loss"] + 1e-7  # exp(−U) ≤ 1 down-weights


def test_pairing_shares_noise_and_uses_t_plus_one(monkeypatch):
    obj, model = _objective(CtrlU, t_max=999)
    batch = _batch(model, obj.reward)
    seen = {}
    orig = model.predict

    def spy(x_t, t, cond, unet=None):
        seen.update(x_t=x_t.detach(), t=t.clone(), cond=cond)
        return orig(x_t, t, cond)

    monkeypatch.setattr(model, "predict", spy)
    obj.loss(batch, torch.Generator().manual_seed(0))
    t, B = seen["t"], 4
    assert seen["x_t"].shape[0] == 2 * B
    assert torch.equal(t[B:], (t[:B] + 1).clamp(max=999))
    ac = model.noise_scheduler.alphas_cumprod
    z0 = batch["latents"]
    eps = [(seen["x_t"][i] - ac[t[i]].sqrt() * z0[i % B]) / (1 - ac[t[i]]).sqrt() for i in range(2 * B)]
    for b in range(B):
        assert torch.allclose(eps[b], eps[B + b], atol=1e-4)
    assert torch.equal(seen["cond"]["controlnet_cond"][:B], seen["cond"]["controlnet_cond"][B:])


def test_gating_only_decoded_rows_is_exact_and_empty_gate_is_zero():
    obj, model = _objective(CtrlU, t_max=500, lambda_ramp_steps=None)
    batch = _batch(model, obj.reward, b=8)
    a = obj.loss(batch, torch.Generator().manual_seed(4))
    obj.config.gate_rows = False
    b = obj.loss(batch, torch.Generator().manual_seed(4))
    assert 0 < a.metrics["num_gated"] < 8
    assert torch.allclose(a.loss, b.loss, atol=1e-6)
    obj.config.t_min, obj.config.t_max = 1000, 1000  # nothing can be gated
    c = obj.loss(batch, torch.Generator().manual_seed(4))
    assert c.metrics["reward_loss"] == 0.0 and torch.allclose(c.loss, torch.tensor(c.metrics["diff_loss"]))


def test_lambda_ramp_follows_optimizer_steps():
    # λ(s) uses s = completed optimizer steps, reported by the trainer through on_step_end (2 micro-batches a step)
    obj, model = _objective(CtrlU, lambda_ramp_steps=4, grad_scale=2.0, t_max=999)
    batch = _batch(model, obj.reward, b=2)
    lams = []
    for i in range(6):
        lams.append(obj.loss(batch, torch.Generator().manual_seed(i)).metrics["lambda"])
        if i % 2 == 1:
            assert obj.on_step_end(i // 2 + 1).reset_optimizer_state is False
    assert lams == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    obj.load_state_dict({"step": 5})
    assert obj.step == 5 and obj.state_dict() == {"step": 5}


def test_ctrl_u_step_is_not_a_call_count():
    # Fails on the old call-count rule: micro-batches (or extra loss calls) without an optimizer step leave λ alone.
    obj, model = _objective(CtrlU, lambda_ramp_steps=4, grad_scale=2.0, t_max=999)
    batch = _batch(model, obj.reward, b=2)
    lams = [obj.loss(batch, torch.Generator().manual_seed(i)).metrics["lambda"] for i in range(5)]
    assert lams == [0.0] * 5 and obj.step == 0
    obj.on_step_end(2)
    assert obj.loss(batch, torch.Generator().manual_seed(9)).metrics["lambda"] == 1.0


def test_sft_baseline_has_no_reward_term():
    obj, model = _objective(ControlNetSFT)
    out = obj.loss(_batch(model, obj.reward), torch.Generator().manual_seed(0))
    assert set(out.metrics) == {"diff_loss"} and torch.allclose(out.loss, torch.tensor(out.metrics["diff_loss"]))
    with pytest.raises(ValueError, match="pipeline.name: controlnet"):
        from genalign.pipelines.sd import SDAdapter
        from genalign.config import LoraConfig

        ControlNetSFT(ControlNetSFT.Config(), SDAdapter(tiny_sd_pipeline(), lora=LoraConfig()))


def test_validation_conditions_match_the_prompted_digit():
    obj, _ = _objective(ControlNetSFT)
    conds = obj.validation_conditions(["a handwritten three", "a drawing of the digit 0"])
    from genalign.data.images import load_image_data

    test = load_image_data("digits:test", 8)
    masks = DigitStrokeMask().condition_from_image(test.images)
    for c, d in zip(conds, (3, 0)):
        assert any(torch.equal(c, masks[i]) for i in (test.labels == d).nonzero()[:, 0].tolist())


# -- trainer end to end ---------------------------------------------------------------------------------------------
def test_ctrl_u_trains_only_the_controlnet_and_exports(tmp_path):
    from diffusers import ControlNetModel, DiffusionPipeline

    from genalign.config import load_config
    from genalign.training.trainer import train

    cfg = load_config(ROOT / "configs" / "ctrl_u_digits.yaml", [
        "pipeline.model=tiny:sd", "train.steps=3", "train.batch_size=4", "train.learning_rate=0.01",
        "train.warmup_steps=0", "data.source.max_images=16", "validation.samples_per_prompt=1",
        "validation.max_prompts=1", "validation.num_inference_steps=2", "objective.t_max=999",
        "objective.lambda_ramp_steps=null", "train.log_every=1"])
    s = train(cfg, tmp_path / "run", progress=False)
    assert s["steps"] == 3 and all("reward_loss" in h for h in s["history"] if "loss" in h)
    exp = tmp_path / "run" / "export"
    base = tiny_sd_pipeline()
    pipe = DiffusionPipeline.from_pretrained(exp)
    for name in ("unet", "vae", "text_encoder"):
        ref = getattr(base, name).state_dict()
        for k, v in getattr(pipe, name).state_dict().items():
            assert torch.equal(v, ref[k]), (name, k)
    cn = ControlNetModel.from_pretrained(exp / "controlnet")
    assert cn.controlnet_mid_block.weight.abs().max() > 0  # trained away from the zero init
    from genalign.training.checkpoint import export_checkpoint

    re = ControlNetModel.from_pretrained(export_checkpoint(tmp_path / "run", tmp_path / "re") / "controlnet")
    for k, v in re.state_dict().items():  # re-export from the checkpoint = the trained ControlNet
        assert torch.equal(v, cn.state_dict()[k]), k
    for cfg_name in ("controlnet_pp_digits.yaml", "controlnet_sft_digits.yaml", "ctrl_u_ade20k_seg.yaml",
                     "ctrl_u_depth.yaml"):
        load_config(ROOT / "configs" / cfg_name)


def test_folder_dataset_with_condition_images(tmp_path):
    # (image, condition, caption) rows from a folder with metadata.jsonl; condition: dataset reads the files
    from PIL import Image

    from genalign.config import load_config
    from genalign.objectives.base import TrainContext

    rows = []
    for i in range(3):
        img = torch.zeros(8, 8, 3, dtype=torch.uint8)
        img[:, i:i + 3] = 255
        Image.fromarray(img.numpy()).save(tmp_path / f"i{i}.png")
        Image.fromarray(img.numpy()).save(tmp_path / f"c{i}.png")
        rows.append({"file_name": f"i{i}.png", "condition": f"c{i}.png", "prompt": f"a handwritten digit {i}"})
    (tmp_path / "bad.png").write_text("not an image")
    rows.append({"file_name": "bad.png", "condition": "c0.png", "prompt": "x"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["pipeline.name=controlnet", "pipeline.model=tiny:sd", "pipeline.lora=null",
                             "objective.name=ctrl_u", "objective.condition=dataset", "data.source.kind=images",
                             f"data.source.source={tmp_path}", "data.source.condition_column=condition"])
    obj, model = _objective(CtrlU, condition="dataset")
    data = obj.build_data(TrainContext(cfg, model, None, tmp_path, None))
    assert data.n == 3 and data.skipped["unreadable_images"] == 1
    b = data.batch(torch.tensor([1]))
    # row 1 has ink in columns 1..3: the stroke-mask labels of its condition
    assert torch.equal(b["target"][0].bool(), ((torch.arange(8) >= 1) & (torch.arange(8) < 4)).expand(8, 8))
    assert b["cond"]["controlnet_cond"].shape == (1, 3, 8, 8) and b["latents"].shape == (1, 4, 8, 8)
