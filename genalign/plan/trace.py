"""One traced training step on meta tensors for ``genalign plan``: activation bytes saved for backward (attention as
a fused kernel) and FLOPs (``torch.utils.flop_counter``), gradient checkpointing included."""


from __future__ import annotations

import contextlib

import torch



class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA while tracing: output like q, saves what flash / memory-efficient kernels keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa_flops(q, k, v):
    # Why: FlopCounterMode cannot see inside the stand-in; count the two matmuls (×3 for fwd + bwd).
    b = q.numel() // (q.shape[-2] * q.shape[-1])
    return 2 * 2 * b * q.shape[-2] * k.shape[-2] * q.shape[-1]


@contextlib.contextmanager
def _fused_attention(counter: list):
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention: expand k/v heads as the kernel would
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        # self-attention (its cost grows with tokens²) in counter[0], cross-attention (tokens × text) in [1]
        counter[0 if k.shape[-2] == q.shape[-2] else 1] += _fused_sdpa_flops(q, k, v) * 3
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    torch.nn.functional.scaled_dot_product_attention = sdpa
    mu = orig_packed = None
    with contextlib.suppress(ImportError):
        # Why: transformers inspects position ids for packed sequences with .item(), impossible on meta tensors;
        # a plain causal batch has none.
        import transformers.masking_utils as mu

        orig_packed = mu.find_packed_sequence_indices
        mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig
        torch.nn.functional.scaled_dot_product_attention = orig
        if orig_packed is not None:
            mu.find_packed_sequence_indices = orig_packed


def _block_modules(module) -> list:
    out = []
    for name, m in module.named_modules():
        parent = name.rsplit(".", 2)
        if len(parent) >= 2 and parent[-2] in ("resnets", "attentions", "transformer_blocks", "layers", "blocks") \
                and parent[-1].isdigit():
            out.append(m)
    return out


def trace_step(module, inputs: dict, loss_fn, dtype: torch.dtype, checkpointing: bool) -> tuple[int, float]:
    """One forward + backward of ``module`` on meta ``inputs`` → (activation bytes at the backward peak, FLOPs
    outside self-attention, self-attention FLOPs).

    ``loss_fn(output) -> scalar``. Under ``checkpointing`` the network's own gradient checkpointing is switched on;
    the block inputs it keeps and the largest block's recomputation (from an unchecked pass) are added.
    """
    from torch.utils.flop_counter import FlopCounterMode

    module.to(dtype)  # frozen weights in the weight dtype, activations in the compute dtype (autocast's effect)
    params = {p.untyped_storage()._cdata for p in module.parameters()}  # weights are not activations

    def run(ckpt: bool, per_block: list | None = None):
        saved: dict[int, int] = {}

        def pack(t):
            with contextlib.suppress(Exception):
                s = t.untyped_storage()
                if s._cdata not in params:
                    saved[s._cdata] = s.nbytes()
            return t

        hooks = []
        if ckpt:  # the checkpoint keeps each block's inputs alive until backward
            def pre(_m, args, kwargs):
                for a in list(args) + list(kwargs.values()):
                    if torch.is_tensor(a):
                        pack(a)
            hooks = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in _block_modules(module)]
        if per_block is not None:
            def pre2(_m, _a):
                _m._plan_before = sum(saved.values())

            def post2(_m, _a, _o):
                per_block.append(sum(saved.values()) - _m._plan_before)
            for b in _block_modules(module):
                hooks += [b.register_forward_pre_hook(pre2), b.register_forward_hook(post2)]
        _set_checkpointing(module, ckpt)
        module.train()
        attn = [0, 0]
        # Why count once: FlopCounterMode dispatches every op through Python (most of plan's run time).
        fc = FlopCounterMode(display=False) if not ckpt else contextlib.nullcontext()
        with fc, _fused_attention(attn):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = module(**inputs)
                loss = loss_fn(out)
            loss.backward()
        for h in hooks:
            h.remove()
        _set_checkpointing(module, False)
        total = fc.get_total_flops() if not ckpt else 0
        return sum(saved.values()), float(total + attn[1]), float(attn[0])

    if not checkpointing:
        return run(False)
    blocks: list[int] = []
    full, flops, attn_flops = run(False, blocks)
    saved, _, _ = run(True)
    # Recomputation adds about one forward: a third of forward + backward.
    return min(full, saved + (max(blocks) if blocks else 0)), flops * 4 / 3, attn_flops * 4 / 3


def scaled_trace(module, make_inputs, loss_fn, dtype, checkpointing: bool, rows: int, size: int, small: int,
                 quadratic: bool) -> tuple[float, float]:
    """:func:`trace_step` at 1 row and ``min(size, small)``, scaled to ``rows`` × ``size`` → (bytes, FLOPs).

    Activations (with fused attention) and non-attention FLOPs grow linearly with rows × tokens; self-attention
    FLOPs with rows × tokens². Tokens ∝ size² for images (``quadratic``), ∝ size for sequences.
    """
    s0 = min(size, small)
    act, flops, attn = trace_step(module, make_inputs(1, s0), loss_fn, dtype, checkpointing)
    k = (size / s0) ** (2 if quadratic else 1)
    return act * rows * k, (flops * k + attn * k * k) * rows


def _set_checkpointing(module, on: bool) -> None:
    with contextlib.suppress(Exception):
        if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
            module.enable_gradient_checkpointing() if on else module.disable_gradient_checkpointing()
        elif hasattr(module, "gradient_checkpointing_enable"):  # transformers
            if on:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                module.gradient_checkpointing_disable()


def meta_tensor(*shape, dtype=torch.float32):
    """An empty tensor of ``shape`` on the meta device (shapes and dtypes only, no memory)."""
    return torch.empty(*shape, device="meta", dtype=dtype)


def diffusion_inputs(spec: dict, unet, rows: int, resolution: int, dtype) -> dict:
    """Meta inputs for a UNet2DConditionModel training forward at ``resolution`` pixels."""
    c = unet.config
    vae = spec["components"].get("vae", {}).get("config", {})
    down = 2 ** (len(vae.get("block_out_channels", [1])) - 1)
    h = max(1, resolution // down)
    text_len = spec.get("text_length", 77)
    inputs = {"sample": meta_tensor(rows, c.in_channels, h, h, dtype=dtype), "timestep": torch.zeros(rows, device="meta", dtype=torch.long),
              "encoder_hidden_states": meta_tensor(rows, text_len, c.cross_attention_dim, dtype=dtype)}
    if getattr(c, "addition_embed_type", None) == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": meta_tensor(rows, pooled, dtype=dtype),
                                       "time_ids": meta_tensor(rows, 6, dtype=dtype)}
    return inputs


def dit_inputs(spec: dict, dit, rows: int, frames: int, dtype) -> dict:
    """Meta inputs for a ``StableAudioDiTModel`` training forward over ``frames`` latent frames: the text tokens +
    the two seconds tokens as cross-attention states, the global seconds embedding, and the rotary table
    ``StableAudioPipeline`` builds (``attention_head_dim // 2``, frames + 1 for the prepended global token)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    c = dit.config
    text_len = spec.get("text_length", 128) + 2
    rot = get_1d_rotary_pos_embed(c.attention_head_dim // 2, frames + 1, use_real=True, repeat_interleave_real=False)
    return {"hidden_states": meta_tensor(rows, c.in_channels, frames, dtype=dtype),
            "timestep": meta_tensor(rows, dtype=dtype),
            "encoder_hidden_states": meta_tensor(rows, text_len, c.cross_attention_input_dim, dtype=dtype),
            "global_hidden_states": meta_tensor(rows, 1, c.global_states_input_dim, dtype=dtype),
            "rotary_embedding": tuple(r.to(device="meta", dtype=torch.float32) for r in rot)}


def audioldm2_inputs(spec: dict, unet, rows: int, dtype, text_length: int = 64) -> tuple[dict, str]:
    """Meta inputs for an ``AudioLDM2UNet2DConditionModel`` training forward over the AudioLDM2 adapter's default
    window (1,024 mel frames = 10.24 s at 16 kHz; 32 latent rows below 16 kHz): GPT-2's generated states
    (``max_new_tokens`` × the second cross-attention width) and ``text_length`` T5 tokens (× the third; an
    assumption: prompts are padded to the longest in the batch). Returns (inputs, shape description)."""
    comps = spec["components"]
    voc = comps.get("vocoder", {}).get("config", {})
    mel, sr = int(voc.get("model_in_dim", 64)), int(voc.get("sampling_rate", 16_000))
    scale = 2 ** (len(comps.get("vae", {}).get("config", {}).get("block_out_channels", [1] * 3)) - 1)
    frames = 1024 if sr >= 16_000 else 32 * scale
    gpt = int(comps.get("language_model", {}).get("config", {}).get("max_new_tokens", 8))
    c = unet.config
    ca = c.cross_attention_dim[0] if isinstance(c.cross_attention_dim, (list, tuple)) else c.cross_attention_dim
    dims = [d for d in ca if d is not None] if isinstance(ca, (list, tuple)) else [ca]  # [GPT-2 width, T5 width]
    gpt_dim, t5_dim = dims[0], dims[-1]
    inputs = {"sample": meta_tensor(rows, c.in_channels, frames // scale, mel // scale, dtype=dtype),
              "timestep": torch.zeros(rows, device="meta", dtype=torch.long),
              "encoder_hidden_states": meta_tensor(rows, gpt, gpt_dim, dtype=dtype),
              "encoder_hidden_states_1": meta_tensor(rows, text_length, t5_dim, dtype=dtype),
              "encoder_attention_mask_1": torch.ones(rows, text_length, device="meta", dtype=torch.long)}
    return inputs, f"{rows} rows × {frames} mel frames ({frames // scale}×{mel // scale} latents, {c.in_channels} ch)"
