"""The typed run config: YAML in, ``--set a.b=c`` overrides, one clear line per error.

A run config has the sections of the data flow: ``pipeline`` (what model, LoRA or full fine-tune, reference
strategy) → ``data`` (preference pairs, on-policy pairs, prompts) → ``objective`` (name + its own typed
hyperparameters, validated by the objective's ``Config`` class) → ``rewards`` (scoring / training signals) →
``train`` (the Accelerate loop) → ``validation`` → ``export``. Unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` with a single line naming the file, the key and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      model_validator)

from genalign.overrides import OverrideError, override_source, safe_user_yaml
from genalign.overrides import apply_overrides as _apply_overrides


# Which ``data.source.kind`` values feed each objective ``data_kind`` (objectives may set ``data_sources``).
DATA_SOURCES_BY_KIND = {"pairs": ("onpolicy", "preference"), "prompts": ("prompts",), "images": ("images",)}


def _not_bool(v: Any) -> Any:
    """YAML ``true`` is not a count: refuse booleans where an integer is expected (pydantic would read True as 1)."""
    if isinstance(v, bool):
        raise ValueError("expected an integer, got a boolean")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
Seed = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, lt=2**32, description="random seed in [0, 2**32)")]


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line: ``file: key: value: reason``."""


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Strict):
    """LoRA through peft. Defaults follow the MaPO / diffusers DPO LoRA recipes (rank 8, alpha = rank)."""

    rank: Int = Field(8, ge=1, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="lora_alpha; None = rank (scale 1)")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: float = Field(0.0, ge=0, lt=1)


class PipelineConfig(Strict):
    """Which generative model to align and how."""

    name: str = Field("sd", description="pipeline adapter: sd | sdxl | a plug-in")
    model: str = Field("builtin:digits", description="builtin:digits | tiny:sd | tiny:sdxl | local folder | hub id")
    revision: str | None = None
    vae: str | None = Field(None, description="replacement VAE folder / hub id, e.g. madebyollin/sdxl-vae-fp16-fix")
    resolution: Int | None = Field(None, ge=8, description="training resolution in pixels; None = the model's")
    lora: LoraConfig | None = Field(default_factory=LoraConfig, description="null = full fine-tune")
    reference: Literal["adapter_off", "frozen_copy", "none"] = Field(
        "adapter_off", description="adapter_off (LoRA disabled) | frozen_copy | none (MaPO, SFT: no reference)")
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    trust_remote_code: bool = False


class OnPolicyData(Strict):
    """Self-generated pairs (MaPO's on-policy setting): k samples per prompt, best vs worst by a reward."""

    kind: Literal["onpolicy"] = "onpolicy"
    prompts: str = Field("digits:train", description="digits:train | parti | path to a .txt/.tsv/.jsonl prompt file")
    samples_per_prompt: Int = Field(4, ge=2)
    rounds: Int = Field(1, ge=1, description="how many times each prompt is drawn (fresh seeds each time)")
    reward: str | None = Field(None, description="reward name used for ranking; None = first of `rewards`")
    min_reward_gap: float = Field(0.0, ge=0, description="drop pairs whose best-worst reward gap is smaller")
    num_inference_steps: Int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=0, description="CFG scale (1 = off); 5.0 = MaPO's validation value")


class PreferenceData(Strict):
    """Offline preference pairs: Pick-a-Pic v2 schema (parquet/arrow folder or hub id) or jsonl + images."""

    kind: Literal["preference"] = "preference"
    source: str = Field(..., description="folder (parquet/arrow/jsonl), a .jsonl file, or a `datasets` hub id")
    split: str = "train"
    ties: Literal["drop", "error"] = "drop"
    max_pairs: Int | None = Field(None, ge=1)
    pair_augment: Literal["joint", "independent"] = "joint"
    hflip: bool = True
    random_crop: bool = Field(False, description="MaPO --random_crop: uniform crop offset (else centre)")


class PromptsData(Strict):
    """Prompt-only data (DI*, R0, DRAGON online generation)."""

    kind: Literal["prompts"] = "prompts"
    prompts: str = Field("digits:train", description="digits:train | parti | parti:<Category> | prompt file")


class ImagesData(Strict):
    """Real images with captions (and optional condition images): DDO's real data, Ctrl-U's (image, condition).

    ``source``: ``digits:train`` (the real digits with digit prompts), a folder of images with ``metadata.jsonl``
    (``file_name``, ``prompt``, optional ``condition`` file) or a `datasets` hub id / parquet folder.
    """

    kind: Literal["images"] = "images"
    source: str = "digits:train"
    image_column: str = "image"
    caption_column: str = "prompt"
    condition_column: str | None = None
    max_images: Int | None = Field(None, ge=1)
    hflip: bool = False


def _source_kind(v: Any) -> str:
    """``kind`` of a data source; a mapping without ``kind`` is on-policy (the default)."""
    if isinstance(v, dict):
        return v.get("kind", "onpolicy")
    return getattr(v, "kind", "onpolicy")


class DataConfig(Strict):
    """Where training examples come from; ``cache_latents`` encodes images/text once (a step runs the UNet only)."""

    source: Annotated[Union[Annotated[OnPolicyData, Tag("onpolicy")], Annotated[PreferenceData, Tag("preference")],
                            Annotated[PromptsData, Tag("prompts")], Annotated[ImagesData, Tag("images")]],
                      Discriminator(_source_kind)] = Field(default_factory=OnPolicyData)
    cache_latents: bool = True
    num_workers: Int = Field(0, ge=0, description="DataLoader worker processes decoding streamed pairs")
    prefetch: Int = Field(2, ge=1, description="micro-batches each worker decodes ahead")
    proportion_empty_prompts: float = Field(0.0, ge=0, lt=1, description="caption dropout (SF-DPO 0.2, MaPO 0)")
    time_ids: Literal["per_sample", "fixed"] = Field(
        "per_sample", description="SDXL time_ids: per_sample (MaPO, diffusers) | fixed [res,res,0,0,res,res] (SF-DPO)")
    latent_sample: Literal["per_step", "frozen", "mean"] = Field(
        "per_step", description="VAE posterior: a fresh seeded draw per use (official loops) | one draw per image | mean")


class RewardItem(Strict):
    """One member of the composite reward."""

    name: str
    weight: float = 1.0
    normalize: Literal["none", "zscore", "rank", "running"] = "none"
    kwargs: dict[str, Any] = Field(default_factory=dict)


def _yaml_no(v: Any) -> Any:
    """YAML 1.1 reads a bare ``no`` as False; mean the string "no"."""
    return "no" if v is False else v


class TrainConfig(Strict):
    """The Accelerate loop."""

    steps: Int = Field(100, ge=0, description="optimizer steps")
    batch_size: Int = Field(8, ge=1, description="pairs (or samples) per device per micro-step")
    gradient_accumulation_steps: Int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = Field(
        "constant", description="diffusers.optimization.get_scheduler name; 'warmup' = constant_with_warmup")
    warmup_steps: Int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"] = Field(
        "adamw", description="adamw (torch) | adamw_8bit (bitsandbytes) | adafactor (transformers, Diffusion-DPO paper)")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    use_8bit_adam: bool = False
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Annotated[Literal["auto", "no", "fp16", "bf16"], BeforeValidator(_yaml_no)] = "auto"
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of trainable weights; None = off")
    checkpoint_every: Int = Field(0, ge=0, description="save_state every N steps; 0 = only at the end")
    checkpoints_total_limit: Int | None = Field(2, ge=1)
    log_every: Int = Field(10, ge=1)
    on_nan: Literal["halt", "skip"] = "halt"
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    num_threads: Int | None = Field(None, ge=1, description="torch CPU threads; None = OMP_NUM_THREADS if set, "
                                    "else the cores in this process's affinity mask")
    ddp_timeout_s: Int = Field(1800, ge=1, description="process-group timeout: a stalled rank ends the run after it")


class ValidationConfig(Strict):
    """Sampling on held-out prompts with reward scoring (also gives summary.json's before/after)."""

    prompts: str = Field("digits:heldout", description="digits:heldout | parti | prompt file path")
    max_prompts: Int | None = Field(None, ge=1)
    samples_per_prompt: Int = Field(4, ge=1)
    every: Int = Field(0, ge=0, description="validate every N steps; 0 = only before and after training")
    every_samples_per_prompt: Int | None = Field(
        None, ge=1, description="samples per prompt of the periodic validations (a cheap budget); None = samples_per_prompt")
    num_inference_steps: Int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=0, description="CFG scale (1 = off); 5.0 = MaPO's validation value")
    batch_size: Int = Field(16, ge=1)
    seed: Seed = 1234


class ExportConfig(Strict):
    """What is written to ``RUN_DIR/export`` at the end of training."""

    enabled: bool = True
    merge_lora: bool = True
    report: bool = Field(True, description="write RUN_DIR/report.html (before/after grids, reward curves)")
    push_to_hub: bool = Field(False, description="upload the export to the Hugging Face Hub (hub_model_id)")
    hub_model_id: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$", description="owner/name of the hub repo")
    hub_private: bool = Field(False, description="create the hub repo private")


class ObjectiveConfig(BaseModel):
    """``name`` plus the objective's own hyperparameters (validated by the registered objective's ``Config``)."""

    model_config = ConfigDict(extra="allow")
    name: str = "mapo"


class RunConfig(Strict):
    """A whole run. Load with :func:`load_config`."""

    seed: Seed = 0
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    rewards: list[RewardItem] = Field(default_factory=lambda: [RewardItem(name="digit_classifier")])
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    def objective_params(self):
        """The objective's typed config object (its ``Config`` class instance)."""
        from genalign.registry import objectives

        cls = objectives.get(self.objective.name)
        return cls.Config.model_validate(self.objective.model_extra or {})


# ------------------------------------------------------------------------------------------ language models (TRL)
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
    mixed_precision: Annotated[Literal["auto", "no", "fp16", "bf16"], BeforeValidator(_yaml_no)] = Field(
        "auto", description="auto: bf16 on a bf16-capable GPU, fp32 on CPU")
    gradient_checkpointing: bool = False
    checkpoint_every: Int = Field(0, ge=0, description="checkpoint every N steps; 0 = only at the end")
    checkpoints_total_limit: Int | None = Field(2, ge=1)
    log_every: Int = Field(1, ge=1)
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


def _is_lm(data: dict) -> bool:
    pipe = data.get("pipeline")
    return isinstance(pipe, dict) and pipe.get("name") in LM_PIPELINES


def _format_error(err: ValidationError, source: str, prefix: str = "") -> str:
    e = err.errors()[0]
    key = _error_key(err, prefix) or "(root)"
    value = e.get("input")
    if isinstance(value, dict):
        value = "{...}"
    msg = e["msg"].replace("\n", " ")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {value!r}: {msg}{more}"


_UNION_TAGS = ("onpolicy", "preference", "prompts", "images")


def _error_key(err: ValidationError, prefix: str = "") -> str:
    """The failing key as the user writes it: ``data.source.rounds`` (pydantic's union tags dropped), list
    elements by index (``rewards.0.weight``)."""
    # a key with a newline or control character is shown escaped, so the error stays one line
    loc = [str(p) if str(p).isprintable() else repr(str(p)) for p in err.errors()[0]["loc"]
           if str(p) not in _UNION_TAGS]
    return ".".join(([prefix] if prefix else []) + loc)


def _source_of(err: ValidationError, source: str, overrides: list[str] | None, prefix: str = "") -> str:
    """Name ``--set`` as the source when the failing key was overridden on the command line."""
    return override_source(_error_key(err, prefix), source, overrides)


def _schema_default(path: list[str]) -> Any:
    """The default (JSON form) of the config field at ``path`` (e.g. ``["rewards"]``), or None when none."""
    try:
        node: Any = RunConfig().model_dump(mode="json")
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node[p]
    except (ValidationError, KeyError, IndexError, ValueError, TypeError):
        return None
    return node


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """A copy of ``raw`` with ``--set`` overrides applied (:func:`genalign.overrides.apply_overrides`; a list the
    YAML leaves out, e.g. ``rewards``, starts from the schema's default).

    Raises:
        ConfigError: a malformed item or an index out of range (one line starting with ``--set ITEM:``).
    """
    try:
        return _apply_overrides(raw, overrides, _schema_default)
    except OverrideError as err:
        raise ConfigError(str(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> RunConfig | LMRunConfig:
    """Load and validate a run config.

    Args:
        path: YAML file (``None`` = all defaults: the digits quickstart).
        overrides: ``["train.steps=50", "pipeline.lora.rank=4", ...]``.
        data: a dict used instead of reading ``path`` (still reported as ``path`` in errors).

    Returns:
        the validated :class:`RunConfig`, or :class:`LMRunConfig` when ``pipeline.name`` is ``language`` /
        ``video_language`` (language-model objectives trained on TRL).

    Raises:
        ConfigError: missing/unparsable file, unknown key, wrong type, out-of-range value, unknown
            objective/reward name — one line naming the file, the key and the value.
    """
    source = str(path) if path else "<defaults>"
    if data is None and path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{source}: config file not found")
        if p.is_dir():
            raise ConfigError(f"{source}: is a folder, not a YAML config file")
        try:
            data = safe_user_yaml(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: not a text file (a YAML run config is expected)") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
    schema = LMRunConfig if _is_lm(data) else RunConfig
    try:
        cfg = schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, _source_of(err, source, overrides))) from None
    from genalign.registry import objectives, rewards

    try:
        obj_cls = objectives.get(cfg.objective.name)
    except KeyError as err:
        where = override_source("objective.name", source, overrides)
        raise ConfigError(f"{where}: objective.name: {cfg.objective.name!r}: {err.args[0]}") from None
    family = getattr(obj_cls, "family", "diffusion")

    def at(key: str) -> str:  # the file, or the --set item that set the key
        return override_source(key, source, overrides)

    if isinstance(cfg, LMRunConfig) and family != "lm":
        raise ConfigError(f"{at('objective.name')}: objective.name: {cfg.objective.name!r}: a diffusion objective; "
                          f"pipeline {cfg.pipeline.name!r} trains language-model objectives (dpo, rpo, fdpo, "
                          "treg, rrpo)")
    if not isinstance(cfg, LMRunConfig) and family == "lm":
        hint = "; for diffusion use diffusion_dpo" if cfg.objective.name == "dpo" else ""
        raise ConfigError(f"{at('objective.name')}: objective.name: {cfg.objective.name!r}: a language-model objective; set "
                          f"pipeline.name: language (or video_language){hint}")
    try:
        params = obj_cls.Config.model_validate(cfg.objective.model_extra or {})
    except ValidationError as err:
        where = _source_of(err, source, overrides, "objective")
        raise ConfigError(_format_error(err, where, prefix="objective")) from None
    if isinstance(cfg, LMRunConfig):
        if cfg.pipeline.name == "video_language" and not getattr(obj_cls, "video", False):
            raise ConfigError(f"{at('objective.name')}: objective.name: {cfg.objective.name!r}: video-LM training is implemented "
                              "for rrpo only")
        if cfg.pipeline.lora is None and cfg.pipeline.reference == "adapter_off":
            raise ConfigError(f"{at('pipeline.reference')}: pipeline.reference: 'adapter_off': a full fine-tune (lora: null) needs "
                              "reference: frozen_copy")
        cfg.objective = ObjectiveConfig(name=cfg.objective.name, **params.model_dump())
        return cfg
    if getattr(obj_cls, "needs_reference", False) and cfg.pipeline.reference == "none":
        raise ConfigError(f"{at('pipeline.reference')}: pipeline.reference: 'none': objective {cfg.objective.name!r} needs a reference "
                          "model (adapter_off with LoRA, or frozen_copy)")
    kinds = getattr(obj_cls, "data_sources", None) or DATA_SOURCES_BY_KIND.get(obj_cls.data_kind)
    if kinds and cfg.data.source.kind not in kinds:
        raise ConfigError(f"{at('data.source.kind')}: data.source.kind: {cfg.data.source.kind!r}: objective {cfg.objective.name!r} "
                          f"needs one of {', '.join(kinds)}")
    # Keep the validated, defaults-filled parameters so the saved config is fully resolved.
    cfg.objective = ObjectiveConfig(name=cfg.objective.name, **params.model_dump())
    for i, item in enumerate(cfg.rewards):
        if item.name not in rewards:
            raise ConfigError(f"{override_source(f'rewards.{i}.name', source, overrides)}: rewards.{i}.name: "
                              f"{item.name!r}: unknown reward; known: {', '.join(rewards.names())}")
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically: temp file then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
