"""RRPO on LLaVA-Video fidelity (issue 14 items 1–6) and the recipe running 2 steps on a tiny Qwen2-VL with 16
frames at its own max_length (model swapped by --set)."""

import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from genalign.data.video import VideoPreferenceCollator, load_video_frames, sample_frame_indices  # noqa: E402
from genalign.pipelines.language import build_char_tokenizer, build_tiny_llama, build_tiny_qwen2_vl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _frames(path, n, size=32, seed=0):
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        img = np.full((size, size, 3), i, dtype=np.uint8)  # frame i has pixel value i (readable index)
        img[0, 0] = rng.randint(0, 255, 3)
        Image.fromarray(img).save(os.path.join(path, f"{i:04d}.png"))
    return str(path)


def _row(video, **kw):
    row = {"prompt": "<video>\nwhat is shown?", "video": video, "chosen": "a red cat", "rejected": "a big cat",
           "chosen_masked": "a <MASK>red</MASK> cat", "rejected_masked": "a <MASK>big</MASK> cat"}
    row.update(kw)
    return row


# ------------------------------------------------------------------------------------------ item 5
def test_official_frame_sampling_is_the_default_and_linspace_an_option(tmp_path):
    official = sample_frame_indices(100, 16)
    assert official == [int(i * 100 / 16) for i in range(16)] == [0, 6, 12, 18, 25, 31, 37, 43, 50, 56, 62, 68, 75,
                                                                    81, 87, 93]
    linspace = sample_frame_indices(100, 16, "linspace")
    assert sum(a != b for a, b in zip(official, linspace)) == 14  # the count
    d = _frames(tmp_path / "v", 10)
    assert load_video_frames(d, 4)[:, 1, 1, 0].tolist() == [0, 2, 5, 7]  # int(i·10/4)
    assert load_video_frames(d, 4, sampling="linspace")[:, 1, 1, 0].tolist() == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="frame sampling"):
        sample_frame_indices(10, 4, "random")


# ------------------------------------------------------------------------------------------ item 1
def test_video_tokens_are_counted_and_never_cut_error_names_the_row(tmp_path):
    _, proc = build_tiny_qwen2_vl(frame_size=112)  # (112/14)²/4 = 16 merged tokens per 2 frames
    rows = [_row(_frames(tmp_path / "v", 16), row_id=7)]
    coll = VideoPreferenceCollator(proc, num_frames=16, segment_mode="tags", fused_space_tags=False)
    batch = coll(rows)
    video_id = proc.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((batch["input_ids"][0] == video_id).sum()) == 8 * 16  # 16 frames → 8 temporal groups × 16
    assert coll.counts["max_video_tokens"] == 8 * 16 + 2  # + <|vision_start|>, <|vision_end|>
    short = VideoPreferenceCollator(proc, num_frames=16, max_length=100, segment_mode="tags",
                                    fused_space_tags=False)
    with pytest.raises(ValueError, match=r"row 7: .*video.*max_length is 100"):
        short(rows)
    # a max_length that fits the prompt truncates only the completion
    n_prompt = int((batch["completion_mask"][0] == 0).sum())
    fit = VideoPreferenceCollator(proc, num_frames=16, max_length=n_prompt + 4, segment_mode="tags",
                                  fused_space_tags=False)
    b2 = fit(rows)
    assert b2["input_ids"].shape[1] == n_prompt + 4
    assert torch.equal(b2["input_ids"][0, :n_prompt], batch["input_ids"][0, :n_prompt])


# ------------------------------------------------------------------------------------------ item 2
def test_chat_template_is_applied_by_default_for_chat_models(tmp_path):
    _, proc = build_tiny_qwen2_vl()
    rows = [_row(_frames(tmp_path / "v", 4))]
    batch = VideoPreferenceCollator(proc, num_frames=4, segment_mode="tags", fused_space_tags=False)(rows)
    text = proc.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|>")
    assert text.endswith("<|vision_end|>what is shown?<|im_end|>\n<|im_start|>assistant\na red cat</s>")
    plain = VideoPreferenceCollator(proc, num_frames=4, chat_template="off", segment_mode="tags",
                                    fused_space_tags=False)(rows)
    assert "<|im_start|>" not in proc.tokenizer.decode(plain["input_ids"][0])
    _, no_tpl = build_tiny_qwen2_vl(chat_template=False)  # auto: a processor without template → plain prompt
    assert not VideoPreferenceCollator(no_tpl).use_chat_template


# ------------------------------------------------------------------------------------------ item 3
def test_video_rows_whose_phrase_is_truncated_are_dropped_and_counted(tmp_path):
    _, proc = build_tiny_qwen2_vl()
    d = _frames(tmp_path / "v", 4)
    rows = [_row(d, row_id=0),
            _row(d, row_id=1, chosen="a cat that is red", rejected="a cat that is big",
                 chosen_masked="a cat that is <MASK>red</MASK>", rejected_masked="a cat that is <MASK>big</MASK>")]
    full = VideoPreferenceCollator(proc, num_frames=4, segment_mode="tags", fused_space_tags=False)(rows[:1])
    n_prompt = int((full["completion_mask"][0] == 0).sum())
    coll = VideoPreferenceCollator(proc, num_frames=4, max_length=n_prompt + 6, segment_mode="tags",
                                   fused_space_tags=False)
    batch = coll(rows)  # row 1's phrase starts at completion token 14: cut off
    assert coll.counts["no_phrase_after_truncation"] == 1
    assert batch["input_ids"].shape[0] == 2 and batch["video_grid_thw"].shape[0] == 2
    assert int((batch["segment_ids"][0] > 0).sum()) == 3


def test_text_rrpo_pairs_cut_by_truncation_are_left_out_of_the_loss(tmp_path):
    from trl import DPOConfig

    from genalign.objectives.rrpo import RRPO
    from genalign.pipelines.language import lora_config
    from genalign.training.lm import PreferenceTrainer

    tok = build_char_tokenizer()
    rows = [{"prompt": "12+34=", "chosen": "46", "rejected": "47"},  # phrase at completion token 1: cut
            {"prompt": "12+3=", "chosen": "15", "rejected": "25"}]  # phrase at completion token 0: kept
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, max_length=7)
    obj = RRPO.from_params(segments="diff", kl_chunk_size=4)
    tr = PreferenceTrainer(build_tiny_llama(tok), args=args, objective=obj, train_dataset=Dataset.from_list(rows),
                           processing_class=tok, peft_config=lora_config(r=4, alpha=8))
    tr.train()  # the old code raised "RRPO pairs [0] have no differing phrase" here
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # only the kept pair contributes
    assert obj.counts["dropped_after_truncation"] == 2  # one pair per step


# ------------------------------------------------------------------------------------------ item 6
def test_objective_tags_reach_the_video_collator(tmp_path):
    from genalign.objectives.rrpo import RRPO

    _, proc = build_tiny_qwen2_vl()
    obj = RRPO.from_params(tag_open="<HL>", tag_close="</HL>", fused_space_tags=False, segments="tags")
    coll = VideoPreferenceCollator(proc, num_frames=4, **obj.collator_options())
    rows = [_row(_frames(tmp_path / "v", 4), chosen_masked="a <HL>red</HL> cat", rejected_masked="a <HL>big</HL> cat")]
    batch = coll(rows)
    assert coll.counts["tags/ok"] == 2 and int((batch["segment_ids"][0] > 0).sum()) == 3


# ------------------------------------------------------------------------------------------ acceptance
def test_rrpo_llava_video_recipe_runs_two_steps_on_tiny_qwen2_vl_with_16_frames(tmp_path):
    from genalign.cli import main

    lines = []
    for i in range(2):  # official schema: question / answer / pred / *_masked / media_path
        lines.append({"question": "<video>\nwhat is shown?", "media_path": f"v{i}", "answer": "a red cat",
                      "pred": "a big cat", "answer_masked": "a <MASK>red</MASK> cat",
                      "pred_masked": "a <MASK>big</MASK> cat"})
        _frames(tmp_path / "videos" / f"v{i}", 20, seed=i)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "run"
    sets = ["pipeline.model=tiny", "pipeline.tiny={frame_size: 392, hidden_size: 64}",
            f"data.train={tmp_path / 'train.jsonl'}", f"data.video_root={tmp_path / 'videos'}",
            "train.steps=2", "train.gradient_accumulation_steps=1", "train.log_every=1", "train.mixed_precision=no",
            "objective.fused_space_tags=false"]  # the char tokenizer has no fused-space tag variants
    assert main(["train", os.path.join(ROOT, "configs", "rrpo_llava_video.yaml"), "-o", str(out), "--quiet",
                 *[x for s in sets for x in ("--set", s)]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])
    cfg = (out / "config.yaml").read_text()
    assert "max_length: 8192" in cfg and "num_frames: 16" in cfg
    assert summary["counts"]["max_video_tokens"] == 8 * 196 + 2  # 16 frames at 392²: 8 groups × 14² tokens
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
