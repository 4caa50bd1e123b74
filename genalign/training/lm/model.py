"""Build the (video-)LM, its processor, the LoRA config and the reference from a typed :class:`LMRunConfig`."""

from __future__ import annotations

import copy

from genalign.pipelines.language import LMBundle, build_lm_from_config, lora_config

__all__ = ["build_bundle", "peft_and_reference"]


def build_bundle(cfg) -> LMBundle:
    """The run's model + processing class (``pipeline.model: tiny`` = random tiny Llama / Qwen2-VL).

    Raises:
        ModelUnavailableError: a hub id not obtainable offline (the message says how to provide it).
    """
    p = cfg.pipeline
    kind = "video" if p.name == "video_language" else "causal"
    if p.model == "tiny":
        mcfg = {"kind": kind, "tiny": True, "tiny_kwargs": dict(p.tiny),
                "extra_special_tokens": list(p.extra_special_tokens)}
    else:
        mcfg = {"kind": kind, "name_or_path": p.model, "dtype": p.dtype, "revision": p.revision,
                "trust_remote_code": p.trust_remote_code, "attn_implementation": p.attn_implementation}
    bundle = build_lm_from_config(mcfg)
    if bundle.tokenizer.pad_token is None:
        bundle.tokenizer.pad_token = bundle.tokenizer.eos_token
    return bundle


def peft_and_reference(cfg, model, kind: str):
    """``(peft_config or None, ref_model or None)``: LoRA with the adapter-off reference, or (full fine-tune /
    ``reference: frozen_copy``) a frozen deep copy of the initial model."""
    lc = cfg.pipeline.lora
    peft_config = None
    if lc is not None:
        peft_config = lora_config(r=lc.rank, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                                  bias=lc.bias, kind=kind)
    ref_model = None
    if cfg.pipeline.reference == "frozen_copy":
        ref_model = copy.deepcopy(model).eval()
        for q in ref_model.parameters():
            q.requires_grad_(False)
    return peft_config, ref_model
