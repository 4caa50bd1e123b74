"""Shared pieces of the text-to-music adapters (:mod:`genalign.pipelines.audio`, :mod:`genalign.pipelines.audioldm2`).

:class:`AudioAdapterMixin` holds what both adapters share: LoRA / reference construction, the adapter verbs the
trainer and objectives call (``denoiser``, ``use_prepared``, ``reference``, ``fold_lora``, ``write_export``,
``sample``), and the merged fp32 export (audio pipelines have no Diffusers LoRA loader). Also: the tiny word-level
tokenizer and T5 encoder of the tiny builders, and the integer → fractional timestep map.

Source: peft (LoRA injection), Diffusers ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from genalign.pipelines.lora import merge_lora_into_base, write_merged_export


SYNTH_WORDS = ("a slow medium fast tone chord rhythm in C D E F G A B piano guitar drums music song with beat "
               "bass high low loud soft").split()


def tiny_word_tokenizer(words=tuple(SYNTH_WORDS), model_max_length: int = 16):
    """A word-level ``PreTrainedTokenizerFast`` (``<pad>``=0, ``</s>``=1, ``<unk>``=2, then ``words``; case kept).

    Stands in for T5's SentencePiece tokenizer in tiny builds; saves / reloads offline.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    """A 1-layer ``T5EncoderModel`` (d_model 32, 2 heads) for the tiny builders, seeded."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=1))


def to_dtype(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Move a module to ``device``, casting to ``dtype`` only when it differs (Diffusers warns on every cast)."""
    p = next(module.parameters(), None)
    return module.to(torch.device(device)) if p is not None and p.dtype == dtype else module.to(device, dtype=dtype)


def set_adapters_enabled(net: torch.nn.Module, enabled: bool) -> None:
    """Enable / disable every LoRA layer (diffusers ``enable_adapters`` when present, else peft's tuner layers)."""
    if hasattr(net, "disable_adapters") and hasattr(net, "enable_adapters") and hasattr(net, "peft_config"):
        (net.enable_adapters if enabled else net.disable_adapters)()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in net.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


def timestep_fraction(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Integer timesteps k → t = (k + ½)/T; floating t is returned as float32 unchanged."""
    if t.is_floating_point():
        return t.float()
    return (t.float() + 0.5) / num_train_timesteps


class AudioAdapterMixin:
    """Shared construction (LoRA / reference strategy) and verbs of the audio adapters."""

    family = "audio"
    pipe_denoiser = "unet"
    lora_folded = False  # set by fold_lora
    audio_channels = 1  # waveform channels the VAE / vocoder produce
    _raw_unet: torch.nn.Module | None = None  # set by use_prepared: the unwrapped denoiser

    def _setup_trainable(self, net, lora, reference: str, device, weight_dtype, gradient_checkpointing: bool):
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.lora = lora
        self.unet = net
        for m in self.frozen_modules():
            m.requires_grad_(False)
            m.eval()
            m.to(self.device)
        self.ref_unet = None
        if reference == "none":  # inference only (genalign generate): no reference network
            lora = None
        elif reference == "frozen_copy":
            self.ref_unet = to_dtype(copy.deepcopy(net).requires_grad_(False).eval(), self.device, weight_dtype)
        elif lora is None:
            raise ValueError("pipeline.reference: 'adapter_off' needs LoRA (pipeline.lora); use 'frozen_copy' for "
                             "full fine-tuning")
        if lora is not None:
            from peft import LoraConfig as PeftLoraConfig

            net.requires_grad_(False)
            to_dtype(net, self.device, weight_dtype)
            pcfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank,
                                  init_lora_weights=lora.init if lora.init == "gaussian" else True,
                                  target_modules=list(lora.target_modules), lora_dropout=lora.dropout)
            if hasattr(net, "add_adapter"):
                net.add_adapter(pcfg)
            else:  # StableAudioDiTModel has no PeftAdapterMixin: inject the LoRA layers directly
                from peft import inject_adapter_in_model

                inject_adapter_in_model(pcfg, net)
            for p in net.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        elif reference == "none":
            to_dtype(net, self.device, weight_dtype).requires_grad_(False)
        else:
            to_dtype(net, self.device, torch.float32).requires_grad_(True)
        if gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
            net.enable_gradient_checkpointing()
        net.train()
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)

    @property
    def clip_samples(self) -> int:
        """Waveform samples of one clip in the denoiser's window (``audio_seconds · sample_rate``)."""
        return int(round(self.audio_seconds * self.sample_rate))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """LoRA weights, or the whole denoiser for full fine-tunes."""
        return [p for p in self.denoiser().parameters() if p.requires_grad]

    def denoiser(self) -> torch.nn.Module:
        """The trained DiT / UNet, unwrapped (never the DDP wrapper)."""
        return self._raw_unet if self._raw_unet is not None else self.unet

    def use_prepared(self, module: torch.nn.Module) -> None:
        """Install the Accelerate-wrapped denoiser for training forwards."""
        if self._raw_unet is None:
            self._raw_unet = self.unet
        self.unet = module

    def model_card_extra(self, cfg) -> str:
        """No extra model-card section for audio exports."""
        return ""

    @contextlib.contextmanager
    def reference(self) -> Iterator[Any]:
        """The reference denoiser under ``no_grad``: LoRA disabled (default) or the frozen copy."""
        with torch.no_grad():
            if self.ref_unet is not None:
                yield self.ref_unet
                return
            net = self.denoiser()
            set_adapters_enabled(net, False)
            try:
                yield net
            finally:
                set_adapters_enabled(net, True)

    @contextlib.contextmanager
    def skip_zero_adapters(self) -> Iterator[None]:
        """Disable LoRA for the block while every LoRA up-projection is zero (it adds nothing); otherwise a no-op."""
        net = self.denoiser()
        ups = [p for n, p in net.named_parameters() if "lora_B" in n]
        if not ups or any(bool(p.detach().ne(0).any()) for p in ups):
            yield
            return
        set_adapters_enabled(net, False)
        try:
            yield
        finally:
            set_adapters_enabled(net, True)

    def pair_extra_cond(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {}

    def save_unet(self, out_dir) -> None:
        self.denoiser().save_pretrained(out_dir)

    def fold_lora(self, lora_state: dict[str, torch.Tensor] | None = None, reset: bool = True) -> int:
        """Fold the LoRA into the denoiser's base weights in fp32 (:func:`~genalign.pipelines.lora.merge_lora_into_base`)
        and record it, so :meth:`write_export` no longer writes a LoRA file that would not describe the model.
        Returns the number of LoRA layers folded."""
        init = getattr(self.lora, "init", "gaussian")
        count = merge_lora_into_base(self.denoiser(), lora_state, reset, init if init == "gaussian" else True)
        self.lora_folded = self.lora_folded or count > 0
        return count

    def write_export(self, out_dir, cfg=None) -> None:
        """Export (``genalign.export``): the whole pipeline with every LoRA (and earlier fold) merged into a fresh fp32
        denoiser, loadable with ``DiffusionPipeline.from_pretrained``; plus, while the LoRA has not been folded, the
        LoRA alone as ``genalign_lora.safetensors`` (peft names). Audio pipelines have no Diffusers LoRA loader, so
        the image path (``save_lora_weights``) does not apply. The fold is computed in fp32 and cast once."""
        write_merged_export(self.pipe, self.denoiser(), self.pipe_denoiser, out_dir)
        if self.lora is not None and not self.lora_folded:
            state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self.denoiser()).items()}
            save_file(state, str(Path(out_dir) / "genalign_lora.safetensors"))

    @torch.no_grad()
    def sample(self, prompts: list[str], num_inference_steps: int = 25, guidance_scale: float = 1.0,
               generator=None, batch_size: int = 16, **kwargs) -> torch.Tensor:
        """Waveforms ``(N, C, T)`` in [−1, 1] (float32 CPU), seeded (a list of N generators, or one)."""
        gens = generator if isinstance(generator, list) else [generator] * len(prompts)
        out = []
        for i in range(0, len(prompts), batch_size):
            lat = self.sample_latents(prompts[i:i + batch_size], num_inference_steps, guidance_scale,
                                      gens[i:i + batch_size])
            out.append(self.decode(lat.to(self.device)).float().cpu())
        return torch.cat(out)
