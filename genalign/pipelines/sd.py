"""Stable Diffusion 1.x / 2.x adapter (epsilon and v-prediction): one CLIP text encoder, last hidden state.

Source: Diffusers ``StableDiffusionPipeline.encode_prompt`` (reused, not re-implemented).
"""

from __future__ import annotations

from typing import Any

import torch

from genalign.pipelines.base import DiffusionAdapter
from genalign.registry import pipelines as PIPELINES


@PIPELINES.register("sd", "Stable Diffusion 1.x/2.x (and the built-in digits model): UNet + CLIP text encoder")
class SDAdapter(DiffusionAdapter):
    """Adapter for ``StableDiffusionPipeline`` folders (SD 1.x, SD 2.x-v, builtin:digits, tiny:sd)."""

    family = "sd"

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.pipe.text_encoder]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """``B`` prompts → ``{"encoder_hidden_states": (B, 77 or model_max_length, D)}`` (last hidden state)."""
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"encoder_hidden_states": embeds.float()}
