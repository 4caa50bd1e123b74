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
from dataclasses import dataclass
from typing import Any

import torch

from genalign.pipelines.tiny_lm import (  # re-exported: the tiny builders were defined here
    VISION_SPECIAL_TOKENS,
    build_char_tokenizer,
    build_tiny_llama,
    build_tiny_qwen2_vl,
)

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


# --------------------------------------------------------------------------------------------------- registry
from genalign.registry import pipelines as PIPELINES  # noqa: E402


@PIPELINES.register("language", "Causal LMs (transformers + peft LoRA), preference-trained on TRL")
class LanguagePipeline:
    """The ``pipeline.name: language`` family: :func:`build_lm_from_config` with ``kind="causal"``; trained by
    :mod:`genalign.training.lm` (the config section is :class:`genalign.config.LMPipelineConfig`)."""

    family = "lm"
    kind = "causal"


@PIPELINES.register("video_language", "Video-LMs (LLaVA-Video/OneVision, Qwen2-VL; LoRA on the LLM), preference-trained on TRL")
class VideoLanguagePipeline(LanguagePipeline):
    """The ``pipeline.name: video_language`` family: ``AutoModelForImageTextToText`` + ``AutoProcessor``, video rows
    through :class:`genalign.data.video.VideoPreferenceCollator`."""

    kind = "video"
