"""Tiny random (video-)language models with a character tokenizer built from scratch, for offline tests and smoke
runs: a ``LlamaForCausalLM`` and a ``Qwen2VLForConditionalGeneration`` + processor (with a ChatML template)."""

from __future__ import annotations

import string

import torch

__all__ = ["build_char_tokenizer", "build_tiny_llama", "build_tiny_qwen2_vl", "VISION_SPECIAL_TOKENS",
           "CHATML_TOKENS", "TINY_CHATML_TEMPLATE"]

VISION_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
# A ChatML conversation template with a default system prompt and Qwen2-VL's vision placeholders (the layout of
# Qwen2 / LLaVA-Video's ``qwen_1_5`` conversation), so the tiny video-LM is a "chat model" like the real ones.
TINY_CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# --------------------------------------------------------------------------------------------------- tokenizer
def build_char_tokenizer(
    chars: str | None = None,
    extra_special_tokens: list[str] | tuple[str, ...] = (),
    model_max_length: int = 2048,
):
    """A character-level ``PreTrainedTokenizerFast`` built from scratch (no download).

    Every character of ``chars`` (default: printable ASCII incl. space and newline) is one token; special tokens
    ``<pad>`` (id 0), ``<s>``, ``</s>``, ``<unk>`` and ``extra_special_tokens`` are matched before splitting. No BOS
    is added automatically (so a prompt's ids are a prefix of prompt+completion ids, as TRL assumes).

    Args:
        chars: characters of the vocabulary. extra_special_tokens: e.g. ``["<MASK>", "</MASK>"]`` or
            :data:`VISION_SPECIAL_TOKENS`. model_max_length: stored on the tokenizer.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with ``pad/bos/eos/unk`` set; ``len(tok)`` is the vocab size.

    Library: ``tokenizers`` (WordLevel model + per-character ``Split`` pre-tokenizer, ``Fuse`` decoder).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *extra_special_tokens]
    chars = chars if chars is not None else "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
    vocab: dict[str, int] = {}
    for tok in specials + list(dict.fromkeys(chars)):
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    if extra_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return tok


# --------------------------------------------------------------------------------------------------- tiny models
def build_tiny_llama(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
):
    """A randomly initialised ``LlamaForCausalLM`` sized for CPU tests.

    Args:
        tokenizer: its ``len()`` sets the vocabulary; pad/bos/eos ids are copied into the config.
        hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings: architecture.
        seed: ``torch.manual_seed`` before init, for reproducibility.

    Returns:
        ``LlamaForCausalLM`` in float32, train mode, untied embeddings.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_qwen2_vl(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_depth: int = 1,
    vision_embed_dim: int = 32,
    frame_size: int = 56,
    seed: int = 0,
    chat_template: bool = True,
):
    """A randomly initialised ``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor`` (offline).

    The processor wraps :func:`build_char_tokenizer` (with the Qwen2-VL vision tokens) and default-constructed
    Qwen2-VL image / video processors whose pixel budget is pinned to ``frame_size²`` so a frame of that size gives
    ``(frame_size/14)²/4`` merged tokens per 2 frames. With ``chat_template`` the processor carries a ChatML
    template with a system prompt (:data:`TINY_CHATML_TEMPLATE`), as chat checkpoints do.

    Returns:
        ``(model, processor)``; model in float32, LM head untied.

    Raises:
        ValueError: ``frame_size`` not a multiple of 28 (patch 14 × merge 2).
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    if frame_size % 28:
        raise ValueError(f"frame_size must be a multiple of 28, got {frame_size}")
    tok = build_char_tokenizer(extra_special_tokens=VISION_SPECIAL_TOKENS + CHATML_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_depth, embed_dim=vision_embed_dim, hidden_size=hidden_size, num_heads=2, mlp_ratio=2
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    pix = frame_size * frame_size
    size = {"shortest_edge": pix, "longest_edge": pix}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(size=size, do_sample_frames=False),
        chat_template=TINY_CHATML_TEMPLATE if chat_template else None,
    )
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor
