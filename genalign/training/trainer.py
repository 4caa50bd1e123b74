"""The one Accelerate loop every objective runs in.

config → pipeline adapter → data (cached latents / text embeddings) → objective.loss → Accelerate backward,
clipping, AdamW, LR schedule, EMA → checkpoints (atomic, every rank) → validation with rewards → export.

Determinism and exact resume: batch indices and the noise/timestep generator of micro-step m are pure functions of
(config seed, m, rank), so a resumed run sees exactly the batches and noise an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from genalign.config import RunConfig, save_config
from genalign.data.batches import micro_batch_indices, row_offset
from genalign.data.prompts import load_prompts
from genalign.objectives.base import TrainContext
from genalign.training import checkpoint as ckpt

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss with ``train.on_nan: halt``; the message names the step and batch ids."""


# -- rewards / validation ------------------------------------------------------------------------------------
def build_rewards(items, device):
    """The config's reward list as a :class:`~genalign.rewards.composite.CompositeReward` (weights and
    normalisation per member; every member also scored on its own)."""
    from genalign.rewards.composite import CompositeReward

    return CompositeReward.from_specs([it.model_dump() for it in items], device=device).eval()


@torch.no_grad()
def evaluate_rewards(objective, rewards, prompts: list[str], vcfg, accelerator=None) -> dict[str, float]:
    """Mean reward per name over ``samples_per_prompt`` samples of each held-out prompt.

    Sample i always uses seed ``vcfg.seed + i`` (independent of batch size and number of ranks), so before/after
    figures compare the same noise. Work is sharded over ranks and gathered (every rank takes part).
    """
    expanded = [p for p in prompts for _ in range(vcfg.samples_per_prompt)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(rank, len(expanded), world))
    names = list(rewards.names)
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)
    for i in range(0, len(mine), vcfg.batch_size):
        idx = mine[i:i + vcfg.batch_size]
        gens = [torch.Generator().manual_seed(vcfg.seed + j) for j in idx]
        imgs = objective.sample([expanded[j] for j in idx], vcfg, gens)
        comps = rewards.components(imgs.to(objective.model.device), [expanded[j] for j in idx])
        for k, name in enumerate(names):
            sums[k] += comps[name].detach().double().sum().item()
        sums[-1] += len(idx)
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    return {name: float(sums[k] / sums[-1]) for k, name in enumerate(names)}


# -- the loop ------------------------------------------------------------------------------------------------
class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint at the next step boundary and exits cleanly."""

    def __init__(self):
        self.stop = False

    def __call__(self, signum, frame):
        logger.warning("signal %s received: checkpointing at the next step boundary", signum)
        self.stop = True


def _make_optimizer(params, tcfg, learning_rate: float | None = None):
    if tcfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("train.use_8bit_adam: needs bitsandbytes (pip install genalign[gpu])") from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=learning_rate or tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
               weight_decay=tcfg.weight_decay, eps=tcfg.adam_epsilon)


def _lr_lambda(tcfg):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / tcfg.warmup_steps) if tcfg.warmup_steps else 1.0
        if tcfg.lr_scheduler == "cosine":
            prog = min(1.0, max(0, step - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps))
            return warm * 0.5 * (1 + math.cos(math.pi * prog))
        return warm if tcfg.lr_scheduler == "warmup" else 1.0
    return f


def train(cfg: RunConfig, run_dir: str | Path, resume: str | None = None, progress: bool = True) -> dict:
    """Run a whole training job and return the summary (also written to ``RUN_DIR/summary.json``).

    Args:
        cfg: a validated run config (:func:`genalign.config.load_config`).
        run_dir: output folder (created). Holds config.yaml, checkpoints/, export/, logs/, summary.json.
        resume: None, "latest" or a checkpoint path.

    Raises:
        NonFiniteLossError: a NaN/inf loss with ``train.on_nan: halt``.
        genalign.rewards.WeightsNotFoundError: a model or reward checkpoint is unavailable.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from rich.console import Console
    from tqdm.auto import tqdm

    from genalign.registry import objectives, pipelines

    t_start = time.time()
    run_dir = Path(run_dir)
    tcfg = cfg.train
    trackers = [t for t in tcfg.trackers if _tracker_available(t)]
    mp = tcfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # cpu=True lets Accelerate run multi-process on CPU (gloo) under torchrun / accelerate launch.
    acc = Accelerator(gradient_accumulation_steps=tcfg.gradient_accumulation_steps, mixed_precision=mp,
                      cpu=not torch.cuda.is_available(),
                      log_with=trackers or None,
                      project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))
    set_seed(cfg.seed)
    console = Console()
    if acc.is_main_process:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        logging.basicConfig(level=logging.INFO, handlers=[logging.FileHandler(run_dir / "logs" / "train.log")], force=True)
    acc.wait_for_everyone()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)

    model = pipelines.get(cfg.pipeline.name).from_config(cfg.pipeline, device=acc.device, weight_dtype=weight_dtype)
    objective = objectives.get(cfg.objective.name)(cfg.objective_params(), model)
    rewards = build_rewards(cfg.rewards, acc.device)
    val_prompts = load_prompts(cfg.validation.prompts, cfg.validation.max_prompts)

    # Reward of the base model on held-out prompts (cached in the run folder so a resume does not redo it).
    before_file = run_dir / "reward_before.json"
    if before_file.exists():
        reward_before = json.loads(before_file.read_text())
    else:
        reward_before = evaluate_rewards(objective, rewards, val_prompts, cfg.validation, acc)
        if acc.is_main_process:
            _atomic_write(before_file, json.dumps(reward_before, indent=2))

    data = objective.build_data(TrainContext(cfg, model, rewards, run_dir, acc))

    # One optimizer + LR schedule per phase (DI*: fake score, generator); one for most objectives.
    phases = objective.phases()
    raw_modules = objective.trainable_modules()
    optimizers = [_make_optimizer(ph.params, tcfg, ph.learning_rate) for ph in phases]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(tcfg)) for o in optimizers]
    all_params = [p for ph in phases for p in ph.params]
    ema = None
    if tcfg.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(all_params, decay=tcfg.ema_decay)
    prepared = acc.prepare(*raw_modules, *optimizers)
    prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
    wrapped, optimizers = prepared[:len(raw_modules)], prepared[len(raw_modules):]
    objective.use_prepared(wrapped)  # forward through DDP wrappers; reference passes use the raw modules
    state = {"step": 0}
    # LR schedules, EMA and objective state go into one tensors-only file read with weights_only=True (Accelerate
    # would pickle registered objects and read them back with weights_only=False).

    def extra_state() -> dict:
        return {"objective": objective.state_dict(), "schedulers": [sch.state_dict() for sch in schedulers],
                "ema": ema.state_dict() if ema is not None else None}

    def save_hook(models, weights, output_dir):
        if acc.is_main_process:
            for i, m in enumerate(raw_modules):
                ckpt.save_trainable(m, Path(output_dir) / ckpt.trainable_file(i))
        weights.clear()  # the frozen base is not duplicated into every checkpoint

    def load_hook(models, input_dir):
        for i, m in enumerate(raw_modules):
            ckpt.load_trainable(m, Path(input_dir) / ckpt.trainable_file(i))
        models.clear()

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)
    config_yaml = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""

    def save_checkpoint(step: int) -> None:
        tmp = run_dir / "checkpoints" / f".tmp-{ckpt.checkpoint_name(step)}"
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every rank takes part
        acc.wait_for_everyone()
        if acc.is_main_process:
            torch.save(extra_state(), tmp / "training_state.pt")
            ts = {"step": step, "seed": cfg.seed, "objective": cfg.objective.name}
            ckpt.finalize_checkpoint(tmp, run_dir / "checkpoints" / ckpt.checkpoint_name(step), ts, config_yaml)
            ckpt.prune_checkpoints(run_dir, tcfg.checkpoints_total_limit)
        acc.wait_for_everyone()

    resume_dir = ckpt.resolve_resume(run_dir, resume)
    if resume_dir is not None:
        acc.load_state(str(resume_dir))
        ts = json.loads((resume_dir / "trainer_state.json").read_text())
        state["step"] = ts["step"]
        extra = torch.load(resume_dir / "training_state.pt", weights_only=True)
        objective.load_state_dict(extra["objective"])
        for sch, st in zip(schedulers, extra["schedulers"]):
            sch.load_state_dict(st)
        if ema is not None and extra["ema"] is not None:
            ema.load_state_dict(extra["ema"])
        if acc.is_main_process:
            console.print(f"resumed from {resume_dir} at step {state['step']}")

    if trackers:
        acc.init_trackers("genalign", config=_flat(cfg.model_dump(mode="json")))
    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    accum = tcfg.gradient_accumulation_steps
    pbar = tqdm(total=tcfg.steps, initial=state["step"], disable=not (progress and acc.is_main_process),
                desc=f"{cfg.objective.name}", dynamic_ncols=True)
    last_metrics: dict[str, float] = {}
    history: list[dict] = []
    skipped_steps = 0
    try:
        while state["step"] < tcfg.steps:
            step = state["step"]
            metrics_acc: dict[str, float] = {}
            skip = False
            for k_phase, (phase, optimizer) in enumerate(zip(phases, optimizers)):
                prefix = "" if len(phases) == 1 else f"{phase.name}/"
                for a in range(accum):
                    micro = step * accum + a
                    idx = micro_batch_indices(data.n, micro, tcfg.batch_size, acc.process_index, acc.num_processes,
                                              cfg.seed)
                    batch = data.batch(idx)
                    offset = row_offset(micro, tcfg.batch_size, acc.process_index, acc.num_processes)
                    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + offset * 1009 + k_phase * 101)
                    with acc.accumulate(*wrapped), acc.autocast():
                        out = phase.loss(batch, gen)
                        # Every rank takes part in this reduce, so a NaN on one rank stops or skips all of them.
                        bad = acc.reduce(torch.tensor(float(not torch.isfinite(out.loss).all()), device=acc.device), "sum")
                        if bad.item() > 0:
                            if tcfg.on_nan == "halt":
                                raise NonFiniteLossError(
                                    f"non-finite loss at step {step} (phase {phase.name}, micro-step {micro}, row ids "
                                    f"{batch.get('ids')}); set train.on_nan: skip to skip such steps")
                            skip = True
                            out.loss = out.loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
                        acc.backward(out.loss)
                        if acc.sync_gradients and tcfg.max_grad_norm and not skip:
                            acc.clip_grad_norm_(phase.params, tcfg.max_grad_norm)
                        if acc.sync_gradients and skip:
                            optimizer.zero_grad(set_to_none=True)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    for k, v in out.metrics.items():
                        metrics_acc[prefix + k] = metrics_acc.get(prefix + k, 0.0) + v / accum
                    metrics_acc[prefix + "loss"] = metrics_acc.get(prefix + "loss", 0.0) + out.loss.item() / accum
            if skip:
                skipped_steps += 1
                logger.warning("step %d skipped: non-finite loss", step)
            for sch in schedulers:
                sch.step()
            if ema is not None:
                ema.step(all_params)
            state["step"] = step + 1
            result = objective.on_step_end(state["step"])  # round boundaries (DDO self-play, DRAGON rounds)
            if result is not None and result.reset_optimizer_state:
                for opt in optimizers:
                    getattr(opt, "optimizer", opt).state.clear()  # the Accelerate wrapper holds the torch optimizer
            last_metrics = {k: _mean_over_ranks(acc, v) for k, v in sorted(metrics_acc.items())}
            last_metrics["lr"] = schedulers[-1].get_last_lr()[0]
            loss_key = "loss" if "loss" in last_metrics else f"{phases[-1].name}/loss"
            if acc.is_main_process:
                pbar.update(1)
                pbar.set_postfix(loss=f"{last_metrics[loss_key]:.4f}")
            if state["step"] % tcfg.log_every == 0 or state["step"] == tcfg.steps:
                history.append({"step": state["step"], **last_metrics})
                logger.info("step %d %s", state["step"], last_metrics)
                if trackers:
                    acc.log(last_metrics, step=state["step"])
            if cfg.validation.every and state["step"] % cfg.validation.every == 0 and state["step"] < tcfg.steps:
                val = evaluate_rewards(objective, rewards, val_prompts, cfg.validation, acc)
                history.append({"step": state["step"], **{f"val/reward/{k}": v for k, v in val.items()}})
                logger.info("validation step %d %s", state["step"], val)
                if trackers:
                    acc.log({f"val/reward/{k}": v for k, v in val.items()}, step=state["step"])
                if acc.is_main_process:
                    pbar.set_postfix(loss=f"{last_metrics[loss_key]:.4f}", **{k[:12]: f"{v:.3f}" for k, v in val.items()})
            if (tcfg.checkpoint_every and state["step"] % tcfg.checkpoint_every == 0) or stop.stop:
                save_checkpoint(state["step"])
            if stop.stop:
                if acc.is_main_process:
                    console.print(f"stopped by signal at step {state['step']}; resume with --resume latest")
                return {"stopped_at": state["step"]}
    finally:
        pbar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if not ckpt.list_checkpoints(run_dir) or int(ckpt.list_checkpoints(run_dir)[-1].name.split("_")[1]) != state["step"]:
        save_checkpoint(state["step"])
    if ema is not None:
        ema.copy_to(all_params)
    reward_after = evaluate_rewards(objective, rewards, val_prompts, cfg.validation, acc)
    summary = {
        "objective": cfg.objective.name, "model": cfg.pipeline.model, "steps": state["step"],
        "seconds": round(time.time() - t_start, 1), "num_rows": data.n, "data_skipped": getattr(data, "skipped", {}),
        "skipped_steps": skipped_steps, "reward_before": reward_before, "reward_after": reward_after,
        "heldout_prompts": cfg.validation.prompts, "samples_per_prompt": cfg.validation.samples_per_prompt,
        "final_metrics": last_metrics, "history": history,
    }
    objective_metrics = objective.summary_metrics()  # objective-specific evaluation (DRAGON win rate, DDO rounds)
    if objective_metrics:
        summary["objective_metrics"] = objective_metrics
    if acc.is_main_process and cfg.export.enabled:
        from genalign.export import export_pipeline

        export_pipeline(model, cfg, run_dir / "export", summary=summary)
    if acc.is_main_process:
        _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
        if cfg.export.report:
            from genalign.report import write_report

            write_report(run_dir, device=acc.device)
        if progress:
            _print_table(console, reward_before, reward_after, summary)
    acc.wait_for_everyone()
    if trackers:
        acc.end_training()
    return summary


def _tracker_available(name: str) -> bool:
    import importlib.util

    mod = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    if importlib.util.find_spec(mod) is None:
        logger.warning("train.trackers: %s is not installed; not logging to it", name)
        return False
    return True


def _mean_over_ranks(acc, v: float) -> float:
    if acc.num_processes == 1:
        return float(v)
    return float(acc.reduce(torch.tensor(float(v), device=acc.device), "mean").item())


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _print_table(console, before: dict, after: dict, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"held-out reward ({summary['heldout_prompts']}, {summary['samples_per_prompt']} samples/prompt)")
    table.add_column("reward")
    table.add_column("base", justify="right")
    table.add_column("trained", justify="right")
    table.add_column("change", justify="right")
    for k in before:
        table.add_row(k, f"{before[k]:.4f}", f"{after[k]:.4f}", f"{after[k] - before[k]:+.4f}")
    console.print(table)
    console.print(f"{summary['steps']} steps in {summary['seconds']:.0f} s")
