"""Validate ``genalign plan``'s memory model against a measured peak: a MaPO LoRA step on CPU in bf16.

Builds the pipeline of a shipped model config (default: SD 1.5 — real-size UNet, VAE and text encoder, random
weights created directly in bf16, LoRA rank 8 on the attention projections in fp32 as genalign keeps it), runs
``--steps`` MaPO steps (UNet forward on 2 rows = one pair under bf16 autocast, ``mapo_loss``, backward, AdamW)
at a small latent size, and compares

- measured: peak RSS (``VmHWM``) minus the RSS before the networks were built (torch already imported), with
- estimate: :func:`genalign.plan.plan` for the same settings on the CPU (no CUDA context line).

Usage::

    python benchmarks/plan_memory.py                  # SD-1.5, 16×16 latents (128 px), ~2-5 min, ~3 GB RAM
    python benchmarks/plan_memory.py --scale 4 --latent 32   # channels ÷ 4: the test suite's small version

Prints one JSON line (``measured_mb``, ``estimate_mb``, ``error``, the estimate's items) after a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def scaled_spec(spec: dict, scale: int) -> dict:
    """``spec`` with every UNet / VAE channel width and the text encoder's width divided by ``scale``."""
    if scale == 1:
        return spec
    s = copy.deepcopy(spec)
    u = s["components"]["unet"]["config"]
    u["block_out_channels"] = [c // scale for c in u["block_out_channels"]]
    u["cross_attention_dim"] //= scale
    v = s["components"]["vae"]["config"]
    v["block_out_channels"] = [c // scale for c in v["block_out_channels"]]
    v["norm_num_groups"] = u["norm_num_groups"] = 32 // scale if 32 % scale == 0 else 8
    t = s["components"]["text_encoder"]["config"]
    t["hidden_size"] //= scale
    t["intermediate_size"] //= scale
    t["projection_dim"] //= scale
    s["model"] = f"{spec['model']} (channels ÷ {scale})"
    return s


def build(spec: dict, rank: int):
    """Real modules (random weights) in bf16; LoRA on the UNet in fp32 (genalign's dtype policy)."""
    import diffusers
    import transformers
    from peft import LoraConfig, inject_adapter_in_model

    torch.set_default_dtype(torch.bfloat16)  # created directly in bf16: no fp32 copy ever exists
    try:
        mods = {}
        for name, c in spec["components"].items():
            if "scheduler" in name:
                continue
            if c["library"] == "diffusers":
                mods[name] = getattr(diffusers, c["class"]).from_config(c["config"])
            else:
                cfg = {k: v for k, v in c["config"].items() if k != "architectures"}
                mods[name] = getattr(transformers, c["class"])(transformers.AutoConfig.for_model(**cfg))
        for m in mods.values():
            m.requires_grad_(False)
        unet = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                                  init_lora_weights="gaussian"), mods["unet"])
    finally:
        torch.set_default_dtype(torch.float32)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return mods


def mapo_steps(unet, latent: int, text_len: int, steps: int) -> float:
    """``steps`` MaPO LoRA steps on one pair (2 rows); returns seconds per step."""
    from genalign.objectives.mapo import mapo_loss

    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    c = unet.config
    unet.train()
    t0 = time.time()
    for _ in range(steps):
        x = torch.randn(2, c.in_channels, latent, latent, generator=g)
        noise = torch.randn(1, c.in_channels, latent, latent, generator=g).expand(2, -1, -1, -1)
        t = torch.randint(0, 1000, (1,), generator=g).expand(2)
        ehs = torch.randn(2, text_len, c.cross_attention_dim, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet((x + noise).to(torch.bfloat16), t, encoder_hidden_states=ehs.to(torch.bfloat16)).sample
        losses = (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
        loss, _ = mapo_loss(losses[:1], losses[1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.time() - t0) / steps


def estimate(spec: dict, latent: int, rank: int):
    """:func:`genalign.plan.plan` for this benchmark's settings (MaPO, LoRA, bf16, AdamW, batch 1 pair, CPU)."""
    from genalign.plan import plan

    down = 2 ** (len(spec["components"]["vae"]["config"]["block_out_channels"]) - 1)
    return plan(None, [f"pipeline.model={spec['model']}", f"pipeline.resolution={latent * down}",
                       f"pipeline.lora.rank={rank}", "pipeline.reference=none", "pipeline.gradient_checkpointing=false",
                       "train.batch_size=1", "train.mixed_precision=bf16", "train.optimizer=adamw",
                       "train.use_8bit_adam=false", "objective.name=mapo", "rewards=[]"],
                check_data=False, device="cpu", spec=spec)


def run(config: str = "sd_1.5.json", scale: int = 1, latent: int = 16, rank: int = 8, steps: int = 2) -> dict:
    """Measure and estimate; returns the figures (MB = 2**20 bytes)."""
    from genalign.plan import MODEL_CONFIGS

    spec = scaled_spec(json.loads((MODEL_CONFIGS / config).read_text()), scale)
    p = estimate(spec, latent, rank)  # first: its meta networks cost (almost) nothing resident
    del p.components  # drop the meta modules before measuring
    import gc

    gc.collect()
    base = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    mods = build(spec, rank)
    sec = mapo_steps(mods["unet"], latent, spec.get("text_length", 77), steps)
    peak = _rss_kb("VmHWM")
    measured = (peak - base) / 1024
    est = p.peak / 2**20
    return {"model": spec["model"], "latent": latent, "rank": rank, "measured_mb": round(measured, 1),
            "estimate_mb": round(est, 1), "error": round(est / measured - 1, 4), "seconds_per_step": round(sec, 2),
            "items_mb": {k: round(v / 2**20, 1) for k, v in p.memory.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="sd_1.5.json", help="a file in genalign/assets/model_configs")
    ap.add_argument("--scale", type=int, default=1, help="divide channel widths (1 = real size)")
    ap.add_argument("--latent", type=int, default=16, help="latent side (pixels = latent × 8)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    r = run(a.config, a.scale, a.latent, a.rank, a.steps)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"plan memory model vs measured peak RSS rise — {r['model']}, MaPO LoRA r={r['rank']}, "
                    f"1 pair, latent {r['latent']}², CPU bf16")
    t.add_column("item")
    t.add_column("MB", justify="right")
    for k, v in r["items_mb"].items():
        t.add_row(f"estimate: {k}", f"{v:.1f}")
    t.add_row("[bold]estimate total[/bold]", f"{r['estimate_mb']:.1f}")
    t.add_row("[bold]measured (peak RSS − RSS before build)[/bold]", f"{r['measured_mb']:.1f}")
    t.add_row("estimate / measured − 1", f"{r['error']:+.1%}")
    Console().print(t)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
