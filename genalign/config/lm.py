"""The sections of a language-model run config (``pipeline.name: language | video_language``, trained on TRL)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from genalign.config.base import Int, Seed, Strict, yaml_no_as_string
from genalign.config.diffusion import ObjectiveConfig


LM_PIPELINES = ("language", "video_language")


class LMLoraConfig(Strict):
    """LoRA for (video-)LMs through peft (``null`` = full fine-tune; the reference is then a frozen copy)."""

    rank: Int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16, gt=0, description="lora_alpha")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(
        None, description="names or a regex; None = attention/MLP projections (video: language model only)")
    bias: Literal["none", "lora_only", "all"] = "none"


class LMPipelineConfig(Strict):
    """Which (video-)language model: ``name: language`` (causal LM) or ``video_language`` (video-LM)."""

    name: Literal["language", "video_language"]
    model: str = Field("tiny", description="tiny (random tiny Llama / Qwen2-VL, tests) | hub id | local folder")
    tiny: dict[str, int] = Field(default_factory=dict, description="tiny architecture kwargs (hidden_size, ...)")
    extra_special_tokens: list[str] = Field(default_factory=list, description="tiny char tokenizer extras")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    lora: LMLoraConfig | None = Field(default_factory=LMLoraConfig)
    reference: Literal["adapter_off", "frozen_copy"] = Field(
        "adapter_off", description="adapter_off (LoRA disabled) | frozen_copy (needed without LoRA)")


class SyntheticLMData(Strict):
    """Synthetic ``a+b=`` preference pairs (chosen: the sum; rejected: one digit changed) for smoke runs."""

    kind: Literal["arithmetic"] = "arithmetic"
    n_train: Int = Field(64, ge=1)
    n_eval: Int = Field(16, ge=0)
    seed: Seed = 0


class LMDataConfig(Strict):
    """Preference rows for LMs: ``train`` / ``eval`` jsonl (``prompt``, ``chosen``, ``rejected`` [+ ``video``, tag
    columns, token rewards]) or ``synthetic``; tokenisation length; video frame sampling and prompt rendering."""

    train: str | None = None
    eval: str | None = None
    synthetic: SyntheticLMData | None = None
    max_length: Int = Field(1024, ge=8, description="prompt + completion tokens (video: expanded video tokens too)")
    video_root: str | None = None
    num_frames: Int = Field(16, ge=1)
    frame_sampling: Literal["official", "linspace"] = Field(
        "official", description="official: int(i*n/k) (RRPO force_sample) | linspace(0, n-1, k)")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="video prompts through the processor's chat template (auto: when it has one)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.train is None) == (self.synthetic is None):
            raise ValueError("give exactly one of data.train (jsonl path) or data.synthetic")
        return self


class LMTrainConfig(Strict):
    """The TRL loop (``trl.DPOConfig`` is built from these; ``trl`` passes further DPOConfig fields through)."""

    steps: Int | None = Field(None, ge=1, description="optimizer steps; None = `epochs` passes over the data")
    epochs: float = Field(1.0, gt=0)
    batch_size: Int = Field(8, ge=1, description="pairs per device per micro-step")
    gradient_accumulation_steps: Int = Field(1, ge=1)
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Annotated[Literal["auto", "no", "fp16", "bf16"], BeforeValidator(yaml_no_as_string)] = Field(
        "auto", description="auto: bf16 on a bf16-capable GPU, fp32 on CPU")
    gradient_checkpointing: bool = False
    checkpoint_every: Int = Field(0, ge=0, description="checkpoint every N steps; 0 = only at the end")
    checkpoints_total_limit: Int | None = Field(2, ge=1)
    log_every: Int = Field(1, ge=1)
    preflight: bool = Field(True, description="run genalign plan's data / sequence / GPU-memory checks before "
                            "loading weights (genalign.plan.preflight)")
    trl: dict[str, Any] = Field(default_factory=dict, description="extra trl.DPOConfig fields (checked by name)")


class LMExportConfig(Strict):
    """``RUN_DIR/export``: merged weights + processor (``AutoModel*.from_pretrained``) and ``adapter/``."""

    enabled: bool = True
    merge_lora: bool = True
    report: bool = Field(True, description="write RUN_DIR/report.html (summary, training curves, config)")


class LMRunConfig(Strict):
    """A language-model run (pipeline family ``language`` / ``video_language``). Load with :func:`load_config`."""

    seed: Seed = 0
    pipeline: LMPipelineConfig
    data: LMDataConfig
    objective: ObjectiveConfig = Field(default_factory=lambda: ObjectiveConfig(name="dpo"))
    train: LMTrainConfig = Field(default_factory=LMTrainConfig)
    export: LMExportConfig = Field(default_factory=LMExportConfig)

    @property
    def family(self) -> str:
        """``"lm"``: trained by :mod:`genalign.training.lm`."""
        return "lm"

    def objective_params(self):
        """The objective's typed config object (its ``Config`` class instance)."""
        from genalign.registry import objectives

        cls = objectives.get(self.objective.name)
        return cls.Config.model_validate(self.objective.model_extra or {})
