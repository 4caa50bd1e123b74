"""Batched reward scoring throughput against a per-image loop over the same CLIP model (PickScore architecture).

Usage: ``python benchmarks/score_throughput.py [--size tiny|small|base] [--images 64] [--prompts 8]
[--batch-size 32] [--threads 1]``

The reward is genalign's ``pickscore-v1`` (transformers ``CLIPModel``, ``s = exp(logit_scale)·cos``) loaded from a
local folder holding a CLIP of the chosen size with **random weights** (offline: no hub download; the ratio, not
the absolute speed, is the result; real PickScore is CLIP-H/14, ~30x the ``base`` size):

- ``tiny``: 2-layer 32-wide towers (the test model); ``small``: 4-layer 256-wide towers, patch 32;
  ``base``: ViT-B/32-sized (12-layer 768-wide vision, 12-layer 512-wide text).

Variants, all on the same images (``uint8``-quantised RGB, 256x256) and prompts (each prompt shared by
``images/prompts`` images), timed in this one process after one warm-up call each:

- ``loop``: the hpsv2 / ImageReward package pattern: for each image, the PIL CLIP processor on that image,
  tokenise its prompt, one ``CLIPModel`` forward with both towers (``logits_per_image``), batch size 1;
- ``batched-reference``: genalign batches (``reward.score``) with the same PIL preprocessing, text embeddings
  computed once per distinct prompt (the scores must match the loop: max |diff| is printed);
- ``batched``: genalign's default, torch preprocessing (differentiable resize/crop) on the whole batch.

Prints images/s per variant and the speed-up ratios over the loop.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time


def clip_config(size: str):
    """``CLIPConfig`` of the chosen size (random init; ``logit_scale = ln 100`` like PickScore's stored value)."""
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
        raise ValueError(f"unknown size {size!r}")
    return CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, projection_dim=proj, **t),
        vision_config=dict(image_size=224, patch_size=32, projection_dim=proj, **v),
        projection_dim=proj, logit_scale_init_value=math.log(100.0))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the table; returns ``{variant: images_per_second, ...}`` and the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "small", "base"], default="small")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts (images share them round-robin)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=256, help="side of the square input images")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)

    import torch
    from transformers import CLIPModel

    from genalign.rewards.clip import PickScore
    from genalign.rewards.preprocess import clip_reference_pixels, quantize_uint8

    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as d:
        CLIPModel(clip_config(args.size)).save_pretrained(d)  # random weights, real loading path
        r_tensor = PickScore(weights=d, device=device, preprocess="tensor")
        r_ref = PickScore(weights=d, device=device, preprocess="reference")
    n_params = sum(p.numel() for p in r_ref.model.parameters())
    g = torch.Generator().manual_seed(0)
    images = quantize_uint8(torch.rand(args.images, 3, args.resolution, args.resolution, generator=g))
    base_prompts = [f"a photo of object number {k} on a table" for k in range(args.prompts)]
    prompts = [base_prompts[i % args.prompts] for i in range(args.images)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def loop(n: int | None = None) -> torch.Tensor:
        out = []
        model, tok = r_ref.model, r_ref.tokenizer
        for i in range(n or args.images):
            pix = clip_reference_pixels(images[i:i + 1], r_ref.image_size).to(device)  # PIL processor, 1 image
            t = tok([prompts[i]], padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
            logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pix).logits_per_image
            out.append(logits.reshape(-1).float().cpu())
        return torch.cat(out)

    def batched(reward, n: int | None = None) -> torch.Tensor:
        reward._text_cache.data.clear()  # text embeddings are part of the measured work
        n = n or args.images
        out = []
        for i in range(0, n, args.batch_size):
            out.append(reward.score(images[i:min(i + args.batch_size, n)].to(device), prompts[i:min(i + args.batch_size, n)]).cpu())
        return torch.cat(out)

    variants = {"loop": loop, "batched-reference": lambda n=None: batched(r_ref, n),
                "batched": lambda n=None: batched(r_tensor, n)}
    rate, scores = {}, {}
    for name, fn in variants.items():
        fn(min(args.images, 2))  # warm-up
        sync()
        t0 = time.perf_counter()
        scores[name] = fn()
        sync()
        rate[name] = args.images / (time.perf_counter() - t0)
    diff_ref = (scores["loop"] - scores["batched-reference"]).abs().max().item()
    diff_tensor = (scores["loop"] - scores["batched"]).abs().max().item()

    print(f"reward: pickscore-v1 architecture (transformers CLIPModel), size '{args.size}' with RANDOM weights "
          f"({n_params / 1e6:.1f}M parameters; offline, no real checkpoint) on {device}, {args.threads} thread(s)")
    print(f"data: {args.images} images {args.resolution}x{args.resolution}, {args.prompts} distinct prompts, "
          f"batch size {args.batch_size}")
    print(f"{'variant':<20}{'images/s':>12}{'vs loop':>10}")
    for name in variants:
        print(f"{name:<20}{rate[name]:>12.1f}{rate[name] / rate['loop']:>9.2f}x")
    print(f"max |score diff| vs loop: batched-reference {diff_ref:.2e} (same preprocessing), batched {diff_tensor:.2e} "
          "(torch resize vs PIL: small expected differences)")
    print(f"ratio (batched / per-image loop, measured in this run): {rate['batched'] / rate['loop']:.2f}x")
    return {"rates": rate, "ratio": rate["batched"] / rate["loop"],
            "ratio_reference": rate["batched-reference"] / rate["loop"], "max_diff_reference": diff_ref}


if __name__ == "__main__":
    main()
