"""Architectures for ``genalign plan``: real model configs (shipped, local or from the hub) built on the meta device,
LoRA injected with peft, parameters counted."""


from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any



MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "model_configs"
GIB = 1024**3

# Peak dense bf16 tensor FLOP/s (vendor datasheets, without sparsity).
GPUS = {"H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12, "RTX4090": 165e12,
        "cpu": 1e12}
MFU = 0.40  # assumed model FLOP utilisation for the step-time estimate
CUDA_CONTEXT = 1.0 * GIB  # CUDA context + cuBLAS/cuDNN workspaces + allocator slack (a common rule of thumb)

PAIR_OBJECTIVES = ("mapo", "diffusion_dpo", "dpo", "sft", "rpo")  # 2B rows per forward (winners; losers)
DEFAULT_LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]



class PlanError(RuntimeError):
    """The run would not start (unknown model offline, unreadable data, sequence too long); one line."""


@dataclass
class Component:
    """One network of the run: its meta module, role and parameter counts."""

    name: str
    role: str  # "trainable" | "frozen" | "reward"
    module: Any
    total: int = 0
    trainable: int = 0
    note: str = ""


@dataclass
class Plan:
    """Everything ``genalign plan`` prints; memory in bytes per GPU, ``fits`` / ``problems`` decide the exit code."""

    config: str
    model: str
    components: list[Component] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    flops_per_step: float = 0.0
    step_seconds: float = 0.0
    gpu: str = "A100"
    gpus: int = 1
    gpu_memory: float = 80.0
    parallelism: str = "ddp"
    rows_per_forward: int = 0
    shape: str = ""
    data: list[str] = field(default_factory=list)
    sequence: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    trace: bool = True

    @property
    def peak(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory * GIB and not self.problems


# -- model configs ----------------------------------------------------------------------------------------------


def shipped_config(model: str) -> dict | None:
    """The shipped architecture spec for a hub id (or alias, or ``reward:<name>``), or None."""
    for f in sorted(MODEL_CONFIGS.glob("*.json")):
        spec = json.loads(f.read_text())
        if model == spec["model"] or model in spec.get("aliases", []):
            spec["file"] = f.name
            return spec
    return None


def _library(entry: list) -> str:
    """The library of a ``model_index.json`` entry: ``transformers``, else ``diffusers`` (pipeline-local modules
    such as ``["audioldm2", "AudioLDM2UNet2DConditionModel"]`` or ``["stable_audio", ...]`` are diffusers classes)."""
    return "transformers" if entry[0] == "transformers" else "diffusers"


def _folder_spec(folder: Path) -> dict:
    """A Diffusers pipeline folder (``model_index.json`` + ``<component>/config.json``) → spec."""
    index = json.loads((folder / "model_index.json").read_text())
    comps = {}
    for name, val in index.items():
        if name.startswith("_") or not isinstance(val, list) or val[0] is None:
            continue
        cfg = folder / name / "config.json"
        if cfg.exists():
            comps[name] = {"library": _library(val), "class": val[1], "config": json.loads(cfg.read_text())}
    return {"model": str(folder), "source": f"local folder {folder}", "components": comps}


def _hub_spec(model: str) -> dict:
    """Config files from the hub (``model_index.json`` + components, or a transformers ``config.json``)."""
    from huggingface_hub import hf_hub_download

    try:
        index = json.loads(Path(hf_hub_download(model, "model_index.json")).read_text())
    except Exception:
        cfg = json.loads(Path(hf_hub_download(model, "config.json")).read_text())
        return {"model": model, "source": f"hub {model} config.json",
                "components": {"model": {"library": "transformers", "class": "AutoModelForCausalLM", "config": cfg}}}
    comps = {}
    for name, val in index.items():
        if name.startswith("_") or not isinstance(val, list) or val[0] is None or "scheduler" in name:
            continue
        with contextlib.suppress(Exception):
            cfg = json.loads(Path(hf_hub_download(model, f"{name}/config.json")).read_text())
            comps[name] = {"library": _library(val), "class": val[1], "config": cfg}
    return {"model": model, "source": f"hub {model}", "components": comps}


def architecture(model: str, online: bool = False, lm_tiny: dict | None = None) -> dict:
    """Resolve ``pipeline.model`` to an architecture spec ``{"model", "source", "components": {name: {library,
    class, config}}}``: shipped JSON → local folder / built-ins → hub (``online``).

    Raises:
        PlanError: no shipped config and offline (the message names the model and the way out).
    """
    spec = shipped_config(model)
    if spec is not None:
        return spec
    if model == "builtin:digits":
        from genalign.pipelines.digits import DIGITS_DIR

        return _folder_spec(DIGITS_DIR)
    if model == "builtin:music":
        from genalign.pipelines.music import MUSIC_DIR

        if (MUSIC_DIR / "model_index.json").exists():
            return _folder_spec(MUSIC_DIR)
        raise PlanError(f"pipeline.model: builtin:music: not built at {MUSIC_DIR}")
    if model.startswith("tiny:"):
        return _tiny_spec(model)
    if model == "tiny":
        tk = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, **(lm_tiny or {})}
        cfg = {"model_type": "llama", "hidden_size": tk["hidden_size"], "intermediate_size": tk["intermediate_size"],
               "num_hidden_layers": tk["num_layers"], "num_attention_heads": tk["num_heads"],
               "num_key_value_heads": tk["num_heads"], "vocab_size": 128, "max_position_embeddings": 4096}
        return {"model": "tiny", "source": "genalign tiny Llama (pipeline.tiny)",
                "components": {"model": {"library": "transformers", "class": "AutoModelForCausalLM", "config": cfg}}}
    if Path(model).is_dir() and (Path(model) / "model_index.json").exists():
        return _folder_spec(Path(model))
    if Path(model).is_dir() and (Path(model) / "config.json").exists():
        cfg = json.loads((Path(model) / "config.json").read_text())
        return {"model": model, "source": f"local folder {model}",
                "components": {"model": {"library": "transformers", "class": "AutoModelForCausalLM", "config": cfg}}}
    if online:
        try:
            return _hub_spec(model)
        except Exception as err:
            raise PlanError(f"pipeline.model: {model!r}: cannot read its config from the hub ({type(err).__name__})") from None
    raise PlanError(f"pipeline.model: {model!r}: no shipped config (genalign/assets/model_configs) and offline; "
                    "run `genalign plan --online` or give a local folder")


def _tiny_spec(model: str) -> dict:
    from genalign.pipelines import tiny

    pipe = tiny.tiny_sdxl_pipeline() if model == "tiny:sdxl" else tiny.tiny_sd_pipeline()
    comps = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            lib = "diffusers" if hasattr(m.config, "keys") and type(m).__module__.startswith("diffusers") else "transformers"
            cfg = dict(m.config) if lib == "diffusers" else m.config.to_dict()
            comps[name] = {"library": lib, "class": type(m).__name__, "config": cfg}
    return {"model": model, "source": "genalign.pipelines.tiny", "components": comps}


def build_meta(comp: dict):
    """One component spec → an ``nn.Module`` on the meta device (no memory, no weights).

    ``library`` is ``diffusers`` / ``transformers`` (a hub config), ``genalign`` (a genalign module, ``class`` its
    dotted path, ``config`` its keyword arguments, e.g. the LAION / ImageReward MLP head) or ``composite`` (an
    ``nn.ModuleDict`` of the component specs in ``config``, for reward models assembled from several towers).

    Source: ``accelerate.init_empty_weights``; Diffusers ``from_config`` / Transformers ``AutoConfig.for_model``.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = _build(comp)
    _tie_weights(module)
    return module


def _tie_weights(module) -> None:
    """Tie shared weights (T5's ``encoder.embed_tokens`` ↔ ``shared``, tied LM heads) of every transformers model in
    ``module``. Done outside ``init_empty_weights``: inside it accelerate's patched ``register_parameter`` re-wraps
    the tied parameter, so the two names would stay two tensors and the shared weight be counted twice."""
    from transformers import PreTrainedModel

    for sub in module.modules():
        if isinstance(sub, PreTrainedModel):
            with contextlib.suppress(Exception):
                sub.tie_weights()


def _build(comp: dict):
    """:func:`build_meta` without the meta context (composites recurse through it)."""
    lib = comp["library"]
    if lib == "composite":
        from torch import nn

        return nn.ModuleDict({name: _build(part) for name, part in comp["config"].items()})
    if lib == "genalign":
        import importlib

        module, _, name = comp["class"].rpartition(".")
        if not module.startswith("genalign."):
            raise ValueError(f"library genalign: {comp['class']!r} is not a genalign class")
        return getattr(importlib.import_module(module), name)(**comp.get("config", {}))
    if lib == "diffusers":
        import diffusers

        return getattr(diffusers, comp["class"]).from_config(comp["config"])
    return _build_transformers(comp)


def _build_transformers(comp: dict):
    """A transformers model from its config dict (``init_kwargs``: extra constructor arguments)."""
    import transformers

    cfg = dict(comp["config"])
    cfg.pop("architectures", None)
    cls = getattr(transformers, comp["class"])
    config = _transformers_config(cls, cfg)
    if comp["class"].startswith("Auto"):
        return cls.from_config(config)
    return cls(config, **comp.get("init_kwargs", {}))


def _transformers_config(cls, cfg: dict):
    """``AutoConfig.for_model`` when the config names its ``model_type``; the class's own config class when it does
    not, or when the name is a legacy one this transformers no longer maps (AudioLDM2's vocoder: ``hifigan``)."""
    import transformers

    if "model_type" in cfg:
        try:
            return transformers.AutoConfig.for_model(**cfg)
        except (ValueError, KeyError):
            if getattr(cls, "config_class", None) is None:
                raise
    return cls.config_class(**{k: v for k, v in cfg.items() if k != "model_type"})


def count_params(module) -> tuple[int, int]:
    """(total, trainable) parameter counts, shared parameters once."""
    seen, total, train = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return total, train


def add_lora(module, rank: int, alpha: float | None, targets: list[str] | str | None, lm: bool):
    """Freeze ``module`` and inject peft LoRA layers (meta) → the module (trainable = LoRA only)."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    targets = targets or (DEFAULT_LM_TARGETS if lm else ["to_q", "to_k", "to_v", "to_out.0"])
    with init_empty_weights(include_buffers=False):
        return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets), module)


# -- tracing -------------------------------------------------------------------------------------------------
