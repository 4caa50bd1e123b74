"""Tiny-model integration tests: trainers (3 steps, loss decreases), collation alignment, token rewards, adapter-off
reference, offline loading errors, video collator + RRPO on a tiny Qwen2-VL, run_lm_training from the tiny configs."""

import copy
import math
import os

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset

pytest.importorskip("trl")

from trl import DPOConfig  # noqa: E402

from genalign.pipelines.language import (  # noqa: E402
    ModelUnavailableError,
    apply_lora,
    build_char_tokenizer,
    build_tiny_llama,
    load_language_model,
    lora_config,
    reference_mode,
)
from genalign.config import ConfigError, load_config  # noqa: E402
from genalign.objectives.rpo import DPO, FDPO, RPO  # noqa: E402
from genalign.objectives.rrpo import RRPO  # noqa: E402
from genalign.objectives.treg import TREG, compute_token_rewards  # noqa: E402
from genalign.pipelines.language import tokenize_like_trl  # noqa: E402
from genalign.training.lm import (  # noqa: E402
    PreferenceTrainer,
    TokenFieldCollator,
    make_arithmetic_preference_rows,
    train_lm,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(extra_special_tokens=["<MASK>", "</MASK>"])


def _args(tmp_path, steps=3, lr=1e-2, **kw):
    return DPOConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
                     logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=False,
                     use_cpu=True, lr_scheduler_type="constant", bf16=False, **kw)


CASES = [
    ("dpo", DPO, {}),
    ("rpo", RPO, {"rpo_alpha": 0.5, "sft_reduction": "mean"}),
    ("fdpo", FDPO, {"f_divergence": "js_divergence"}),
    ("treg", TREG, {"alpha": 0.5}),
    ("rrpo", RRPO, {"fused_space_tags": False}),
]


@pytest.mark.parametrize("loss_type,cls,extra", CASES, ids=[c[0] for c in CASES])
def test_three_steps_loss_decreases(tmp_path, tok, loss_type, cls, extra):
    rows = make_arithmetic_preference_rows(4, seed=0, tagged=True)
    model = build_tiny_llama(tok)
    ds = Dataset.from_list(rows)
    if loss_type == "treg":
        ds = compute_token_rewards(model, tok, ds, better_template="good: {prompt}", worse_template="bad: {prompt}")
    obj = cls.from_params(beta=0.5, **extra)
    tr = PreferenceTrainer(model, args=_args(tmp_path), objective=obj, train_dataset=ds, processing_class=tok,
                           peft_config=lora_config(r=8, alpha=16))
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 3
    assert losses[-1] < losses[0], losses
    if loss_type in ("dpo", "fdpo", "rrpo"):  # adapter-off reference ≡ policy at step 0
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    hist = tr.state.log_history[0]
    assert "rewards/accuracies" in hist and "implicit_acc" in hist
    if loss_type == "rrpo":
        assert hist["kl"] == pytest.approx(0.0, abs=1e-6)
        assert tr.state.log_history[1]["kl"] > 0
        assert tr.genalign_counts["train/segments/chosen/ok"] == 4


def test_loss_type_validation(tmp_path, tok):
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        load_config(os.path.join(ROOT, "configs", "rrpo_tiny.yaml"), ["objective.name=ipo"])
    with pytest.raises(ValueError):
        RRPO.from_params(beta=-1.0)
    from genalign.objectives.dpo import DiffusionDPO

    with pytest.raises(TypeError, match="language-model objective"):
        PreferenceTrainer(build_tiny_llama(tok), args=_args(tmp_path), objective=DiffusionDPO.Config(),
                          train_dataset=Dataset.from_list(make_arithmetic_preference_rows(2)), processing_class=tok)
    assert TREG.Config().alpha == 0.25
    assert RRPO.Config().alpha == 0.01


def test_token_field_collation_alignment(tok):
    coll = TokenFieldCollator(pad_token_id=0, token_fields={"token_rewards": ("cr", "rr", 0.0)})
    ex = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10], "cr": [0.1, 0.2], "rr": [0.3]},
        {"prompt_ids": [5], "chosen_ids": [8, 9, 11], "rejected_ids": [12, 13], "cr": [0.4, 0.5, 0.6],
         "rr": [-0.1, -0.2]},
    ]
    b = coll(ex)
    tr = b["token_rewards"]
    assert tr.shape == b["input_ids"].shape == (4, 5)
    # values sit exactly on completion positions
    assert torch.equal(tr != 0, b["completion_mask"].bool())
    assert tr[0].tolist() == pytest.approx([0, 0, 0, 0.1, 0.2])
    assert tr[3].tolist() == pytest.approx([0, -0.1, -0.2, 0, 0])
    # after the trainer's shift, reward t is aligned with the log-prob of completion token t
    shifted, mask = tr[:, 1:], b["completion_mask"][:, 1:]
    assert torch.equal(shifted != 0, mask.bool())
    bad = copy.deepcopy(ex)
    bad[1]["cr"] = [0.4, 0.5]  # misaligned row
    with pytest.raises(ValueError, match="row 1"):
        coll(bad)


def test_treg_trainer_rejects_misaligned_rewards(tmp_path, tok):
    rows = make_arithmetic_preference_rows(2, seed=3)
    ds = compute_token_rewards(build_tiny_llama(tok), tok, Dataset.from_list(rows), "good: {prompt}", "bad: {prompt}")
    cr = list(ds["chosen_token_rewards"])
    cr[1] = cr[1][:-1]
    ds = ds.remove_columns(["chosen_token_rewards", "chosen_token_reward_ids"]).add_column("chosen_token_rewards", cr)
    with pytest.raises(ValueError, match="row 1"):
        PreferenceTrainer(build_tiny_llama(tok), args=_args(tmp_path), objective=TREG(), train_dataset=ds,
                          processing_class=tok)


def test_compute_token_rewards_matches_manual(tok):
    model = build_tiny_llama(tok, seed=1)
    row = {"prompt": "12+7=", "chosen": "19", "rejected": "18"}
    ds = compute_token_rewards(model, tok, [row], "good: {prompt}", "bad: {prompt}", batch_size=1)
    ids = tokenize_like_trl(tok, row)
    assert ds[0]["chosen_token_reward_ids"] == ids["chosen_ids"]
    assert len(ds[0]["chosen_token_rewards"]) == len(ids["chosen_ids"]) == 3  # "1", "9", "</s>"
    with torch.no_grad():
        lps = []
        for ctx in ("good: 12+7=", "bad: 12+7="):
            c = tok(ctx)["input_ids"]
            x = torch.tensor([c + ids["chosen_ids"]])
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]
            lps.append(lp[len(c) - 1:])
    manual = torch.sigmoid(lps[0] - lps[1]) - 0.5
    assert torch.allclose(torch.tensor(ds[0]["chosen_token_rewards"]), manual, atol=1e-6)
    assert all(-0.5 < r < 0.5 for r in ds[0]["rejected_token_rewards"])


def test_rrpo_hidden_path_logps_match_trl_fused_head(tmp_path, tok):
    from genalign.objectives.rrpo import token_logps_chunked
    from genalign.pipelines.lm_head import lm_head_params as _lm_head

    rows = make_arithmetic_preference_rows(4, seed=0)
    tr = PreferenceTrainer(build_tiny_llama(tok), args=_args(tmp_path), objective=RRPO(),
                           train_dataset=Dataset.from_list(rows), processing_class=tok,
                           peft_config=lora_config(r=4, alpha=8))
    batch = next(iter(tr.get_train_dataloader()))
    kw = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        fused = tr.model(**kw, labels=labels, fused_lm_head=True).log_probs
        h = tr.model(**kw, return_last_hidden_state=True).last_hidden_state[:, :-1]
        w, b = _lm_head(tr.model)
        ours = token_logps_chunked(h, w, batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:].bool(), 3, b)
    assert torch.allclose(fused, ours, atol=1e-5)


def test_adapter_disabled_reference_equals_base(tok):
    base = build_tiny_llama(tok, seed=2).eval()
    ref_copy = copy.deepcopy(base)
    peft_model = apply_lora(base, lora_config(r=4, alpha=8))
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # make the adapter change the output
    x = torch.tensor([tok("12+34=46")["input_ids"]])
    with torch.no_grad():
        expected = ref_copy(input_ids=x).logits
        adapted = peft_model(input_ids=x).logits
    peft_model.train()
    with reference_mode(peft_model) as m:
        ref = m(input_ids=x).logits
        assert not torch.is_grad_enabled()
    assert peft_model.training  # restored
    assert torch.equal(ref, expected)
    assert not torch.allclose(adapted, expected)


def test_offline_hub_id_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="local path"):
        load_language_model("genalign-nonexistent/tiny-model-xyz")


def test_local_dir_roundtrip(tmp_path, tok):
    model = build_tiny_llama(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    b = load_language_model(str(tmp_path))
    x = torch.tensor([tok("1+1=2")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(b.model(input_ids=x).logits, model(input_ids=x).logits)


# ------------------------------------------------------------------------------------------------ video
def _frame_folder(path, n, seed, size=56):
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(path, f"{i:04d}.png"))
    return str(path)


def test_frame_sampling_and_loading(tmp_path):
    from genalign.data.video import VideoReadError, load_video_frames, sample_frame_indices

    assert sample_frame_indices(10, 4, "linspace") == [0, 3, 6, 9]
    assert sample_frame_indices(3, 5, "linspace") == [0, 0, 1, 1, 2]
    d = _frame_folder(tmp_path / "v", 7, 0)
    f = load_video_frames(d, 4)
    assert f.shape == (4, 56, 56, 3) and f.dtype == np.uint8
    with pytest.raises(VideoReadError):
        load_video_frames(str(tmp_path / "missing.mp4"), 4)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoReadError):
        load_video_frames(str(tmp_path / "broken.mp4"), 4)


def test_video_collator_and_rrpo_on_tiny_qwen2_vl(tmp_path):
    from genalign.data.video import VideoPreferenceCollator, filter_readable, read_preference_jsonl
    from genalign.pipelines.language import build_tiny_qwen2_vl

    import json

    lines = []
    for i in range(3):
        d = _frame_folder(tmp_path / f"v{i}", 5, i)
        lines.append({"question": "<video>\nwhat is shown?", "media_path": d, "answer": "a red cat",
                      "pred": "a big cat", "answer_masked": "a <MASK>red</MASK> cat",
                      "pred_masked": "a <MASK>big</MASK> cat"})
    lines.append({"prompt": "?", "video": str(tmp_path / "gone"), "chosen": "x", "rejected": "y"})
    p = tmp_path / "prefs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in lines))
    rows = read_preference_jsonl(str(p))
    assert rows[0]["prompt"].startswith("<video>") and rows[0]["chosen"] == "a red cat"
    kept, bad = filter_readable(rows, 4)
    assert bad == 1 and len(kept) == 3

    model, proc = build_tiny_qwen2_vl()
    coll = VideoPreferenceCollator(proc, num_frames=4, segment_mode="tags", fused_space_tags=False)
    batch = coll(rows)  # the unreadable row is skipped and counted
    assert coll.counts["unreadable_videos"] == 1 and coll.counts["tags/ok"] == 6
    B = 3
    assert batch["input_ids"].shape[0] == 2 * B and batch["video_grid_thw"].shape[0] == 2 * B
    # segment ids on completion positions only; chosen "red" = 3 phrase tokens
    assert torch.all(batch["segment_ids"][batch["completion_mask"] == 0] == 0)
    assert int((batch["segment_ids"][0] > 0).sum()) == 3
    # both halves of a pair see identical video inputs
    assert torch.equal(batch["video_grid_thw"][:B], batch["video_grid_thw"][B:])

    tr = PreferenceTrainer(model, args=_args(tmp_path, steps=2), objective=RRPO(),
                           data_collator=coll, train_dataset=Dataset.from_list(kept), processing_class=proc,
                           peft_config=lora_config(r=4, alpha=8, kind="video"))
    assert not any("visual" in n for n, p in tr.model.named_parameters() if p.requires_grad)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] < losses[0]


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["rrpo_tiny", "treg_tiny"])
def test_run_lm_training_from_tiny_config(tmp_path, name):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"),
                      ["train.steps=3", "data.synthetic.n_train=8", "data.synthetic.n_eval=4"])
    summary = train_lm(cfg, str(tmp_path))
    assert summary["global_step"] == 3
    assert summary["objective"] == cfg.objective.name == name.split("_")[0]
    assert math.isfinite(summary["last_loss"]) and "eval" in summary
    import json

    json.dumps({k: v for k, v in summary.items()}, default=str)


def test_rrpo_full_finetune_with_frozen_copy_reference(tmp_path):
    # full fine-tune: the reference is a frozen deep copy
    cfg = load_config(os.path.join(ROOT, "configs", "rrpo_tiny.yaml"),
                      ["pipeline.lora=null", "pipeline.reference=frozen_copy", "train.steps=2",
                       "data.synthetic.n_train=8", "data.synthetic.n_eval=0"])
    summary = train_lm(cfg, str(tmp_path))
    hist = [h for h in summary["log_history"] if "loss" in h]
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and hist[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert hist[1]["kl"] > 0


def test_full_configs_parse(tmp_path):
    from genalign.training.lm.runner import dpo_args

    for name in ("rrpo_llava_video", "treg_llama3"):
        cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        assert cfg.objective_params().beta > 0
        assert isinstance(dpo_args(cfg, tmp_path), DPOConfig)  # every train key maps onto a DPOConfig field
    cfg = load_config(os.path.join(ROOT, "configs", "rrpo_llava_video.yaml"))
    assert (cfg.objective_params().alpha, cfg.objective_params().beta) == (0.01, 0.1)
    assert cfg.train.learning_rate == 5e-6 and cfg.data.num_frames == 16
    assert (cfg.pipeline.lora.rank, cfg.pipeline.lora.alpha) == (128, 256)


def test_dpo_objective_equals_trl_dpo_loss_and_gradients(tmp_path, tok):
    """genalign's DPO through PreferenceTrainer (reference forward first) gives TRL 1.16 DPOTrainer's sigmoid loss
    and LoRA gradients on the same batch (policy forward first in TRL)."""
    from trl import DPOTrainer

    rows = make_arithmetic_preference_rows(4, seed=5)
    torch.manual_seed(0)
    base = build_tiny_llama(tok, seed=3)
    out = {}
    for name in ("trl", "genalign"):
        model = copy.deepcopy(base)
        kw = dict(args=_args(tmp_path / name, steps=1), train_dataset=Dataset.from_list(rows), processing_class=tok,
                  peft_config=lora_config(r=4, alpha=8))
        tr = DPOTrainer(model, **kw) if name == "trl" else PreferenceTrainer(model, objective=DPO(), **kw)
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:  # a non-zero adapter so policy ≠ reference
                torch.manual_seed(len(n))
                p.data.normal_(0, 0.05)
        batch = next(iter(tr.get_train_dataloader()))
        tr.model.train()
        loss = tr.compute_loss(tr.model, batch)
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    (l1, g1), (l2, g2) = out["trl"], out["genalign"]
    assert abs(l1.item() - math.log(2)) > 1e-4  # the adapter moved the policy
    assert torch.allclose(l1, l2, atol=1e-6)
    assert g1.keys() == g2.keys() and all(torch.allclose(g1[k], g2[k], atol=1e-6) for k in g1)
