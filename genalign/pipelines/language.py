"""Language-model and video-language-model adapter over 🤗 transformers + peft.

- Loading: ``AutoModelForCausalLM`` (+ tokenizer) for text LMs; ``AutoModelForImageTextToText`` + ``AutoProcessor``
  for LLaVA-Video / LLaVA-OneVision / Qwen2-VL-style video-LMs. Hub ids are resolved from the local cache first; if
  the model is not cached and the hub is unreachable or ``HF_HUB_OFFLINE=1``, :class:`ModelUnavailableError` says how
  to provide it.
- LoRA through peft; the reference model is the same network with adapters disabled (``adapter_off``, README §4):
  :func:`reference_mode`.
- Tiny random builders of the same classes (:func:`build_tiny_llama`, :func:`build_tiny_qwen2_vl`) with a
  character-level tokenizer built from scratch (:func:`build_char_tokenizer`), so tests run offline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import string
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ModelUnavailableError",
    "LMBundle",
    "build_char_tokenizer",
    "build_tiny_llama",
    "build_tiny_qwen2_vl",
    "load_language_model",
    "lora_config",
    "apply_lora",
    "reference_mode",
    "build_lm_from_config",
    "VISION_SPECIAL_TOKENS",
    "LM_TARGET_MODULES",
    "tokenize_text",
    "tokenize_like_trl",
]

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
LM_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# LoRA on the language model only (vision tower and projector frozen) — RRPO run.sh [code]
VIDEO_LM_TARGET_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


class ModelUnavailableError(OSError):
    """A model id could not be resolved locally and the hub cannot be reached (offline or no network)."""


@dataclass
class LMBundle:
    """A loaded model and its processing class.

    Attributes:
        model: ``PreTrainedModel`` (optionally a ``PeftModel``).
        processing_class: tokenizer (``kind="causal"``) or processor (``kind="video"``).
        kind: ``"causal"`` or ``"video"``.
    """

    model: Any
    processing_class: Any
    kind: str

    @property
    def tokenizer(self):
        """The text tokenizer (the processor's tokenizer for video-LMs)."""
        return getattr(self.processing_class, "tokenizer", self.processing_class)


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


# --------------------------------------------------------------------------------------------------- loading
def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _unavailable(name: str, err: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"Cannot load model {name!r}: it is not a local directory and is not in the Hugging Face cache, and the hub "
        f"{'is disabled (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)' if _hub_offline() else 'could not be reached'}. "
        "Provide the model either (a) as a local path to a directory saved with save_pretrained() (config.json, "
        "weights, tokenizer/processor files) — set `model.name_or_path` to that path — or (b) by running once with "
        "network access (unset HF_HUB_OFFLINE) so it is downloaded into the cache (HF_HOME), or pre-download it with "
        f"`huggingface-cli download {name}`. For tests, use model.tiny: true (random tiny model). "
        f"Original error: {type(err).__name__}: {err}"
    )


def load_language_model(
    name_or_path: str,
    kind: str = "causal",
    dtype: str | torch.dtype | None = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> LMBundle:
    """Load a text LM (``kind="causal"``) or a video-LM (``kind="video"``) and its tokenizer / processor.

    Resolution order: local directory → local HF cache (``local_files_only=True``) → hub download (skipped when
    offline).

    Args:
        name_or_path: hub id or local directory.
        kind: ``"causal"`` (``AutoModelForCausalLM`` + ``AutoTokenizer``) or ``"video"``
            (``AutoModelForImageTextToText`` + ``AutoProcessor``, e.g. LLaVA-Video/OneVision, Qwen2-VL).
        dtype: torch dtype or its name (``"bfloat16"`` on GPU recommended, README §5); ``"auto"`` keeps the config's.
        revision, trust_remote_code, attn_implementation: forwarded to ``from_pretrained``.

    Returns:
        :class:`LMBundle`. The tokenizer gets ``pad_token = eos_token`` if it had none.

    Raises:
        ModelUnavailableError: not local, not cached, and the hub is offline/unreachable (message says how to
            provide it).
        ValueError: unknown ``kind``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    if kind not in ("causal", "video"):
        raise ValueError(f"kind must be 'causal' or 'video', got {kind!r}")
    model_cls = AutoModelForCausalLM if kind == "causal" else AutoModelForImageTextToText
    proc_cls = AutoTokenizer if kind == "causal" else AutoProcessor
    kw: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation

    def _load(local_only: bool):
        proc = proc_cls.from_pretrained(name_or_path, local_files_only=local_only, revision=revision,
                                        trust_remote_code=trust_remote_code)
        model = model_cls.from_pretrained(name_or_path, local_files_only=local_only, **kw)
        return model, proc

    if os.path.isdir(name_or_path):
        model, proc = _load(True)
    else:
        try:
            model, proc = _load(True)
        except (OSError, ValueError) as err:
            if _hub_offline():
                raise _unavailable(name_or_path, err) from err
            try:
                model, proc = _load(False)
            except Exception as err2:  # network errors come in many types
                raise _unavailable(name_or_path, err2) from err2
    tok = getattr(proc, "tokenizer", proc)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LMBundle(model, proc, kind)


# --------------------------------------------------------------------------------------------------- LoRA
def lora_config(
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    bias: str = "none",
    kind: str = "causal",
):
    """A ``peft.LoraConfig`` for causal-LM fine-tuning.

    Args:
        r, alpha: LoRA rank and scaling numerator (RRPO LLaVA-Video recipe 128 / 256 [code]).
        dropout: LoRA dropout (function default 0; the RRPO LLaVA-Video recipe uses 0.05, the
            ``train_llavavideo.py`` default [code]; VideoChat2 0.05).
        target_modules: module names or a regex; default all attention/MLP projections, restricted to the
            language model for ``kind="video"`` (vision tower and projector stay frozen [code]).
        bias: ``"none"`` | ``"lora_only"`` | ``"all"`` (LongVU recipe ``lora_only``).

    Returns:
        ``peft.LoraConfig`` (``task_type="CAUSAL_LM"``). ``lm_head`` must not be a target (TRL's fused head reads
        its weight directly).
    """
    from peft import LoraConfig

    if target_modules is None:
        target_modules = VIDEO_LM_TARGET_REGEX if kind == "video" else list(LM_TARGET_MODULES)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias=bias,
                      task_type="CAUSAL_LM")


def apply_lora(model, config=None, **kwargs):
    """Wrap ``model`` with a fresh LoRA adapter (B = 0, so policy ≡ base at step 0).

    Args:
        model: a ``PreTrainedModel``. config: a ``peft.PeftConfig``; if None, ``lora_config(**kwargs)``.

    Returns:
        ``peft.PeftModel``; only adapter weights require grad.
    """
    from peft import get_peft_model

    return get_peft_model(model, config if config is not None else lora_config(**kwargs))


@contextlib.contextmanager
def reference_mode(model):
    """Context in which ``model`` computes the reference policy: adapters disabled, eval mode, no grad.

    For a ``PeftModel`` the adapters are disabled (``adapter_off`` strategy, README §4); for a plain model this is
    only eval + no_grad (use a frozen copy as reference instead). Training mode is restored on exit.

    Yields:
        the model.
    """
    was_training = model.training
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else (
        contextlib.nullcontext()
    )
    model.eval()
    try:
        with torch.no_grad(), ctx:
            yield model
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------- config
def build_lm_from_config(model_cfg: dict) -> LMBundle:
    """Build an :class:`LMBundle` from the ``model:`` block of a genalign LM config.

    Keys: ``kind`` (``causal``|``video``), ``name_or_path``, ``dtype``, ``revision``, ``trust_remote_code``,
    ``attn_implementation``; or ``tiny: true`` (+ ``tiny_kwargs``) for a random tiny Llama / Qwen2-VL with the
    character tokenizer (``extra_special_tokens`` may add e.g. ``<MASK>``).

    Raises:
        ModelUnavailableError / ValueError: see :func:`load_language_model`.
    """
    kind = model_cfg.get("kind", "causal")
    if model_cfg.get("tiny"):
        tk = dict(model_cfg.get("tiny_kwargs") or {})
        if kind == "video":
            model, proc = build_tiny_qwen2_vl(**tk)
            return LMBundle(model, proc, kind)
        tok = build_char_tokenizer(extra_special_tokens=model_cfg.get("extra_special_tokens", ()))
        return LMBundle(build_tiny_llama(tok, **tk), tok, kind)
    if "name_or_path" not in model_cfg:
        raise ValueError("model config needs `name_or_path` (hub id or local dir) or `tiny: true`")
    return load_language_model(
        model_cfg["name_or_path"],
        kind=kind,
        dtype=model_cfg.get("dtype", "float32"),
        revision=model_cfg.get("revision"),
        trust_remote_code=model_cfg.get("trust_remote_code", False),
        attn_implementation=model_cfg.get("attn_implementation"),
    )


# --------------------------------------------------------------------------------------------------- tokenisation
def tokenize_text(processing_class, text, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a plain string (``processing_class(text=...)``, the tokenizer's own special tokens) or of a
    conversation (a list of ``{"role", "content"}`` messages through the chat template), as TRL 1.16 tokenises
    dataset rows. ``add_generation_prompt`` applies to conversations only."""
    if isinstance(text, list):
        out = processing_class.apply_chat_template(text, tokenize=True, return_dict=True,
                                                   add_generation_prompt=add_generation_prompt)["input_ids"]
    else:
        out = processing_class(text=text)["input_ids"]
    if out and isinstance(out[0], list):  # processors keep a batch dimension
        out = out[0]
    return list(out)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_like_trl(processing_class, example: dict) -> dict:
    """Tokenise one preference row exactly as TRL 1.16 ``DPOTrainer._prepare_dataset`` does.

    Plain-text rows get the EOS token appended to ``chosen`` / ``rejected`` (if missing); the completion starts at
    the common prefix of the tokenised prompt and prompt+completion (conversations: the prompt with the generation
    prompt).

    Returns:
        ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (lists of ints).
    """
    tok = getattr(processing_class, "tokenizer", processing_class)
    ex = dict(example)
    conv = isinstance(ex["prompt"], list)
    if not conv:
        for k in ("chosen", "rejected"):
            if not ex[k].endswith(tok.eos_token):
                ex[k] = ex[k] + tok.eos_token
    p = tokenize_text(processing_class, ex["prompt"], add_generation_prompt=True)
    pc = tokenize_text(processing_class, ex["prompt"] + ex["chosen"])
    pr = tokenize_text(processing_class, ex["prompt"] + ex["rejected"])
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return {"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}
