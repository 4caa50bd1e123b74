"""Tiny builders of the *real* Diffusers/Transformers classes, with small widths and random weights.

Tests and the built-in digits model use them: the same code paths as SD 1.x / SDXL, on CPU, in seconds, with no
download. A word-level CLIP BPE tokenizer is generated in memory (characters + whole-word merges for a small word
list), so it saves and reloads offline and still encodes any text (unknown words fall back to characters).

Source: diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` / schedulers; transformers ``CLIPTextModel`` /
``CLIPTextModelWithProjection`` / ``CLIPTokenizer`` (configs only, widths chosen here).
"""

from __future__ import annotations

import json
import os
import string
import tempfile

import torch

BASE_WORDS = (
    "a an the of digit number handwritten written by hand drawing sketch photo image picture thick thin bold "
    "zero one two three four five six seven eight nine cat dog red blue"
).split()


def tiny_clip_tokenizer(words: tuple[str, ...] | list[str] = tuple(BASE_WORDS), model_max_length: int = 16):
    """A CLIP BPE tokenizer whose vocabulary is the printable characters plus ``words`` as single tokens.

    Args:
        words: lower-case words that become one token each (others split into characters).
        model_max_length: padded length used by Diffusers pipelines (``tokenizer.model_max_length``).

    Returns:
        ``transformers.CLIPTokenizer`` (vocab size ≈ 200 + 2·len(words)); ``save_pretrained`` / ``from_pretrained``
        round-trip offline.
    """
    from transformers import CLIPTokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in dict.fromkeys(w.lower() for w in words):
        if len(w) < 2:
            continue
        # Left-to-right merges: "d i" → "di", "di g" → "dig", ..., last one carries the end-of-word marker.
        cur = w[0]
        for i, ch in enumerate(w[1:], start=1):
            nxt = ch + ("</w>" if i == len(w) - 1 else "")
            merged = cur + nxt
            rule = f"{cur} {nxt}"
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            cur = merged
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(tok, len(vocab))
    # Written as the two classic files so every transformers version (4.x slow/fast, 5.x) can read them.
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer.from_pretrained(d, model_max_length=model_max_length)
    return tok


def tiny_clip_text_encoder(vocab_size: int, hidden_size: int = 32, max_positions: int = 16, projection_dim: int | None = None,
                           num_layers: int = 2, seed: int = 0):
    """``CLIPTextModel`` (or ``CLIPTextModelWithProjection`` when ``projection_dim`` is set) with small widths."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
        num_attention_heads=2, max_position_embeddings=max_positions, projection_dim=projection_dim or hidden_size,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(cfg)


def tiny_vae(in_channels: int = 3, block_out_channels: tuple[int, ...] = (32,), latent_channels: int = 4,
             norm_num_groups: int = 8, seed: int = 0):
    """``AutoencoderKL`` with ``len(block_out_channels) - 1`` downsamplings (one block = no downsampling)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels, layers_per_block=1, norm_num_groups=norm_num_groups,
        sample_size=32,
    )


def tiny_unet(sample_size: int = 8, cross_attention_dim: int = 32, block_out_channels: tuple[int, ...] = (32, 64),
              sdxl: bool = False, pooled_dim: int = 32, seed: int = 0):
    """``UNet2DConditionModel`` with two blocks (cross-attention in the first), as SD (or SDXL with ``sdxl=True``:
    ``addition_embed_type="text_time"``, 6 micro-conditioning ids, pooled text embeddings of ``pooled_dim``)."""
    from diffusers import UNet2DConditionModel

    kw = {}
    if sdxl:
        kw = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=pooled_dim + 6 * 8)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=block_out_channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8, **kw,
    )


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The Stable Diffusion scheduler settings (scaled-linear betas, ``clip_sample=False``: clipping latents to
    [-1, 1] destroys samples)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A ``StableDiffusionPipeline`` of tiny random components (8x8 pixels, 4x8x8 latents, 16-token prompts)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = tiny_clip_tokenizer()
    te = tiny_clip_text_encoder(len(tok), seed=seed)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed=seed), text_encoder=te, tokenizer=tok, unet=tiny_unet(seed=seed),
        scheduler=DDIMScheduler(**scheduler_config(prediction_type)), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A ``StableDiffusionXLPipeline`` of tiny random components: two text encoders (hidden 32 + 32 → 64-wide
    cross-attention, pooled 32 from encoder 2), text_time micro-conditioning, 8x8 pixels."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = tiny_clip_tokenizer()
    tok2 = tiny_clip_tokenizer()
    te = tiny_clip_text_encoder(len(tok), seed=seed)
    te2 = tiny_clip_text_encoder(len(tok2), projection_dim=32, seed=seed + 1)
    sched = EulerDiscreteScheduler(**{k: v for k, v in scheduler_config(prediction_type).items()
                                      if k not in ("clip_sample", "set_alpha_to_one")})
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed=seed), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
        unet=tiny_unet(cross_attention_dim=64, sdxl=True, pooled_dim=32, seed=seed), scheduler=sched,
        force_zeros_for_empty_prompt=True,
    )


def fit_vae(vae, x: torch.Tensor, steps: int, batch_size: int, kl_weight: float, generator: torch.Generator,
            lr: float = 1e-3, desc: str | None = None) -> float:
    """Train a small VAE in place: L1 reconstruction of a posterior sample + ``kl_weight`` · KL, AdamW.

    Used to pretrain the demo bases (``builtin:digits``, the tiny Stable Audio model of the music evidence).

    Args:
        vae: a Diffusers VAE whose ``encode(x).latent_dist`` has ``sample(generator)`` and ``kl()`` and whose
            ``decode(z).sample`` has ``x``'s shape (``AutoencoderKL``, ``AutoencoderOobleck``).
        x: ``(N, ...)`` training data in the VAE's input range (images in [-1, 1], waveforms).
        steps, batch_size: optimizer steps and rows per step (rows drawn with replacement from ``generator``).
        kl_weight: KL weight. Small (1e-6) keeps the posterior std ≪ the latent spread, as in Stable Diffusion's VAE.
        generator: CPU generator for the rows and the posterior samples (deterministic).
        desc: tqdm description; None = no progress bar.

    Returns:
        the last step's loss.
    """
    import torch.nn.functional as F
    from tqdm import tqdm

    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc=desc, disable=desc is None):
        xb = x[torch.randint(0, len(x), (batch_size,), generator=generator)]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=generator)).sample
        loss = F.l1_loss(rec, xb) + kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()
