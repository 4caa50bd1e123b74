"""SDXL adapter: two text encoders (penultimate hidden states concatenated), pooled embeddings from encoder 2,
and micro-conditioning ``time_ids = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` per example.

Source: Diffusers ``StableDiffusionXLPipeline.encode_prompt`` (reused); MaPO / Diffusion-DPO official SDXL
training code for the per-sample ``time_ids`` (mapo.md §5, diffusion_dpo.md §5).
"""

from __future__ import annotations

from typing import Any

import torch

from genalign.pipelines.base import DiffusionAdapter
from genalign.registry import pipelines as PIPELINES


def make_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning ids ``(B, 6)`` = [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (pixels)."""
    b = original_sizes.shape[0]
    target = torch.tensor(target_size, dtype=torch.float32).expand(b, 2)
    return torch.cat([original_sizes.float(), crop_top_lefts.float(), target], dim=1)


@PIPELINES.register("sdxl", "Stable Diffusion XL: two text encoders, pooled embeddings, micro-conditioning time_ids")
class SDXLAdapter(DiffusionAdapter):
    """Adapter for ``StableDiffusionXLPipeline`` folders (SDXL base 1.0, tiny:sdxl)."""

    family = "sdxl"

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.pipe.text_encoder, self.pipe.text_encoder_2]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """``B`` prompts → ``{"encoder_hidden_states": (B, 77, 2048), "text_embeds": (B, 1280)}`` for SDXL base.

        ``time_ids`` are added per example by :meth:`pair_extra_cond` (default: no crop, original = target size).
        """
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        b = embeds.shape[0]
        time_ids = make_time_ids(torch.full((b, 2), self.resolution), torch.zeros(b, 2), (self.resolution,) * 2)
        return {"encoder_hidden_states": embeds.float(), "text_embeds": pooled.float(), "time_ids": time_ids.to(self.device)}

    def pair_extra_cond(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``time_ids`` from the batch's ``original_sizes`` / ``crop_top_lefts`` (B, 2) when present."""
        if "original_sizes" not in batch:
            return {}
        ids = make_time_ids(batch["original_sizes"], batch["crop_top_lefts"], (self.resolution,) * 2)
        return {"time_ids": ids.to(self.device)}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], unet=None) -> torch.Tensor:
        unet = unet or self.unet
        dtype = self.weight_dtype
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return unet(x_t.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                    added_cond_kwargs=added).sample
