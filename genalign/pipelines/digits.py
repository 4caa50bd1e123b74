"""``builtin:digits``: a tiny Stable-Diffusion-architecture text-to-image model pretrained on real digits.

Components are the real Diffusers/Transformers classes (AutoencoderKL with one block, so 8x8 pixels ↔ 4x8x8
latents; UNet2DConditionModel with block_out_channels (32, 64); a 2-layer CLIPTextModel; a CLIP BPE tokenizer;
DDIM for sampling), saved as an ordinary Diffusers folder in ``genalign/assets/digits`` that vanilla
``StableDiffusionPipeline.from_pretrained`` loads. :func:`build_digits_base` rebuilds it deterministically
(``python scripts/build_digits.py``, about 16 minutes on 2 CPU cores).

Training recipe (genalign's own): VAE 1500 steps (L1 + 1e-6·KL, so the posterior std is ~1 % of the latent spread,
as in Stable Diffusion's VAE); then text encoder + UNet jointly for 4000 steps, epsilon prediction, 10 % empty
prompts for classifier-free guidance, AdamW 1e-3, batch 64.
Why the small KL weight: with 1e-4 and 400 steps the posterior std stayed at ~76 % of the latent spread, so most
of each training latent was VAE noise; the UNet then followed prompts poorly without CFG and fine-tuning signals
(even SFT on real digits) were buried in that noise.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DIGITS_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits"
# Default sampler of the demo: DDIM 25 steps, no guidance (CFG 1): the samples closest to the real digits (CFG 5
# saturates the reward but doubles the Frechet distance); it leaves room above for alignment.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 1.0


def digits_base_path() -> Path:
    """Path of the shipped digits pipeline folder.

    Raises:
        FileNotFoundError: the folder is missing (rebuild with ``python scripts/build_digits.py``).
    """
    if not (DIGITS_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"built-in digits model not found at {DIGITS_DIR}; rebuild it with `python scripts/build_digits.py`"
        )
    return DIGITS_DIR


def _prompts_for(labels: torch.Tensor, g: torch.Generator, p_empty: float) -> list[str]:
    from genalign.data.digits import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, digit_prompt

    templates = TRAIN_TEMPLATES + HELDOUT_TEMPLATES
    idx = torch.randint(0, len(templates), (len(labels),), generator=g).tolist()
    drop = (torch.rand(len(labels), generator=g) < p_empty).tolist()
    return ["" if dr else digit_prompt(templates[i], int(d)) for i, d, dr in zip(idx, labels.tolist(), drop)]


def build_digits_base(out_dir: str | Path = DIGITS_DIR, vae_steps: int = 1500, unet_steps: int = 4000,
                      batch_size: int = 64, seed: int = 0, vae_kl_weight: float = 1e-6, progress: bool = True) -> dict:
    """Pretrain the digits pipeline on the real train split and save it to ``out_dir`` (Diffusers format).

    Returns:
        a report dict (timings, final losses), also written to ``out_dir/build_report.json``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from tqdm import tqdm

    from genalign.data.digits import load_digits_split
    from genalign.pipelines.tiny import (fit_vae, scheduler_config, tiny_clip_text_encoder, tiny_clip_tokenizer,
                                         tiny_unet, tiny_vae)

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits_split("train")
    x = x * 2 - 1  # pixels in [-1, 1], as Stable Diffusion's VAE expects
    t0 = time.time()

    vae = tiny_vae(seed=seed)
    vae_loss = fit_vae(vae, x, vae_steps, batch_size, vae_kl_weight, g, desc="digits VAE" if progress else None)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))

    tok = tiny_clip_tokenizer()
    te = tiny_clip_text_encoder(len(tok), seed=seed)
    unet = tiny_unet(seed=seed)
    noise_sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"})
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * (1 - s / unet_steps)))
    sf = vae.config.scaling_factor
    for step in tqdm(range(unet_steps), desc="digits UNet", disable=not progress):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        with torch.no_grad():
            latents = vae.encode(x[idx]).latent_dist.sample(generator=g) * sf
        prompts = _prompts_for(y[idx], g, p_empty=0.1)
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        cond = te(ids)[0]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, cond).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    unet_loss = loss.item()

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(), scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir)
    report = {"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "batch_size": batch_size,
              "vae_l1": vae_loss, "unet_mse": unet_loss, "seconds": round(time.time() - t0, 1)}
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2))
    return report
