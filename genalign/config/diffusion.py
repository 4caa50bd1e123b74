"""The sections of a diffusion run config, in the order of the data flow: ``pipeline`` → ``data`` → ``objective``
→ ``rewards`` → ``train`` → ``validation`` → ``export``."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from genalign.config.base import Int, Seed, Strict, yaml_no_as_string

# Which ``data.source.kind`` values feed each objective ``data_kind`` (objectives may set ``data_sources``).
DATA_SOURCES_BY_KIND = {"pairs": ("onpolicy", "preference"), "prompts": ("prompts",), "images": ("images",)}


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
    mixed_precision: Annotated[Literal["auto", "no", "fp16", "bf16"], BeforeValidator(yaml_no_as_string)] = "auto"
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of trainable weights; None = off")
    checkpoint_every: Int = Field(0, ge=0, description="save_state every N steps; 0 = only at the end")
    checkpoints_total_limit: Int | None = Field(2, ge=1)
    log_every: Int = Field(10, ge=1)
    on_nan: Literal["halt", "skip"] = "halt"
    preflight: bool = Field(True, description="run genalign plan's data / sequence / GPU-memory checks before "
                            "loading weights (genalign.plan.preflight)")
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
    set_rewards: list[RewardItem] = Field(
        default_factory=list, description="set rewards (fad-dataset, vendi) scored once over all the validation "
                                          "samples, e.g. FD to held-out real data; shown next to `rewards` in "
                                          "summary.json (weight / normalize unused)")


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
