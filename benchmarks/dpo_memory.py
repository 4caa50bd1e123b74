"""Diffusion-DPO step peak memory against a MaPO step (issue 16 item 1), with the reference-after order inline so
the ratio of the change is measured in one run.

Usage::

    python benchmarks/dpo_memory.py [--pairs 8] [--latent-size 32] [--memory-repeats 3] [--rounds 10]
                                    [--threads 1] [--quick]

Contenders (one LoRA-r8 ``SDXLAdapter`` over ``tiny_sdxl_pipeline`` with ``reference: adapter_off``, the same B
cached pairs, the same optimizer step ``clip_grad_norm_(·, 1.0)`` + AdamW; one seeded generator per step):

- ``mapo``: ``MaPO.loss`` (reference-free: one forward over 2B rows) + backward + step.
- ``dpo``: ``DiffusionDPO.loss`` as genalign does it now (the lead's change runs the reference pass, ``no_grad``
  with adapters off, BEFORE the policy forward) + backward + step.
- ``dpo-ref-after``: the previous order, written here: policy forward first, then the reference forward while the
  policy graph is alive, same noise/timestep draws and the same ``diffusion_dpo_loss``; + backward + step.

Peak memory: ``_harness.MEMORY_METHOD`` (VmHWM rise of one steady-state step above the resident set before it, one
fresh subprocess per contender and repeat, contenders shuffled per repeat; median of the repeats). Time:
interleaved rounds (shuffled), process CPU time, median of per-round ratios to ``mapo``. Equality: ``dpo`` and
``dpo-ref-after`` from the same state and generator seed: max |Δ loss| and max |Δ grad| (0 = bitwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (MEMORY_METHOD, child_main, interleave, load_average, machine_summary,  # noqa: E402
                      markdown_table, memory_rounds, set_threads, spread)

CONTENDERS = ("mapo", "dpo", "dpo-ref-after")
MAX_GRAD_NORM = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--quick``: 2 pairs, 8×8 latents, 1 repeat, 2 rounds: smoke test only)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--latent-size", type=int, default=32, help="latent (= pixel: the tiny VAE does not downsample) side")
    ap.add_argument("--memory-repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (0: no timing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    if ap.parse_known_args(argv)[0].quick:  # quick sizes, unless given explicitly
        ap.set_defaults(pairs=2, latent_size=8, memory_repeats=1, rounds=2)
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.latent_size < 4 or args.memory_repeats < 1 or args.rounds < 0:
        ap.error("--pairs ≥ 1, --latent-size ≥ 4, --memory-repeats ≥ 1, --rounds ≥ 0")
    return args


def build(args: argparse.Namespace):
    """Model, data and the three step functions; plus ``losses_and_grads(name, seed)`` for the equality check."""
    import torch

    from genalign.config import LoraConfig
    from genalign.objectives.dpo import DiffusionDPO, diffusion_dpo_loss
    from genalign.objectives.mapo import MaPO
    from genalign.pipelines.sdxl import SDXLAdapter
    from genalign.pipelines.tiny import tiny_sdxl_pipeline

    torch.manual_seed(0)
    model = SDXLAdapter(tiny_sdxl_pipeline(), lora=LoraConfig(rank=8), reference="adapter_off",
                        resolution=args.latent_size)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    mapo, dpo = MaPO(MaPO.Config(), model), DiffusionDPO(DiffusionDPO.Config(), model)
    b = args.pairs
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = model.encode_prompt([f"a handwritten digit {i % 10}" for i in range(b)])
        lat_w = model.encode(torch.rand(b, 3, args.latent_size, args.latent_size, generator=g), generator=g)
        lat_l = model.encode(torch.rand(b, 3, args.latent_size, args.latent_size, generator=g), generator=g)
    batch = {"latents_w": lat_w, "latents_l": lat_l, "cond": cond}
    T = model.num_train_timesteps

    def dpo_ref_after_loss(gen: torch.Generator) -> torch.Tensor:
        # The pre-change order: policy graph built first, reference forward while it is alive.
        noise = torch.randn(lat_w.shape, generator=gen)  # same draw order as genalign: noise, then t (CPU)
        t = torch.randint(0, T, (b,), generator=gen)
        x0, noise2, t2 = torch.cat([lat_w, lat_l]), noise.repeat(2, 1, 1, 1), t.repeat(2)
        cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
        x_t, target = model.add_noise(x0, noise2, t2), model.target(x0, noise2, t2)
        losses = (model.predict(x_t, t2, cond2).float() - target.float()).pow(2).flatten(1).mean(1)
        with model.reference() as ref:
            ref_losses = (model.predict(x_t, t2, cond2, unet=ref).float() - target.float()).pow(2).flatten(1).mean(1)
        lw, ll = losses.chunk(2)
        rw, rl = ref_losses.detach().chunk(2)
        return diffusion_dpo_loss(lw, ll, rw, rl, beta=dpo.config.beta, half_factor=dpo.config.half_factor)[0]

    loss_fns = {"mapo": lambda gen: mapo.loss(batch, gen).loss, "dpo": lambda gen: dpo.loss(batch, gen).loss,
                "dpo-ref-after": dpo_ref_after_loss}
    step_no = [0]

    def make_step(name: str):
        def step() -> None:
            step_no[0] += 1
            loss = loss_fns[name](torch.Generator().manual_seed(1000 + step_no[0]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
        return step

    def losses_and_grads(name: str, seed: int):
        opt.zero_grad(set_to_none=True)
        loss = loss_fns[name](torch.Generator().manual_seed(seed))
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        return loss.detach(), grads

    return {n: make_step(n) for n in CONTENDERS}, losses_and_grads


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its table (Markdown) and return rises, ratios and the equality check."""
    args = parse_args(argv)
    set_threads(args.threads)
    steps, losses_and_grads = build(args)
    if args.child:
        child_main(steps[args.child])
        return {}
    l_new, g_new = losses_and_grads("dpo", 7)
    l_old, g_old = losses_and_grads("dpo-ref-after", 7)
    dloss = (l_new - l_old).abs().item()
    dgrad = max((a - b).abs().max().item() for a, b in zip(g_new, g_old))
    load_start = load_average()
    timing = interleave(steps, baseline="mapo", rounds=args.rounds, calls=1, warmup=1) if args.rounds else None
    child_argv = ["--pairs", str(args.pairs), "--latent-size", str(args.latent_size), "--threads", str(args.threads)]
    mem = memory_rounds(os.path.abspath(__file__), CONTENDERS, args.memory_repeats, child_argv, args.threads)
    load_end = load_average()

    print(f"Diffusion-DPO vs MaPO step, tiny SDXL-architecture UNet + LoRA r8 (reference = adapters off), "
          f"{args.pairs} pairs = {2 * args.pairs} UNet rows, latents 4×{args.latent_size}×{args.latent_size}")
    print(machine_summary(args.threads) + f"; load average 1-min {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"memory: {MEMORY_METHOD}; median of {args.memory_repeats} per contender [min–max]")
    if timing:
        print(f"time: {args.rounds} interleaved rounds (order shuffled per round), median of per-round ratios to mapo")
    base = statistics.median(mem["mapo"])
    rows, result = [], {"rise_mib": {}, "ratio_to_mapo": {}}
    for name in CONTENDERS:
        m = statistics.median(mem[name])
        row = [name, f"{m:.1f} [{spread(mem[name], '{:.1f}')}]", f"{m / base:.2f}" if base > 0 else "n/a"]
        if timing:
            t = timing[name]
            row += [f"{t.cpu_median * 1000:.1f}", f"{t.cpu_ratio_median:.2f} [{spread(t.cpu_ratio)}]"]
        rows.append(row)
        result["rise_mib"][name] = m
        result["ratio_to_mapo"][name] = m / base if base > 0 else float("nan")
    headers = ["contender", "peak rise MiB [range]", "× mapo (mem)"]
    if timing:
        headers += ["CPU ms/step", "× mapo (CPU)"]
    print(markdown_table(headers, rows))
    print(f"dpo vs dpo-ref-after, same state and seed: max abs Δloss {dloss:.1e}, max abs Δgrad {dgrad:.1e}"
          + (" (bitwise equal)" if dloss == 0 and dgrad == 0 else ""))
    result.update(max_dloss=dloss, max_dgrad=dgrad)
    return result


if __name__ == "__main__":
    main()
