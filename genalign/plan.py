"""``genalign plan``: a pre-flight for a run config — does it fit, how long a step takes, will the data load.

The configured networks are built on the meta device (``accelerate.init_empty_weights``: shapes, no weights) from
real model configs that genalign ships (``genalign/assets/model_configs/*.json``, each with its source), a local
Diffusers folder (``builtin:digits``, ``tiny:*``), or — with ``online=True`` — the hub's config files. LoRA is
injected with peft on the meta network, so trainable counts are exact. One training forward + backward of the
trainable network is then *traced* on meta tensors at the configured batch × resolution (or sequence length):

- activation memory = the bytes autograd saves for backward (``saved_tensors_hooks``, one count per storage),
  plus, with gradient checkpointing, the block inputs it keeps and the largest block's recomputation;
  attention is traced as a fused (flash / memory-efficient) kernel that saves q, k, v, output and log-sum-exp —
  what SDPA keeps on a GPU, not the L×L matrix of the math fallback;
- FLOPs = ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward (recomputation included).

Peak memory per GPU = frozen weights (weight dtype) + trainable master weights (fp32) + their autocast copies
(full fine-tune) + gradients (fp32) + optimizer state (AdamW 8 B/param, 8-bit AdamW 2 B/param, Adafactor the
factored row + column statistics) + reference network (``frozen_copy``: a copy in the weight dtype; adapter-off
and none: 0) + activations + CUDA context. DDP adds a gradient bucket copy; ZeRO-2 divides gradients and optimizer
state by the number of GPUs; FSDP (full shard) divides weights, gradients and optimizer state. Step time =
FLOPs per optimizer step / (GPU peak dense bf16 FLOP/s × an assumed 40 % utilisation) — an estimate.

The memory model is checked against measurement by ``benchmarks/plan_memory.py`` (real-size SD-1.5 UNet, CPU,
bf16, MaPO LoRA step) and ``tests/test_plan.py`` (tiny architecture).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MODEL_CONFIGS = Path(__file__).resolve().parent / "assets" / "model_configs"
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


def _folder_spec(folder: Path) -> dict:
    """A Diffusers pipeline folder (``model_index.json`` + ``<component>/config.json``) → spec."""
    index = json.loads((folder / "model_index.json").read_text())
    comps = {}
    for name, val in index.items():
        if name.startswith("_") or not isinstance(val, list) or val[0] is None:
            continue
        cfg = folder / name / "config.json"
        if cfg.exists():
            lib = "diffusers" if val[0] == "diffusers" else "transformers"
            comps[name] = {"library": lib, "class": val[1], "config": json.loads(cfg.read_text())}
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
            comps[name] = {"library": "diffusers" if val[0] == "diffusers" else "transformers", "class": val[1],
                           "config": cfg}
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

    Source: ``accelerate.init_empty_weights``; Diffusers ``from_config`` / Transformers ``AutoConfig.for_model``.
    """
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if comp["library"] == "diffusers":
            return getattr(diffusers, comp["class"]).from_config(comp["config"])
        cfg = dict(comp["config"])
        cfg.pop("architectures", None)
        cls = getattr(transformers, comp["class"])
        if "model_type" in cfg:
            config = transformers.AutoConfig.for_model(**cfg)
        else:  # a config.json without model_type: the class's own config class
            config = cls.config_class(**cfg)
        m = cls.from_config(config) if comp["class"].startswith("Auto") else cls(config)
        with contextlib.suppress(Exception):
            m.tie_weights()
        return m


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


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def diffusion_inputs(spec: dict, unet, rows: int, resolution: int, dtype) -> dict:
    """Meta inputs for a UNet2DConditionModel training forward at ``resolution`` pixels."""
    c = unet.config
    vae = spec["components"].get("vae", {}).get("config", {})
    down = 2 ** (len(vae.get("block_out_channels", [1])) - 1)
    h = max(1, resolution // down)
    text_len = spec.get("text_length", 77)
    inputs = {"sample": _meta(rows, c.in_channels, h, h, dtype=dtype), "timestep": torch.zeros(rows, device="meta", dtype=torch.long),
              "encoder_hidden_states": _meta(rows, text_len, c.cross_attention_dim, dtype=dtype)}
    if getattr(c, "addition_embed_type", None) == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": _meta(rows, pooled, dtype=dtype),
                                       "time_ids": _meta(rows, 6, dtype=dtype)}
    return inputs


def _weights_bytes(module, frozen_bytes: int) -> tuple[float, float]:
    """(frozen bytes at the weight dtype, trainable params) of ``module``."""
    frozen = trainable = 0
    seen = set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel() * frozen_bytes
    return frozen, trainable


def _adafactor_state(module) -> int:
    """Adafactor (factored, no momentum) state in floats: rows + cols per matrix, full for vectors."""
    n = 0
    for p in module.parameters():
        if p.requires_grad:
            n += (p.shape[-2] + p.shape[-1]) * (p.numel() // (p.shape[-2] * p.shape[-1])) if p.dim() >= 2 else p.numel()
    return n


# -- the plan ------------------------------------------------------------------------------------------------------
def plan(config_path: str | None, overrides: list[str] | None = None, gpus: int = 1, gpu_memory: float = 80.0,
         gpu: str = "A100", parallelism: str = "ddp", online: bool = False, check_data: bool = True,
         device: str = "cuda", spec: dict | None = None, require_data: bool = False, trace: bool = True) -> Plan:
    """Build the pre-flight :class:`Plan` of a run config (see module docstring).

    Args:
        gpus / gpu_memory (GiB) / gpu (a key of :data:`GPUS`) / parallelism ("ddp" | "zero2" | "fsdp").
        online: read configs of unshipped hub models from the hub.
        device: "cuda" adds the CUDA context; "cpu" (the benchmark) leaves it out.
        spec: an architecture spec to use instead of resolving ``pipeline.model`` (benchmarks, tests).
        require_data: a data file / folder that does not exist is a problem (default: a warning line).
        trace: False skips the meta forward/backward (no activation or FLOP figures; parameter items only).

    Raises:
        genalign.config.ConfigError: an invalid config. PlanError: a model that cannot be resolved.
    """
    from genalign.config import load_config

    cfg = load_config(config_path, overrides)
    is_lm = getattr(cfg, "family", "diffusion") == "lm"
    if gpu not in GPUS:
        raise PlanError(f"--gpu {gpu!r}: unknown; known: {', '.join(GPUS)}")
    p = Plan(config=str(config_path), model=cfg.pipeline.model, gpu=gpu, gpus=gpus, gpu_memory=gpu_memory,
             parallelism=parallelism)
    p.trace = trace
    (_plan_lm if is_lm else _plan_diffusion)(cfg, p, online, device, spec)
    _shard(p, parallelism, gpus)
    if check_data:
        (_check_lm_data if is_lm else _check_data)(cfg, p, require=require_data)
    if p.peak > gpu_memory * GIB:
        p.problems.insert(0, f"estimated peak {p.peak / GIB:.1f} GiB per GPU > --gpu-memory {gpu_memory:g} GiB")
    return p


def _precision(mp: str) -> tuple[torch.dtype, int]:
    if mp in ("auto", "bf16"):
        return torch.bfloat16, 2
    if mp == "fp16":
        return torch.float16, 2
    return torch.float32, 4


def _optimizer_bytes(tcfg, module, trainable: int) -> tuple[float, str]:
    name = getattr(tcfg, "optimizer", None) or ("adamw_8bit" if getattr(tcfg, "use_8bit_adam", False) else "adamw")
    if getattr(tcfg, "use_8bit_adam", False) and name == "adamw":
        name = "adamw_8bit"
    if name == "adamw_8bit":
        return 2.0 * trainable, "8-bit AdamW"
    if name == "adafactor":
        return 4.0 * _adafactor_state(module), "Adafactor"
    return 8.0 * trainable, "AdamW"


def _plan_diffusion(cfg, p: Plan, online: bool, device: str, spec: dict | None = None) -> None:
    from genalign.registry import objectives

    pc, tcfg = cfg.pipeline, cfg.train
    spec = spec or architecture(pc.model, online)
    p.notes.append(f"model config: {spec.get('file', spec['source'])}")
    dtype, wbytes = _precision(tcfg.mixed_precision)
    obj = objectives.get(cfg.objective.name)
    comps = spec["components"]
    main = "unet" if "unet" in comps else "transformer" if "transformer" in comps else next(iter(comps))
    trainable_mod = build_meta(comps[main])
    if pc.name == "controlnet":
        from accelerate import init_empty_weights

        from genalign.pipelines.controlnet import controlnet_from_unet

        vae_blocks = comps.get("vae", {}).get("config", {}).get("block_out_channels", [1])
        with init_empty_weights(include_buffers=False):
            control = controlnet_from_unet(trainable_mod, vae_scale_factor=2 ** (len(vae_blocks) - 1))
        trainable_mod.requires_grad_(False)
        p.components.append(Component(main, "frozen", trainable_mod, *count_params(trainable_mod)))
        main, trainable_mod = "controlnet", control
    elif pc.lora is not None:
        trainable_mod = add_lora(trainable_mod, pc.lora.rank, pc.lora.alpha, pc.lora.target_modules, lm=False)
    p.components.append(Component(main, "trainable", trainable_mod, *count_params(trainable_mod),
                                  note="LoRA r=%d" % pc.lora.rank if pc.lora is not None and pc.name != "controlnet"
                                  else "full"))
    for name, c in comps.items():
        if name in (main, "scheduler", "unet" if pc.name == "controlnet" else "") or "scheduler" in name:
            continue
        try:
            m = build_meta(c)
        except Exception as err:  # an unusual component: say it is not counted rather than fail the plan
            p.notes.append(f"{name} ({c['class']}): not built on meta ({type(err).__name__}); not counted")
            continue
        m.requires_grad_(False)
        p.components.append(Component(name, "frozen", m, *count_params(m)))
    extra_trainable = 0
    if cfg.objective.name == "di_star":  # the fake-score network is a second trainable copy
        extra_trainable = p.components[0].trainable if pc.name != "controlnet" else 0
        p.components.append(Component("fake_score", "trainable", None, p.components[0].total, extra_trainable,
                                      "DI* fake score (copy of the generator)"))
    for item in cfg.rewards:
        rs = shipped_config(f"reward:{item.name}")
        if rs is None:
            p.notes.append(f"reward {item.name}: size not modelled (no shipped config)")
            continue
        m = build_meta(rs["components"]["model"])
        m.requires_grad_(False)
        p.components.append(Component(f"reward:{item.name}", "reward", m, *count_params(m)))
    # memory
    frozen = sum(c.total * wbytes for c in p.components if c.role in ("frozen", "reward"))
    fb, trainable = _weights_bytes(trainable_mod, wbytes)
    trainable += extra_trainable
    mem = p.memory
    mem["frozen weights"] = frozen + fb
    mem["trainable weights (fp32)"] = 4.0 * trainable
    if pc.lora is None and dtype != torch.float32:
        mem["autocast weight copies"] = float(wbytes * trainable)
    mem["gradients (fp32)"] = 4.0 * trainable
    opt, opt_name = _optimizer_bytes(tcfg, trainable_mod, trainable)
    mem[f"optimizer ({opt_name})"] = opt
    ref = pc.reference
    if ref == "frozen_copy":
        mem["reference (frozen copy)"] = float(p.components[0].total * wbytes)
    rows = tcfg.batch_size * (2 if cfg.objective.name in PAIR_OBJECTIVES else 1)
    down = 2 ** (len(comps.get("vae", {}).get("config", {}).get("block_out_channels", [1])) - 1)
    unet_cfg = (comps.get("unet") or comps.get(main) or next(iter(comps.values())))["config"]
    sample = unet_cfg.get("sample_size", 64)
    res = pc.resolution or (sample[0] if isinstance(sample, (list, tuple)) else sample) * down
    p.rows_per_forward, p.shape = rows, f"{rows} rows × {res}×{res} px"
    if not p.trace:
        flops = 0.0
    elif main in ("unet", "controlnet") and comps.get("unet", {}).get("class") == "UNet2DConditionModel":
        unet_for_inputs = trainable_mod if main == "unet" else p.components[0].module

        def make_inputs(r, side):
            inputs = diffusion_inputs(spec, unet_for_inputs, r, side * down, dtype)
            if main == "controlnet":
                inputs["controlnet_cond"] = _meta(r, 3, side * down, side * down, dtype=dtype)
            return inputs

        if main == "controlnet":
            def loss_fn(out):
                return sum(t.float().sum() for t in out.down_block_res_samples) + out.mid_block_res_sample.float().sum()
        else:
            def loss_fn(out):
                return out.sample.float().pow(2).mean()
        act, flops = scaled_trace(trainable_mod, make_inputs, loss_fn, dtype, pc.gradient_checkpointing, rows,
                                  max(1, res // down), 16, quadratic=True)
        mem["activations (traced)"] = float(act)
        if needs_ref_pass(obj, ref):  # a no-grad forward of the reference ≈ one forward of the policy
            flops += flops / (2 if pc.lora is not None else 3)
        if cfg.objective.name == "di_star":
            p.notes.append("DI*: generator-phase activations through teacher, fake score, VAE and reward not traced")
    else:
        flops = 0.0
        mem["activations"] = 0.0
        p.notes.append(f"{main} ({comps[main]['class']}): activations and FLOPs not traced (UNet / LM only)")
        p.shape = f"{rows} rows"
    if device == "cuda":
        mem["CUDA context + workspace"] = CUDA_CONTEXT
    accum = tcfg.gradient_accumulation_steps
    p.flops_per_step = flops * accum
    p.step_seconds = p.flops_per_step / (GPUS[p.gpu] * MFU) if flops else 0.0


def needs_ref_pass(obj, reference: str) -> bool:
    return bool(getattr(obj, "needs_reference", False)) and reference != "none"


def _plan_lm(cfg, p: Plan, online: bool, device: str, spec: dict | None = None) -> None:
    pc, tcfg, d = cfg.pipeline, cfg.train, cfg.data
    spec = spec or architecture(pc.model, online, lm_tiny=dict(pc.tiny))
    p.notes.append(f"model config: {spec.get('file', spec['source'])}")
    mp = tcfg.mixed_precision
    dtype, wbytes = _precision(mp)
    comp = spec["components"]["model"]
    m = build_meta(comp)
    if pc.lora is not None:
        m = add_lora(m, pc.lora.rank, pc.lora.alpha, pc.lora.target_modules, lm=True)
    total, trainable = count_params(m)
    p.components.append(Component("model", "trainable", m, total, trainable,
                                  f"LoRA r={pc.lora.rank}" if pc.lora is not None else "full"))
    fb, _ = _weights_bytes(m, wbytes)
    mem = p.memory
    mem["frozen weights"] = fb
    mem["trainable weights (fp32)"] = 4.0 * trainable
    if pc.lora is None and dtype != torch.float32:
        mem["autocast weight copies"] = float(wbytes * trainable)
    mem["gradients (fp32)"] = 4.0 * trainable
    mem["optimizer (AdamW)"] = 8.0 * trainable
    if pc.lora is None or pc.reference == "frozen_copy":
        mem["reference (frozen copy)"] = float(total * wbytes)
        p.components.append(Component("reference", "frozen", None, total, 0, "frozen copy"))
    rows, L = 2 * tcfg.batch_size, d.max_length
    p.rows_per_forward, p.shape = rows, f"{rows} rows × {L} tokens"
    text_cfg = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    vocab = text_cfg.vocab_size
    lm = m

    def make_inputs(r, length):
        return {"input_ids": torch.zeros(r, length, dtype=torch.long, device="meta")}

    def loss_fn(out):
        return out.logits.float().log_softmax(-1)[..., 0].sum()

    try:
        if not p.trace:
            raise NotImplementedError("trace=False")
        if hasattr(m, "language_model") or hasattr(getattr(m, "model", None), "language_model"):
            # Video-LMs: trace the language model on embeddings (the vision tower runs on frames, not traced).
            lm = m.model.language_model if hasattr(m.model, "language_model") else m.language_model
            head = m.lm_head

            def make_inputs(r, length):  # noqa: F811
                return {"inputs_embeds": _meta(r, length, text_cfg.hidden_size, dtype=dtype)}

            def loss_fn(out):  # noqa: F811
                return head(out.last_hidden_state).float().log_softmax(-1)[..., 0].sum()
            p.notes.append("video-LM: vision tower activations not traced (language model + LM head only)")
        act, flops = scaled_trace(lm, make_inputs, loss_fn, dtype, tcfg.gradient_checkpointing, rows, L, 128,
                                  quadratic=False)
    except Exception as err:  # an architecture the meta trace cannot run: say so, use logits only
        act, flops = rows * L * vocab * 4 * 2, 6.0 * total * rows * L
        p.notes.append(f"LM trace failed ({type(err).__name__}); activations = logits only, FLOPs = 6·N·tokens")
    mem["activations (traced)"] = float(act)
    mem["reference logits (transient)"] = float(rows * L * vocab * 4)
    flops += flops / (2 if pc.lora is not None else 3)  # the reference forward (every LM objective here has one)
    if device == "cuda":
        mem["CUDA context + workspace"] = CUDA_CONTEXT
    p.flops_per_step = flops * tcfg.gradient_accumulation_steps
    p.step_seconds = p.flops_per_step / (GPUS[p.gpu] * MFU)
    _sequence_checks(cfg, p, spec)


def _shard(p: Plan, parallelism: str, gpus: int) -> None:
    mem = p.memory
    if gpus <= 1:
        return
    if parallelism == "ddp":
        mem["DDP gradient buckets"] = mem.get("gradients (fp32)", 0.0)
    elif parallelism in ("zero2", "fsdp"):
        for k in list(mem):
            if k.startswith("gradients") or k.startswith("optimizer"):
                mem[k] /= gpus
        if parallelism == "fsdp":
            for k in list(mem):
                if k.startswith(("frozen weights", "trainable weights", "autocast", "reference (")):
                    mem[k] /= gpus
    else:
        raise PlanError(f"--parallelism {parallelism!r}: use ddp, zero2 or fsdp")


# -- data & sequences ------------------------------------------------------------------------------------------------
def _missing(p: Plan, what: str, require: bool) -> None:
    """A data file / folder that does not exist yet: a problem with ``require_data``, else a warning (recipes
    point at data the user prepares; CI plans them before any data exists)."""
    (p.problems if require else p.data).append(f"{what}: not found — prepare it before training")


def _check_data(cfg, p: Plan, rows: int = 16, require: bool = False) -> None:
    src = cfg.data.source
    try:
        if src.kind == "preference":
            from genalign.data.preference import PreferenceSource

            ps = PreferenceSource(src.source, split=src.split, ties=src.ties, max_pairs=rows * 4)
            head = ps.head(rows)
            bad = [h for h in head if not h["ok"]]
            p.data.append(f"{src.source}: {ps.n} usable pairs in the first rows read; ties {ps.skipped['ties']}, "
                          f"bad rows {ps.skipped['bad_rows']}, unreadable images {len(bad)} of {len(head)} decoded")
            if len(bad) == len(head):
                p.problems.append(f"data.source {src.source}: none of the first {len(head)} pairs decodes "
                                  f"({bad[0]['error']})")
        elif src.kind in ("prompts", "onpolicy"):
            from genalign.data.prompts import load_prompts

            p.data.append(f"prompts {src.prompts}: {len(load_prompts(src.prompts))} prompts")
        elif src.kind == "images":
            if src.source.startswith("digits:"):
                p.data.append(f"images {src.source}: built-in")
            elif Path(src.source).exists():
                p.data.append(f"images {src.source}: folder found")
            else:
                raise FileNotFoundError(f"data.source: {src.source!r} not found")
    except FileNotFoundError as err:
        where = getattr(src, "source", None) or getattr(src, "prompts", "")
        if _looks_like_hub_id(where) and not Path(where).exists():
            p.data.append(f"{where}: hub dataset not reachable offline — not checked")
        elif not Path(where).exists():
            _missing(p, f"data.source {where}", require)
        else:
            p.problems.append(str(err))
    except (ValueError, OSError) as err:
        p.problems.append(str(err).splitlines()[0])


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/")) and not Path(s).suffix


def _check_lm_data(cfg, p: Plan, require: bool = False) -> None:
    d = cfg.data
    if d.synthetic is not None:
        p.data.append(f"synthetic {d.synthetic.kind} pairs: {d.synthetic.n_train} train")
        return
    path = Path(d.train)
    if not path.exists():
        if _looks_like_hub_id(d.train):
            p.data.append(f"{d.train}: not reachable offline — not checked")
        else:
            _missing(p, f"data.train {d.train}", require)
        return
    missing, n = set(), 0
    with open(path) as f:
        for line in f:
            if n >= 16:
                break
            if line.strip():
                row = json.loads(line)
                missing |= {"prompt", "chosen", "rejected"} - set(row)
                n += 1
    p.data.append(f"{path}: first {n} rows read" + (f"; missing columns {sorted(missing)}" if missing else ""))
    if missing:
        p.problems.append(f"data.train {path}: missing columns {', '.join(sorted(missing))}")


def video_tokens(spec: dict, frames: int) -> int | None:
    """Expanded video placeholder tokens for ``frames`` frames under the model's rule (None: not a video-LM)."""
    vt = spec.get("video_tokens")
    if vt is None:
        return None
    if "per_frame" in vt:
        return frames * vt["per_frame"] + vt.get("per_video_extra", 0)
    v = spec["components"]["model"]["config"]["vision_config"]
    side = 336 // v["patch_size"] // v["spatial_merge_size"]  # Qwen2-VL default video max pixels ≈ 336² a frame
    return math.ceil(frames / v["temporal_patch_size"]) * side * side


def _sequence_checks(cfg, p: Plan, spec: dict) -> None:
    d = cfg.data
    vt = video_tokens(spec, d.num_frames) if cfg.pipeline.name == "video_language" else None
    budget = d.max_length
    if vt is not None:
        p.sequence.append(f"video tokens: {d.num_frames} frames → {vt} (expanded placeholders)")
        if vt >= budget:
            p.problems.append(f"data.max_length {budget} ≤ {vt} expanded video tokens ({d.num_frames} frames): the "
                              "video would be cut (raise max_length or lower num_frames)")
            return
    p.sequence.append(f"max_length {budget}: {budget - (vt or 0)} tokens left for prompt + completion")


# -- output --------------------------------------------------------------------------------------------------------
def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def print_plan(p: Plan, console=None) -> None:
    """Print the plan as rich tables (components, memory per GPU, step time, data, sequences, verdict)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(emoji=False)
    t = Table(title=f"genalign plan: {p.config}  ({p.model})")
    for col in ("component", "role", "parameters", "trainable", "note"):
        t.add_column(col, justify="right" if col in ("parameters", "trainable") else "left")
    for c in p.components:
        t.add_row(c.name, c.role, _fmt_params(c.total), _fmt_params(c.trainable), c.note)
    console.print(t)
    m = Table(title=f"estimated peak memory per GPU ({p.gpus} × {p.gpu}, {p.parallelism}; {p.shape})")
    m.add_column("item")
    m.add_column("GiB", justify="right")
    for k, v in p.memory.items():
        m.add_row(k, f"{v / GIB:.2f}")
    m.add_row("[bold]total[/bold]", f"[bold]{p.peak / GIB:.2f}[/bold] of {p.gpu_memory:g}")
    console.print(m)
    if p.step_seconds:
        console.print(f"optimizer step: {p.flops_per_step / 1e12:.1f} TFLOP per GPU → [bold]≈{p.step_seconds:.1f} s[/bold] "
                      f"on one {p.gpu} (estimate: {MFU:.0%} of {GPUS[p.gpu] / 1e12:.0f} TFLOP/s peak bf16; "
                      "communication and data loading not included)")
    for label, lines in (("data", p.data), ("sequence", p.sequence), ("note", p.notes)):
        for line in lines:
            console.print(f"{label}: {escape(line)}")
    if p.fits:
        console.print("[green]OK: fits and should start[/green]")
    for line in p.problems:
        console.print(f"[red]problem: {escape(line)}[/red]")


def run_cli(config: str, overrides: list[str] | None, gpus: int, gpu_memory: float, gpu: str, parallelism: str,
            online: bool, require_data: bool = False, trace: bool = True) -> int:
    """``genalign plan``: print the plan; 0 when it fits and would start, 1 otherwise (reasons printed)."""
    try:
        p = plan(config, overrides, gpus=gpus, gpu_memory=gpu_memory, gpu=gpu, parallelism=parallelism, online=online,
                 require_data=require_data, trace=trace)
    except PlanError as err:
        print(f"genalign plan: would not start: {err}")
        return 1
    print_plan(p)
    return 0 if p.fits else 1
