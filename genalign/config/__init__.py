"""The typed run config: YAML in, ``--set a.b=c`` overrides, one clear line per error.

``base`` (strict models, integer and seed types, :class:`ConfigError`) → ``diffusion`` (the sections of a diffusion
run) and ``lm`` (a language-model run on TRL) → ``loading`` (:func:`load_config`, :func:`save_config`). Every
public name is importable from ``genalign.config``.
"""

from genalign.config.base import ConfigError, Int, Seed, Strict
from genalign.config.diffusion import (DATA_SOURCES_BY_KIND, DataConfig, ExportConfig, ImagesData, LoraConfig,
                                       ObjectiveConfig, OnPolicyData, PipelineConfig, PreferenceData, PromptsData,
                                       RewardItem, RunConfig, TrainConfig, ValidationConfig)
from genalign.config.lm import (LM_PIPELINES, LMDataConfig, LMExportConfig, LMLoraConfig, LMPipelineConfig,
                                LMRunConfig, LMTrainConfig, SyntheticLMData)
from genalign.config.loading import apply_overrides, is_lm_data, load_config, save_config

__all__ = ["ConfigError", "Int", "Seed", "Strict", "DATA_SOURCES_BY_KIND", "DataConfig", "ExportConfig", "ImagesData",
           "LoraConfig", "ObjectiveConfig", "OnPolicyData", "PipelineConfig", "PreferenceData", "PromptsData",
           "RewardItem", "RunConfig", "TrainConfig", "ValidationConfig", "LM_PIPELINES", "LMDataConfig",
           "LMExportConfig", "LMLoraConfig", "LMPipelineConfig", "LMRunConfig", "LMTrainConfig", "SyntheticLMData",
           "apply_overrides", "is_lm_data", "load_config", "save_config"]
