"""Seeded latent sampling with the policy or the frozen reference, and conditioning helpers for cached rows.

Objectives that generate their own training data (DDO's reference samples, DRAGON's on-policy demonstrations,
FD checkpoint selection, win-rate evaluation) draw *latents in the training space* — the x0 the denoiser
regresses — so the samples can be fed back to the loss without a decode/encode round trip.

Determinism: sample i uses its own CPU generator, so a sample does not depend on its batch-mates or the batch
size (tested), and a resumed run regenerates exactly what the uninterrupted one generated.

Source: Diffusers pipelines' ``output_type="latent"`` (image pipelines); audio adapters' own samplers
(:meth:`genalign.pipelines.audio.StableAudioAdapter.sample_latents`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from genalign.pipelines.base import cond_to

__all__ = ["cat_cond", "cond_where", "encode_prompts", "sampling_network", "sample_latents"]


def cat_cond(conds: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate conditioning dicts along dim 0 (tensors; nested dicts recursively; other values from the first).

    Raises:
        ValueError: an empty list.
    """
    if not conds:
        raise ValueError("cat_cond needs at least one conditioning dict")
    out: dict[str, Any] = {}
    for k, v in conds[0].items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.cat([c[k] for c in conds])
        elif isinstance(v, dict):
            out[k] = cat_cond([c[k] for c in conds])
        else:
            out[k] = v
    return out


def cond_where(mask: torch.Tensor, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Row-wise select: rows of ``a`` where ``mask`` ``(N,)`` is True, else rows of ``b`` (same shapes; used for
    caption dropout with an empty-prompt conditioning ``b``)."""
    out: dict[str, Any] = {}
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            m = mask.to(v.device).view((-1,) + (1,) * (v.ndim - 1))
            out[k] = torch.where(m, v, b[k].to(v.device, v.dtype))
        elif isinstance(v, dict):
            out[k] = cond_where(mask, v, b[k])
        else:
            out[k] = v
    return out


def encode_prompts(model, prompts: list[str], batch_size: int = 64) -> dict[str, Any]:
    """``model.encode_prompt`` in chunks of ``batch_size``, every tensor on the CPU: a cond dict with
    ``len(prompts)`` rows (cached once, indexed per batch)."""
    parts = [cond_to(model.encode_prompt(prompts[i:i + batch_size]), "cpu") for i in range(0, len(prompts), batch_size)]
    return cat_cond(parts)


@contextlib.contextmanager
def sampling_network(model, use_reference: bool = False) -> Iterator[torch.nn.Module]:
    """Context in which ``model.pipe`` samples with the policy (eval mode, no grad) or the reference.

    With ``reference: adapter_off`` the pipeline's own network has its LoRA disabled; with ``frozen_copy`` the
    pipeline's network attribute (``model.pipe_denoiser``, default ``unet``) is temporarily swapped for the frozen
    copy. The network's training mode is restored on exit.
    """
    raw = model.denoiser()
    was_training = raw.training
    raw.eval()
    try:
        if not use_reference:
            with torch.no_grad():
                yield raw
            return
        with model.reference() as ref:
            name = getattr(model, "pipe_denoiser", "unet")
            old = getattr(model.pipe, name)
            setattr(model.pipe, name, ref)
            try:
                yield ref
            finally:
                setattr(model.pipe, name, old)
    finally:
        raw.train(was_training)


@torch.no_grad()
def sample_latents(model, prompts: list[str], generators: list[torch.Generator], num_inference_steps: int = 25,
                   guidance_scale: float = 1.0, use_reference: bool = False, batch_size: int = 32) -> torch.Tensor:
    """Seeded samples in the model's *training latent space*, on the CPU, fp32.

    Args:
        model: a pipeline adapter. Adapters with their own sampler expose ``sample_latents(prompts,
            num_inference_steps, guidance_scale, generator, use_reference)`` (audio); Diffusers image pipelines are
            called with ``output_type="latent"`` (scaled latents before VAE decoding).
        prompts: N prompts. generators: N CPU generators, sample i uses generator i.
        num_inference_steps, guidance_scale: the sampler's settings (guidance 1 = no CFG).
        use_reference: sample with the frozen reference (DDO's fakes, the base model of a win rate).
        batch_size: prompts per sampler call (does not change the result).

    Returns:
        ``(N, C, h, w)`` image latents or ``(N, C, T)`` audio latents, float32 CPU.

    Raises:
        ValueError: the number of generators differs from the number of prompts.
    """
    if len(generators) != len(prompts):
        raise ValueError(f"need one generator per prompt, got {len(generators)} for {len(prompts)} prompts")
    own = getattr(model, "sample_latents", None)
    out = []
    with sampling_network(model, use_reference):
        for i in range(0, len(prompts), batch_size):
            ps, gs = prompts[i:i + batch_size], generators[i:i + batch_size]
            if own is not None:
                lat = own(ps, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=gs,
                          use_reference=use_reference)
            else:
                res = getattr(model, "resolution", None)
                kw = {"height": res, "width": res} if res else {}
                lat = model.pipe(ps, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 generator=gs, output_type="latent", **kw).images
            out.append(lat.float().cpu())
    return torch.cat(out)
