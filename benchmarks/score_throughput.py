"""Reward-scoring throughput: what batching, text de-duplication and torch preprocessing each buy, one at a time.

Usage::

    python benchmarks/score_throughput.py [--size tiny|small|base] [--images 64] [--prompts 8] [--batch-size 32]
                                          [--resolution 256] [--rounds 10] [--threads 1] [--quick]

The reward is genalign's ``pickscore-v1`` (transformers ``CLIPModel``, ``s = exp(logit_scale)·cos``) loaded from a
local folder holding a CLIP of the chosen size with **random weights** (offline: no hub download; the ratios, not
the absolute speed, are the result; real PickScore is CLIP-H/14, ~30× the ``base`` size):
``tiny``: 2-layer 32-wide towers; ``small``: 4-layer 256-wide towers, patch 32; ``base``: ViT-B/32-sized.

Contenders, all scoring the same ``--images`` images (uint8-quantised RGB, ``--resolution`` square) whose prompts
repeat round-robin over ``--prompts`` distinct prompts; each changes ONE thing from the row above it:

1. ``loop``: the hpsv2 / ImageReward package pattern: per image, the PIL CLIP processor, tokenise its prompt,
   one ``CLIPModel`` forward with both towers (batch size 1). Text work: one prompt per image.
2. ``batched``: batches of ``--batch-size`` images, same PIL preprocessing, the text tower still run once per
   IMAGE (equal text work to ``loop``): pure batching.
3. ``batched+text-once``: as 2, text tower once per DISTINCT prompt of the pass (what genalign's text cache does
   on a cold cache): text de-duplication.
4. ``batched+text-once+torch-pre``: as 3 with genalign's torch preprocessing (PIL-bicubic resize/crop in torch,
   differentiable) instead of the PIL processor: the preprocessing swap. Its scores equal ``reward.score`` on a
   cold cache (checked, printed).

And preprocessing alone (no model), in the same rounds: ``pre-PIL`` (the PIL processor on all images, in batches)
vs ``pre-torch`` (genalign's torch path).

Time: interleaved rounds (order shuffled per round), process CPU time and wall time, median of per-round
ratios [min–max]. Scores: max |diff| against ``loop`` (same preprocessing → float rounding only).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import interleave, load_average, machine_summary, markdown_table, set_threads  # noqa: E402

SCORERS = ("loop", "batched", "batched+text-once", "batched+text-once+torch-pre")
CHANGE = {"loop": "per image, PIL, text per image", "batched": "+ batching (text still per image)",
          "batched+text-once": "+ text once per distinct prompt", "batched+text-once+torch-pre": "+ torch preprocessing"}


def clip_config(size: str):
    """``CLIPConfig`` of the chosen size (random init; ``logit_scale = ln 100`` like PickScore's stored value).

    Raises:
        ValueError: unknown ``size``.
    """
    from transformers import CLIPConfig

    from genalign.rewards.clip import tiny_clip_config

    if size == "tiny":
        return tiny_clip_config()
    if size == "small":
        v = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
        t = dict(v)
        proj = 256
    elif size == "base":
        v = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        t = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        proj = 512
    else:
        raise ValueError(f"--size: unknown size {size!r} (tiny, small, base)")
    return CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, projection_dim=proj, **t),
        vision_config=dict(image_size=224, patch_size=32, projection_dim=proj, **v),
        projection_dim=proj, logit_scale_init_value=math.log(100.0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--quick``: tiny CLIP, 8 images, 2 rounds, for the smoke test)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "small", "base"], default="small")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts (images share them round-robin)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=256, help="side of the square input images")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="tiny CLIP, 8 images, 2 prompts, batch 4, 64px, 2 rounds")
    if ap.parse_known_args(argv)[0].quick:  # quick sizes, unless given explicitly
        ap.set_defaults(size="tiny", images=8, prompts=2, batch_size=4, resolution=64, rounds=2)
    args = ap.parse_args(argv)
    if min(args.images, args.prompts, args.batch_size, args.rounds) < 1 or args.resolution < 8:
        ap.error("--images, --prompts, --batch-size, --rounds ≥ 1 and --resolution ≥ 8")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its tables (Markdown) and return per-contender rates and the step ratios."""
    args = parse_args(argv)
    set_threads(args.threads)

    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel
    from transformers.utils import logging as tlog

    from genalign.rewards.clip import PickScore
    from genalign.rewards.preprocess import quantize_uint8, unwrap_features

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        CLIPModel(clip_config(args.size)).save_pretrained(d)  # random weights, real loading path
        r_tensor = PickScore(weights=d, preprocess="tensor")
        r_pil = PickScore(weights=d, preprocess="reference")
    model, tok, max_len = r_pil.model, r_pil.tokenizer, r_pil.max_length  # the loop's model
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    images = quantize_uint8(torch.rand(args.images, 3, args.resolution, args.resolution, generator=g))
    base_prompts = [f"a photo of object number {k} on a table" for k in range(args.prompts)]
    prompts = [base_prompts[i % args.prompts] for i in range(args.images)]
    n, bs = args.images, args.batch_size
    batches = [(i, min(i + bs, n)) for i in range(0, n, bs)]

    def text_features(reward, ps: list[str]) -> torch.Tensor:
        t = reward.tokenizer(ps, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        feats = reward.model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        return F.normalize(unwrap_features(feats).float(), dim=-1)

    @torch.no_grad()
    def loop() -> torch.Tensor:
        out = []
        for i in range(n):
            pix = r_pil.pixels(images[i:i + 1])
            t = tok([prompts[i]], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            out.append(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pix)
                       .logits_per_image.reshape(-1).float())
        return torch.cat(out)

    def make_batched(reward, text_once: bool):
        @torch.no_grad()
        def run() -> torch.Tensor:
            scale = reward.model.logit_scale.exp().float()
            if text_once:  # cold cache: each distinct prompt of the pass once
                distinct = list(dict.fromkeys(prompts))
                table = dict(zip(distinct, text_features(reward, distinct)))
            out = []
            for a, b in batches:
                txt = torch.stack([table[p] for p in prompts[a:b]]) if text_once else text_features(reward, prompts[a:b])
                out.append(scale * (reward.embed(images[a:b]) * txt).sum(-1))
            return torch.cat(out)
        return run

    def make_pre(reward):
        @torch.no_grad()
        def run() -> torch.Tensor:
            return torch.cat([reward.pixels(images[a:b]) for a, b in batches])
        return run

    contenders = {"loop": loop, "batched": make_batched(r_pil, False), "batched+text-once": make_batched(r_pil, True),
                  "batched+text-once+torch-pre": make_batched(r_tensor, True),
                  "pre-PIL": make_pre(r_pil), "pre-torch": make_pre(r_tensor)}
    scores = {k: contenders[k]() for k in SCORERS}
    api = r_tensor.score(images, prompts)  # fresh reward: its text cache is cold, as in the composed contender 4
    api_diff = (api - scores["batched+text-once+torch-pre"]).abs().max().item()
    load_start = load_average()
    timing = interleave(contenders, baseline="loop", rounds=args.rounds, calls=1, warmup=1)
    load_end = load_average()

    def per_round(num: str, den: str, kind: str = "cpu") -> list[float]:
        a, b = getattr(timing[num], kind), getattr(timing[den], kind)
        return [x / y for x, y in zip(a, b)]  # time ratio num/den = speed-up of den over num

    print(f"reward: pickscore-v1 architecture (transformers CLIPModel), size '{args.size}' with RANDOM weights "
          f"({n_params / 1e6:.1f}M parameters; offline, no real checkpoint)")
    print(f"data: {n} images {args.resolution}x{args.resolution} (uint8-quantised), {args.prompts} distinct prompts "
          f"round-robin, batch size {bs}")
    print(machine_summary(args.threads) + f"; load average 1-min {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"time: {args.rounds} interleaved rounds (order shuffled per round), one pass over all images per contender "
          "per round; speed-ups are medians of per-round ratios [min–max]")
    rows, result = [], {"rates": {}, "speedup_vs_loop": {}, "step_speedup": {}, "max_diff_vs_loop": {}}
    prev = None
    for name in SCORERS:
        t = timing[name]
        vs_loop = per_round("loop", name)
        vs_prev = per_round(prev, name) if prev else [1.0]
        vs_loop_wall = per_round("loop", name, "wall")
        diff = (scores[name] - scores["loop"]).abs().max().item()
        rows.append([name, CHANGE[name], f"{n / t.cpu_median:.1f}", f"{statistics.median(vs_loop):.2f} "
                     f"[{min(vs_loop):.2f}–{max(vs_loop):.2f}]", f"{statistics.median(vs_loop_wall):.2f}",
                     f"{statistics.median(vs_prev):.2f}" if prev else "—", f"{diff:.1e}"])
        result["rates"][name] = n / t.cpu_median
        result["max_diff_vs_loop"][name] = diff
        result["speedup_vs_loop"][name] = statistics.median(vs_loop)
        if prev:
            result["step_speedup"][name] = statistics.median(vs_prev)
        prev = name
    print(markdown_table(["contender", "change vs the row above", "images/s (CPU)", "× loop (CPU)", "× loop (wall)",
                          "× row above (CPU)", "max abs score diff vs loop"], rows, left=2))
    pre = per_round("pre-PIL", "pre-torch")
    pre_share = [p / s for p, s in zip(timing["pre-PIL"].cpu, timing["batched+text-once"].cpu)]
    print()
    print(markdown_table(
        ["preprocessing alone", "ms/image (CPU)", "× PIL (speed-up, CPU)", "share of 'batched+text-once' CPU time"],
        [["pre-PIL (transformers PIL processor)", f"{timing['pre-PIL'].cpu_median / n * 1000:.2f}", "1.00",
          f"{statistics.median(pre_share):.0%}"],
         ["pre-torch (genalign tensor path)", f"{timing['pre-torch'].cpu_median / n * 1000:.2f}",
          f"{statistics.median(pre):.2f} [{min(pre):.2f}–{max(pre):.2f}]", "—"]]))
    print(f"check: reward.score (cold text cache) vs contender 4: max abs diff {api_diff:.1e}")
    result["preprocess_speedup"] = statistics.median(pre)
    result["api_diff"] = api_diff
    return result


if __name__ == "__main__":
    main()
