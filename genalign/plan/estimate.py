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


import torch

from genalign.plan.models import CUDA_CONTEXT, Component, GIB, GPUS, MFU, PAIR_OBJECTIVES, Plan, PlanError, add_lora, architecture, build_meta, count_params, shipped_config
from genalign.plan.trace import audioldm2_inputs, diffusion_inputs, dit_inputs, meta_tensor, scaled_trace, trace_step
from genalign.plan.checks import check_data_rows, check_lm_data, print_plan, sequence_checks


def _weight_free(name: str) -> bool:
    """Whether the registered reward ``name`` declares ``weight_free`` (an unknown name is not: it gets a note)."""
    from genalign.registry import rewards as REWARDS

    try:
        return bool(getattr(REWARDS.get(name), "weight_free", False))
    except KeyError:
        return False


class _NotTraced(Exception):
    """Raised inside the LM plan to take the logits-only estimate when tracing is switched off."""

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
    """Build the pre-flight :class:`Plan` of a run config file (see module docstring and :func:`plan_config`).

    Raises:
        genalign.config.ConfigError: an invalid config. PlanError: a model that cannot be resolved.
    """
    from genalign.config import load_config

    return plan_config(load_config(config_path, overrides), str(config_path), gpus=gpus, gpu_memory=gpu_memory,
                       gpu=gpu, parallelism=parallelism, online=online, check_data=check_data, device=device,
                       spec=spec, require_data=require_data, trace=trace)


def plan_config(cfg, label: str = "config", gpus: int = 1, gpu_memory: float = 80.0, gpu: str = "A100",
                parallelism: str = "ddp", online: bool = False, check_data: bool = True, device: str = "cuda",
                spec: dict | None = None, require_data: bool = False, trace: bool = True) -> Plan:
    """The :class:`Plan` of a validated run config.

    Args:
        cfg: a ``RunConfig`` / ``LMRunConfig``. label: how the plan names it (the config path).
        gpus / gpu_memory (GiB) / gpu (a key of :data:`GPUS`) / parallelism ("ddp" | "zero2" | "fsdp").
        online: read configs of unshipped hub models from the hub.
        device: "cuda" adds the CUDA context; "cpu" (the benchmark) leaves it out.
        spec: an architecture spec to use instead of resolving ``pipeline.model`` (benchmarks, tests).
        require_data: a data file / folder that does not exist is a problem (default: a warning line).
        trace: False skips the meta forward/backward (no activation or FLOP figures; parameter items only).

    Raises:
        PlanError: a model that cannot be resolved, an unknown GPU or parallelism.
    """
    is_lm = getattr(cfg, "family", "diffusion") == "lm"
    if gpu not in GPUS:
        raise PlanError(f"--gpu {gpu!r}: unknown; known: {', '.join(GPUS)}")
    p = Plan(config=label, model=cfg.pipeline.model, gpu=gpu, gpus=gpus, gpu_memory=gpu_memory,
             parallelism=parallelism)
    p.trace = trace
    (_plan_lm if is_lm else _plan_diffusion)(cfg, p, online, device, spec)
    _shard(p, parallelism, gpus)
    if check_data:
        (check_lm_data if is_lm else check_data_rows)(cfg, p, require=require_data)
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
    for name in _reward_names(cfg):
        if _weight_free(name):  # computed from the samples alone: nothing to load, nothing to count
            continue
        if name.startswith("fad-"):
            p.notes.append(f"reward {name}: embeds with the VAE frames or its encoder reward (not a separate network)")
            continue
        rs = shipped_config(f"reward:{name}")
        if rs is None:
            p.notes.append(f"reward {name}: size not modelled (no shipped config)")
            continue
        m = build_meta(rs["components"]["model"])
        m.requires_grad_(False)
        p.components.append(Component(f"reward:{name}", "reward", m, *count_params(m)))
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
                inputs["controlnet_cond"] = meta_tensor(r, 3, side * down, side * down, dtype=dtype)
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
        elif cfg.objective.name == "r0":
            p.notes.append("R0: the reward's backward through the VAE decoder and reward model is not traced")
    elif main == "unet" and comps[main]["class"] == "AudioLDM2UNet2DConditionModel":
        inputs, p.shape = audioldm2_inputs(spec, trainable_mod, rows, dtype)
        act, flops, attn = trace_step(trainable_mod, inputs, lambda out: out.sample.float().pow(2).mean(), dtype,
                                      pc.gradient_checkpointing)
        flops += attn
        mem["activations (traced)"] = float(act)
        p.notes.append("AudioLDM2: traced at its full window with 64 T5 tokens (an assumption)")
        if needs_ref_pass(obj, ref):
            flops += flops / (2 if pc.lora is not None else 3)
    elif main == "transformer" and comps[main]["class"] == "StableAudioDiTModel":
        frames = int(spec.get("latent_frames") or trainable_mod.config.sample_size)
        p.shape = f"{rows} rows × {frames} latent frames"

        def make_inputs(r, n):
            return dit_inputs(spec, trainable_mod, r, n, dtype)

        def loss_fn(out):
            return out.sample.float().pow(2).mean()
        act, flops = scaled_trace(trainable_mod, make_inputs, loss_fn, dtype, pc.gradient_checkpointing, rows, frames,
                                  128, quadratic=False)
        mem["activations (traced)"] = float(act)
        if needs_ref_pass(obj, ref):
            flops += flops / (2 if pc.lora is not None else 3)
    else:
        flops = 0.0
        mem["activations"] = 0.0
        p.notes.append(f"{main} ({comps[main]['class']}): activations and FLOPs not traced (UNet / DiT / LM only)")
        p.shape = f"{rows} rows"
    if device == "cuda":
        mem["CUDA context + workspace"] = CUDA_CONTEXT
    accum = tcfg.gradient_accumulation_steps
    p.flops_per_step = flops * accum
    p.step_seconds = p.flops_per_step / (GPUS[p.gpu] * MFU) if flops else 0.0


def _reward_names(cfg) -> list[str]:
    """Reward models the run loads, each once: the training signal (``objective.reward`` / ``objective.rewards``)
    and the evaluation rewards (``rewards``)."""
    items = list(getattr(cfg.objective, "rewards", None) or [])
    one = getattr(cfg.objective, "reward", None)
    items += [one] if one is not None else []
    names = []
    for item in items + list(cfg.rewards):
        name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
        if name and name not in names:
            names.append(name)
    return names


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
        if not p.trace:  # --no-trace: the logits-only estimate below, said as such
            raise _NotTraced
        if hasattr(m, "language_model") or hasattr(getattr(m, "model", None), "language_model"):
            # Video-LMs: trace the language model on embeddings (the vision tower runs on frames, not traced).
            lm = m.model.language_model if hasattr(m.model, "language_model") else m.language_model
            head = m.lm_head

            def make_inputs(r, length):  # noqa: F811
                return {"inputs_embeds": meta_tensor(r, length, text_cfg.hidden_size, dtype=dtype)}

            def loss_fn(out):  # noqa: F811
                return head(out.last_hidden_state).float().log_softmax(-1)[..., 0].sum()
            p.notes.append("video-LM: vision tower activations not traced (language model + LM head only)")
        act, flops = scaled_trace(lm, make_inputs, loss_fn, dtype, tcfg.gradient_checkpointing, rows, L, 128,
                                  quadratic=False)
    except Exception as err:  # --no-trace, or an architecture the meta trace cannot run: use logits only
        act, flops = rows * L * vocab * 4 * 2, 6.0 * total * rows * L
        why = "not traced (--no-trace)" if isinstance(err, _NotTraced) else f"LM trace failed ({type(err).__name__})"
        p.notes.append(f"{why}; activations = logits only, FLOPs = 6·N·tokens")
    mem["activations (traced)"] = float(act)
    mem["reference logits (transient)"] = float(rows * L * vocab * 4)
    flops += flops / (2 if pc.lora is not None else 3)  # the reference forward (every LM objective here has one)
    if device == "cuda":
        mem["CUDA context + workspace"] = CUDA_CONTEXT
    p.flops_per_step = flops * tcfg.gradient_accumulation_steps
    p.step_seconds = p.flops_per_step / (GPUS[p.gpu] * MFU)
    sequence_checks(cfg, p, spec)


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
