"""MaPO training-step cost on the tiny SDXL-architecture UNet: genalign (cached / uncached) vs a bare UNet step vs
an official-style loop, interleaved in one run.

Usage::

    python benchmarks/mapo_step.py [--vae tiny|sdxl8x] [--pairs 8] [--latent-size 32] [--rounds 10]
                                   [--calls 1] [--memory-repeats 3] [--threads 1] [--quick]

Contenders (all on one LoRA-r8 ``SDXLAdapter`` over ``tiny_sdxl_pipeline``, the same B pairs, and the SAME
optimizer step: ``clip_grad_norm_(·, 1.0)`` + AdamW(lr 1e-5, wd 1e-2) + ``zero_grad``):

- ``bare``: UNet forward + backward on the 2B rows ``[w; l]`` (latents and text embeddings given), MSE to the
  noise, + the optimizer step. The floor any paired objective pays.
- ``genalign``: genalign's MaPO step as the trainer runs it with ``data.cache_latents: true`` (cached latents and
  text embeddings): Accelerate ``accumulate`` / ``autocast`` / ``backward`` / ``clip_grad_norm_``, the finite-loss
  check, ``MaPO.loss`` with a seeded per-step generator (mirrors ``genalign/training/trainer.py``'s step body).
- ``genalign-uncached``: the same with ``cache_latents: false``: every step encodes both images with the VAE
  (seeded posterior sample) and the prompts with both text encoders (tokenising included) through the adapter.
- ``official-style``: the loop of the official MaPO trainer (mapo-t2i/mapo ``train.py``), written here: every
  step encodes the 2B pixel images with the VAE (posterior sample × scaling factor) and the pre-tokenised prompts
  with both text encoders (penultimate hidden states concatenated, pooled output of encoder 2), builds
  ``time_ids``, draws noise per pair, runs the UNet and the official loss formula, then the optimizer step.

``--vae``: ``tiny`` is the tiny pipeline's own VAE (one block: no downsampling, latents = pixels); ``sdxl8x`` is an
``AutoencoderKL`` with SDXL's 8× downsampling (4 blocks) and SDXL's VAE-to-UNet width ratios (SDXL: VAE
128/256/512/512 vs UNet 320 → here 16/32/64/64 vs 32), so the per-step VAE encode costs what it costs relative to
the UNet in SDXL and the cache's benefit shows. The resolution is ``latent_size × downsampling`` (UNet work is
the same for both VAEs).

Time: interleaved rounds (order shuffled per round), process CPU time and wall time; the ratio to ``bare`` is
the median of per-round ratios (min–max printed). Memory: see ``_harness.MEMORY_METHOD`` (VmHWM rise of one
steady-state step in a fresh subprocess per contender and repeat; median of repeats).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (MEMORY_METHOD, child_main, interleave, load_average, machine_summary,  # noqa: E402
                      markdown_table, memory_rounds, set_threads, spread)

CONTENDERS = ("bare", "genalign", "genalign-uncached", "official-style")
VAES = {"tiny": None, "sdxl8x": (16, 32, 64, 64)}  # None = the tiny pipeline's own one-block VAE
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-5, 1e-2, 1.0  # official MaPO README recipe (mapo.md §3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--quick``: tiny sizes and few rounds, for the smoke test; figures not quotable)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", choices=sorted(VAES), default="sdxl8x")
    ap.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2B UNet rows)")
    ap.add_argument("--latent-size", type=int, default=32, help="latent side; pixels = this × the VAE downsampling")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=1, help="steps per contender per round")
    ap.add_argument("--memory-repeats", type=int, default=3, help="fresh-process memory measurements per contender")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: quiet on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="2 pairs, 8×8 latents, 3 rounds, 1 memory repeat")
    ap.add_argument("--child", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    if ap.parse_known_args(argv)[0].quick:  # quick sizes, unless given explicitly
        ap.set_defaults(pairs=2, latent_size=8, rounds=3, calls=1, memory_repeats=1)
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.latent_size < 4 or args.rounds < 1 or args.calls < 1 or args.memory_repeats < 0:
        ap.error("--pairs ≥ 1, --latent-size ≥ 4, --rounds ≥ 1, --calls ≥ 1, --memory-repeats ≥ 0")
    return args


def build(args: argparse.Namespace) -> tuple[dict, dict]:
    """Build the model, data and one step function per contender (same seeds in every process).

    Returns:
        ``(steps, info)``: name → zero-argument step function; info: resolution, latent shape, parameter counts.
    """
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from genalign.config import LoraConfig
    from genalign.objectives.mapo import MaPO
    from genalign.pipelines.sdxl import SDXLAdapter
    from genalign.pipelines.tiny import tiny_sdxl_pipeline, tiny_vae

    torch.manual_seed(0)
    pipe = tiny_sdxl_pipeline()
    if VAES[args.vae] is not None:
        pipe.vae = tiny_vae(block_out_channels=VAES[args.vae])
    down = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    res = args.latent_size * down
    model = SDXLAdapter(pipe, lora=LoraConfig(rank=8), reference="none", resolution=res)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    acc = Accelerator(cpu=True, mixed_precision="no")
    unet_acc, opt_acc = acc.prepare(model.unet, opt)  # what the trainer trains through (no wrapper on 1 CPU process)
    obj = MaPO(MaPO.Config(), model)
    b = args.pairs
    g = torch.Generator().manual_seed(0)
    images_w = torch.rand(b, 3, res, res, generator=g)  # [0, 1]
    images_l = torch.rand(b, 3, res, res, generator=g)
    prompts = [f"a handwritten digit {i % 10}" for i in range(b)]
    with torch.no_grad():
        cond = model.encode_prompt(prompts)
        lat_w, lat_l = model.encode(images_w, generator=g), model.encode(images_l, generator=g)
    T = model.num_train_timesteps
    step_no = [0]

    def next_gen() -> torch.Generator:
        step_no[0] += 1
        return torch.Generator().manual_seed(1000 + step_no[0])

    def opt_step(optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def bare() -> None:
        gen = next_gen()
        x0 = torch.cat([lat_w, lat_l])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (2 * b,), generator=gen)
        c2 = {k: torch.cat([v, v]) for k, v in cond.items()}
        pred = model.predict(model.add_noise(x0, noise, t), t, c2)
        F.mse_loss(pred.float(), noise).backward()
        opt_step(opt)

    def trainer_step(batch: dict) -> None:
        with acc.accumulate(unet_acc), acc.autocast():
            out = obj.loss(batch, next_gen())
            bad = acc.reduce(torch.tensor(float(not torch.isfinite(out.loss).all())), "sum")
            if bad.item() > 0:
                raise RuntimeError("non-finite MaPO loss in the benchmark")
            acc.backward(out.loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt_acc.step()
            opt_acc.zero_grad(set_to_none=True)
        out.loss.item()  # the trainer logs it every step

    def genalign_cached() -> None:
        trainer_step({"latents_w": lat_w, "latents_l": lat_l, "cond": cond})

    def genalign_uncached() -> None:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(step_no[0])
            batch = {"latents_w": model.encode(images_w, generator=gen), "latents_l": model.encode(images_l, generator=gen),
                     "cond": model.encode_prompt(prompts)}
        trainer_step(batch)

    # Official-style loop: tokenising happens in its data loader (collate), outside the step.
    tok1, tok2 = pipe.tokenizer, pipe.tokenizer_2
    ids1 = tok1(prompts, padding="max_length", max_length=tok1.model_max_length, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(prompts, padding="max_length", max_length=tok2.model_max_length, truncation=True, return_tensors="pt").input_ids
    pixels = torch.cat([images_w, images_l]) * 2 - 1  # [w; l] in [-1, 1]
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(2 * b, 1)
    vae, te1, te2, unet = pipe.vae, pipe.text_encoder, pipe.text_encoder_2, model.unet
    sched = model.noise_scheduler
    snr_value, beta_mapo = 0.5, 0.1

    def official_style() -> None:
        gen = next_gen()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
            h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
            out2 = te2(ids2, output_hidden_states=True)
            embeds = torch.cat([h1, out2.hidden_states[-2]], dim=-1).repeat(2, 1, 1)
            pooled = out2[0].repeat(2, 1)
        noise = torch.randn(latents[:b].shape, generator=gen).repeat(2, 1, 1, 1)
        t = torch.randint(0, T, (b,), generator=gen).repeat(2)
        pred = unet(sched.add_noise(latents, noise, t), t, embeds,
                    added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled}).sample
        losses = (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
        lw, ll = losses.chunk(2)
        sw, sl = snr_value * lw, snr_value * ll
        margin = sw / (torch.exp(sw) - 1) - sl / (torch.exp(sl) - 1)
        loss = lw.mean() - (beta_mapo * F.logsigmoid(margin * T)).mean()
        loss.backward()
        opt_step(opt)
        loss.item()

    steps = {"bare": bare, "genalign": genalign_cached, "genalign-uncached": genalign_uncached,
             "official-style": official_style}
    info = {"resolution": res, "downsampling": down, "latent": tuple(lat_w.shape[1:]),
            "lora_params": sum(p.numel() for p in params), "unet_params": sum(p.numel() for p in unet.parameters()),
            "vae_params": sum(p.numel() for p in vae.parameters())}
    return steps, info


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its table (Markdown) and return the medians and ratios per contender."""
    args = parse_args(argv)
    set_threads(args.threads)
    steps, info = build(args)
    if args.child:
        child_main(steps[args.child])
        return {}
    load_start = load_average()
    timing = interleave(steps, baseline="bare", rounds=args.rounds, calls=args.calls, warmup=2)
    child_argv = ["--vae", args.vae, "--pairs", str(args.pairs), "--latent-size", str(args.latent_size),
                   "--threads", str(args.threads)]
    mem = (memory_rounds(os.path.abspath(__file__), CONTENDERS, args.memory_repeats, child_argv, args.threads)
           if args.memory_repeats else {})
    load_end = load_average()

    print(f"MaPO step, tiny SDXL-architecture UNet ({info['unet_params'] / 1e6:.2f}M params, LoRA r8 "
          f"{info['lora_params'] / 1e3:.1f}k trainable), {args.pairs} pairs = {2 * args.pairs} UNet rows, "
          f"VAE '{args.vae}' ({info['downsampling']}× down, {info['vae_params'] / 1e6:.2f}M params), "
          f"{info['resolution']}px images → latents {info['latent']}")
    print(machine_summary(args.threads) + f"; load average 1-min {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"time: {args.rounds} interleaved rounds × {args.calls} steps per contender (order shuffled per round), "
          "median of per-round ratios to bare [min–max]")
    if mem:
        print(f"memory: {MEMORY_METHOD}; median of {args.memory_repeats} per contender")
    rows, result = [], {}
    bare_mem = statistics.median(mem["bare"]) if mem else None
    for name in CONTENDERS:
        t = timing[name]
        row = [name, f"{t.cpu_median * 1000:.1f}", f"{t.cpu_ratio_median:.2f} [{spread(t.cpu_ratio)}]",
               f"{t.wall_median * 1000:.1f}", f"{t.wall_ratio_median:.2f} [{spread(t.wall_ratio)}]"]
        result[name] = {"cpu_ms": t.cpu_median * 1000, "cpu_ratio": t.cpu_ratio_median, "wall_ms": t.wall_median * 1000,
                        "wall_ratio": t.wall_ratio_median}
        if mem:
            m = statistics.median(mem[name])
            row += [f"{m:.1f}", f"{m / bare_mem:.2f}" if bare_mem > 0 else "n/a"]
            result[name]["rise_mib"] = m
        rows.append(row)
    headers = ["contender", "CPU ms/step", "× bare (CPU)", "wall ms/step", "× bare (wall)"]
    if mem:
        headers += ["peak rise MiB", "× bare (mem)"]
    print(markdown_table(headers, rows))
    return result


if __name__ == "__main__":
    main()
