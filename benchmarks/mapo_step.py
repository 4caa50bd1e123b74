"""MaPO training-step cost on the tiny SDXL-architecture UNet, against a bare UNet forward+backward.

Usage: ``python benchmarks/mapo_step.py [--pairs 8] [--resolution 32] [--steps 10]``

Each variant runs in its own fresh process (so peak RSS is its own) on the same 2B-row batch:
  bare      — UNet forward + backward on 2B rows (latents and text embeddings given), MSE to the noise
  cached    — genalign's MaPO step with cached latents / text embeddings (what `data.cache_latents: true` runs)
  uncached  — genalign's MaPO step encoding images with the VAE and prompts with both text encoders every step
Prints ms/step, peak memory (CUDA: max allocated; CPU: peak RSS of the process) and the ratios to `bare`,
all measured in one invocation.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(name: str, pairs: int, resolution: int, steps: int) -> dict:
    import torch

    from genalign.config import LoraConfig
    from genalign.objectives.mapo import MaPO
    from genalign.pipelines.sdxl import SDXLAdapter
    from genalign.pipelines.tiny import tiny_sdxl_pipeline

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = SDXLAdapter(tiny_sdxl_pipeline(), lora=LoraConfig(rank=8), device=device, resolution=resolution)
    obj = MaPO(MaPO.Config(), model)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    prompts = [f"a handwritten digit {i % 10}" for i in range(pairs)]
    images_w = torch.rand(pairs, 3, resolution, resolution, device=device)
    images_l = torch.rand(pairs, 3, resolution, resolution, device=device)
    cond = model.encode_prompt(prompts)
    lat_w, lat_l = model.encode(images_w), model.encode(images_l)

    def step():
        if name == "bare":
            x = torch.cat([lat_w, lat_l])
            noise = torch.randn_like(x)
            t = torch.randint(0, 1000, (2 * pairs,), device=device)
            c2 = {k: torch.cat([v, v]) for k, v in cond.items()}
            pred = model.predict(model.add_noise(x, noise, t), t, c2)
            loss = (pred.float() - noise).pow(2).mean()
        else:
            if name == "uncached":
                batch = {"latents_w": model.encode(images_w), "latents_l": model.encode(images_l),
                         "cond": model.encode_prompt(prompts)}
            else:
                batch = {"latents_w": lat_w, "latents_l": lat_l, "cond": cond}
            loss = obj.loss(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1000
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": name, "ms_per_step": ms, "peak_mib": peak, "memory": "cuda max allocated" if cuda else "peak RSS"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.pairs, args.resolution, args.steps)))
        return
    rows = []
    for v in ("bare", "cached", "uncached"):
        out = subprocess.run([sys.executable, __file__, "--variant", v, "--pairs", str(args.pairs), "--resolution",
                              str(args.resolution), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    bare = rows[0]
    print(f"MaPO step, tiny SDXL UNet, {args.pairs} pairs (2B = {2 * args.pairs} rows), {args.resolution}px, "
          f"{args.steps} timed steps; memory = {bare['memory']}")
    print(f"{'variant':10s} {'ms/step':>9s} {'x bare':>7s} {'peak MiB':>9s} {'x bare':>7s}")
    for r in rows:
        print(f"{r['variant']:10s} {r['ms_per_step']:9.1f} {r['ms_per_step'] / bare['ms_per_step']:7.2f} "
              f"{r['peak_mib']:9.0f} {r['peak_mib'] / bare['peak_mib']:7.2f}")


if __name__ == "__main__":
    main()
