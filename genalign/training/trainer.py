"""The one Accelerate loop every diffusion objective runs in.

config → pipeline adapter → data (cached latents / text embeddings) → objective phases → Accelerate backward,
clipping, optimizer, LR schedule, EMA → checkpoints (atomic, every rank) → validation with rewards → export.

Determinism and exact resume: batch indices and the noise/timestep generator of micro-step m are pure functions of
(config seed, m, rank), so a resumed run sees exactly the batches and noise an uninterrupted run would have.

:class:`DiffusionTrainer` reads top to bottom in the order a run happens: set-up, base evaluation, data,
optimization, resume, the loop (one :meth:`~DiffusionTrainer.train_step` per optimizer step), final evaluation,
summary and export. The objective is reached only through the hooks its base class declares.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch

from genalign.config import ConfigError, RunConfig, save_config
from genalign.data.batches import micro_batch_indices, row_offset
from genalign.data.prompts import load_prompts
from genalign.evaluation.validation import evaluate_rewards
from genalign.model_card import check_push_to_hub
from genalign.objectives.base import TrainContext
from genalign.training import checkpoint as ckpt
from genalign.training import run_folder
from genalign.training.optim import make_lr_scheduler, make_optimizer
from genalign.training.launch import (check_distributed_type, flatten_config, in_main_thread, mean_over_ranks,
                                      resolve_mixed_precision, resolve_num_threads, tracker_available)
from genalign.training.progress import RunLog, log_validation_images, print_summary_table

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss with ``train.on_nan: halt`` (the message names the step and batch ids), or parameters the
    optimizer made non-finite (always a halt: the message names the optimizer settings, not data rows)."""


def build_rewards(items, device):
    """The config's reward list as a :class:`~genalign.rewards.composite.CompositeReward` (weights and
    normalisation per member; every member also scored on its own)."""
    from genalign.rewards.composite import CompositeReward

    try:
        return CompositeReward.from_specs([it.model_dump() for it in items], device=device).eval()
    except TypeError as err:  # a kwargs typo reaches the reward's constructor: name the config key, one line
        raise ConfigError(f"rewards: {err} (check rewards.N.kwargs against the reward's arguments)") from None


def build_set_rewards(items, device) -> dict:
    """``validation.set_rewards`` as ``{name: reward}`` (a repeated name gets ``#2``, ``#3`` ... suffixes).

    Args:
        items: :class:`~genalign.config.RewardItem` entries (``weight`` / ``normalize`` unused). device: where the
            rewards' encoders run.

    Raises:
        ConfigError: a member that is not a set reward with ``embed`` / ``score_embeddings``, or a bad kwarg.
    """
    from genalign.rewards.composite import build_reward

    out: dict = {}
    for i, it in enumerate(items):
        try:
            reward = build_reward(it.name, dict(it.kwargs), {}, device).eval()
        except TypeError as err:
            raise ConfigError(f"validation.set_rewards.{i}: {err} (check its kwargs against the reward's "
                              "arguments)") from None
        if getattr(reward, "kind", "instance") != "set" or not hasattr(reward, "score_embeddings"):
            raise ConfigError(f"validation.set_rewards.{i}: {it.name!r} is not a set reward (fad-dataset, vendi); "
                              "list per-sample rewards under `rewards`")
        name, k = it.name, 2
        while name in out:
            name, k = f"{it.name}#{k}", k + 1
        out[name] = reward
    return out


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame):
        logger.warning("signal %s received: checkpointing at the next step boundary", signum)
        self.signum = signum


class DiffusionTrainer:
    """One training run of a diffusion objective (see the module docstring); :meth:`run` returns the summary.

    Args:
        cfg: a validated run config (:func:`genalign.config.load_config`).
        run_dir: output folder (created). Holds config.yaml, checkpoints/, export/, logs/, samples/, summary.json.
        resume: None, "latest" or a checkpoint path.
        progress: show progress bars / lines and the final table.
        overwrite: start over in a folder holding a previous run (removes only genalign's run files).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: str | None = None, progress: bool = True,
                 overwrite: bool = False):
        self.cfg, self.tcfg = cfg, cfg.train
        self.run_dir = Path(run_dir)
        self.resume_from = resume
        self.progress = progress
        self.overwrite = overwrite
        self.resume_dir: Path | None = None
        self.step = 0
        self.history: list[dict] = []
        self.last_metrics: dict[str, float] = {}
        self.skipped_steps = 0

    # -- set-up ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Accelerator, threads, run folder and logs, adapter, objective, rewards, held-out prompts."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        from genalign.registry import objectives, pipelines

        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        cfg, tcfg = self.cfg, self.tcfg
        main = int(os.environ.get("RANK", "0")) == 0
        # Before anything is written or loaded: the folder, its lock, and the checkpoint to resume (validated).
        run_folder.prepare_run_folder(self.run_dir, self.resume_from, self.overwrite, main_process=main)
        self.lock = run_folder.lock_run_folder(self.run_dir) if main else None
        self.resume_dir = self.pick_checkpoint()
        check_push_to_hub(cfg)  # export.push_to_hub offline / without a token fails now, not after training
        try:
            self.val_prompts = load_prompts(cfg.validation.prompts, cfg.validation.max_prompts)
        except (ValueError, OSError) as err:
            raise ConfigError(f"validation.prompts: {err}") from None
        torch.set_num_threads(resolve_num_threads(tcfg.num_threads))
        self.trackers = [t for t in tcfg.trackers if tracker_available(t)]
        mp = resolve_mixed_precision(tcfg.mixed_precision)
        # cpu=True lets Accelerate run multi-process on CPU (gloo) under torchrun / accelerate launch.
        self.acc = acc = Accelerator(
            gradient_accumulation_steps=tcfg.gradient_accumulation_steps, mixed_precision=mp,
            cpu=not torch.cuda.is_available(), log_with=self.trackers or None,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=tcfg.ddp_timeout_s))],
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")))
        set_seed(cfg.seed)
        self.log = RunLog(self.run_dir, enabled=self.progress and acc.is_main_process)
        if acc.is_main_process:
            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self.log.setup_file_logging(self.run_dir / "logs" / "train.log")
        check_distributed_type(acc)  # logs the type in effect; refuses a preset whose strategy did not take
        acc.wait_for_everyone()
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
        with self.log.phase("load model"):
            self.model = pipelines.get(cfg.pipeline.name).from_config(cfg.pipeline, device=acc.device,
                                                                      weight_dtype=weight_dtype)
            self.objective = objectives.get(cfg.objective.name)(cfg.objective_params(), self.model)
            self.rewards = build_rewards(cfg.rewards, acc.device)
            self.set_rewards = build_set_rewards(cfg.validation.set_rewards, acc.device)

    def evaluate(self, name: str, save_as: str | None = None, periodic: bool = False) -> dict[str, float]:
        """Held-out mean rewards (:func:`~genalign.evaluation.validation.evaluate_rewards`) with progress;
        ``save_as`` keeps the samples under ``samples/<save_as>/`` for the report; ``periodic`` uses the cheaper
        ``validation.every_samples_per_prompt`` budget (fixed seeds of its own, the same at every validation)."""
        v = self.cfg.validation
        if periodic and v.every_samples_per_prompt:
            v = v.model_copy(update={"samples_per_prompt": v.every_samples_per_prompt})
        total = -(-len(self.val_prompts) * v.samples_per_prompt // self.acc.num_processes)
        save_dir = self.run_dir / "samples" / save_as if save_as else None
        with self.log.phase(name, total=total, unit="sample") as ph:
            return evaluate_rewards(self.objective, self.rewards, self.val_prompts, v, self.acc, save_dir, ph.update,
                                    set_rewards=self.set_rewards)

    def base_reward(self) -> dict[str, float]:
        """Reward of the base model on held-out prompts, cached in the run folder under a fingerprint of what
        produced it (model, rewards, validation, seed), so a resume does not redo it and no other run reuses it."""
        cfg = self.cfg
        key = run_folder.fingerprint(cfg.pipeline.model_dump(mode="json"), [r.model_dump(mode="json") for r in cfg.rewards],
                                     cfg.validation.model_dump(mode="json"), cfg.seed)
        before_file = self.run_dir / "reward_before.json"
        if before_file.exists():
            cached = json.loads(before_file.read_text())
            if cached.get("fingerprint") == key:
                return cached["reward"]
        with self.model.skip_zero_adapters():  # a fresh LoRA adds nothing: sample the base weights alone
            reward = self.evaluate("evaluate base", save_as="heldout-base")
        if self.acc.is_main_process:
            _atomic_write(before_file, json.dumps({"fingerprint": key, "reward": reward}, indent=2))
        return reward

    def build_optimization(self) -> None:
        """One optimizer + LR schedule per phase (DI*: fake score, generator), EMA, Accelerate ``prepare``."""
        tcfg = self.tcfg
        self.phases = self.objective.phases()
        self.raw_modules = self.objective.trainable_modules()
        optimizers = [make_optimizer(ph.params, tcfg, ph.learning_rate) for ph in self.phases]
        self.schedulers = [make_lr_scheduler(o, tcfg) for o in optimizers]
        self.all_params = [p for ph in self.phases for p in ph.params]
        self.ema = None
        if tcfg.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.all_params, decay=tcfg.ema_decay)
        prepared = self.acc.prepare(*self.raw_modules, *optimizers)
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        n = len(self.raw_modules)
        self.wrapped, self.optimizers = prepared[:n], prepared[n:]
        self.objective.use_prepared(self.wrapped)  # forward through DDP wrappers; reference passes use raw modules
        self.acc.register_save_state_pre_hook(self._save_hook)
        self.acc.register_load_state_pre_hook(self._load_hook)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _save_hook(self, models, weights, output_dir) -> None:
        if self.acc.is_main_process:
            for i, m in enumerate(self.raw_modules):
                ckpt.save_trainable(m, Path(output_dir) / ckpt.trainable_file(i))
        weights.clear()  # the frozen base is not duplicated into every checkpoint

    def _load_hook(self, models, input_dir) -> None:
        for i, m in enumerate(self.raw_modules):
            ckpt.load_trainable(m, Path(input_dir) / ckpt.trainable_file(i))
        models.clear()

    def _extra_state(self) -> dict:
        # LR schedules, EMA and objective state go into one tensors-only file read with weights_only=True
        # (Accelerate would pickle registered objects and read them back with weights_only=False).
        return {"objective": self.objective.state_dict(), "schedulers": [s.state_dict() for s in self.schedulers],
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def save_checkpoint(self, step: int) -> None:
        """``save_state`` on every rank into a temporary folder, then marker + rename (main process)."""
        acc = self.acc
        tmp = self.run_dir / "checkpoints" / f".tmp-{ckpt.checkpoint_name(step)}"
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            torch.save(self._extra_state(), tmp / "training_state.pt")
            ts = {"step": step, "seed": self.cfg.seed, "objective": self.cfg.objective.name}
            ckpt.finalize_checkpoint(tmp, self.run_dir / "checkpoints" / ckpt.checkpoint_name(step), ts,
                                     (self.run_dir / "config.yaml").read_text())
            ckpt.prune_checkpoints(self.run_dir, self.tcfg.checkpoints_total_limit)
        acc.wait_for_everyone()

    def pick_checkpoint(self) -> Path | None:
        """The checkpoint ``resume`` names, verified before any long phase: a corrupt newest checkpoint is named and
        the previous one used (``latest``); its config must match this run's (:func:`run_folder.check_resume_config`).

        Raises:
            FileNotFoundError: an explicit path that is not a complete, readable checkpoint (the file is named).
            RunFolderError: the config changes keys that may not change on resume.
        """
        for i, cand in enumerate(ckpt.resume_candidates(self.run_dir, self.resume_from)):
            problem = ckpt.verify_checkpoint(cand)
            if problem is None:
                if i:
                    logger.warning("resuming from the previous checkpoint %s instead", cand)
                run_folder.check_resume_config(cand, self.cfg.model_dump(mode="json"))
                return cand
            if self.resume_from != "latest":
                raise FileNotFoundError(f"--resume {self.resume_from}: checkpoint unreadable: {problem}")
            logger.warning("checkpoint %s is corrupt (%s)", cand, problem)
            print(f"warning: checkpoint {cand.name} is corrupt ({problem}); trying the previous one")
        return None

    def maybe_resume(self) -> None:
        """Load the picked checkpoint (trainable weights, optimizer, RNG, schedules, EMA, objective state)."""
        resume_dir = self.resume_dir
        if resume_dir is None:
            return
        self.acc.load_state(str(resume_dir))
        self.step = json.loads((resume_dir / "trainer_state.json").read_text())["step"]
        extra = torch.load(resume_dir / "training_state.pt", weights_only=True)
        self.objective.load_state_dict(extra["objective"])
        for sch, st in zip(self.schedulers, extra["schedulers"]):
            sch.load_state_dict(st)
        if self.ema is not None and extra["ema"] is not None:
            self.ema.load_state_dict(extra["ema"])
        logger.info("resumed from %s at step %d", resume_dir, self.step)

    # -- one optimizer step ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[dict[str, float], bool]:
        """Every phase of optimizer step ``step`` over its accumulated micro-steps.

        Returns:
            ``(metrics averaged over micro-steps, skipped)``; ``skipped`` when a loss was non-finite under
            ``on_nan: skip`` (the parameters are then unchanged).

        Raises:
            NonFiniteLossError: a non-finite loss under ``on_nan: halt`` (names step, phase, micro-step, row ids).
        """
        acc, tcfg, cfg = self.acc, self.tcfg, self.cfg
        accum = tcfg.gradient_accumulation_steps
        metrics: dict[str, float] = {}
        skip = False
        for k_phase, (phase, optimizer) in enumerate(zip(self.phases, self.optimizers)):
            prefix = "" if len(self.phases) == 1 else f"{phase.name}/"
            for a in range(accum):
                micro = step * accum + a
                idx = micro_batch_indices(self.data.n, micro, tcfg.batch_size, acc.process_index,
                                          acc.num_processes, cfg.seed)
                batch = self.data.batch(idx)
                offset = row_offset(micro, tcfg.batch_size, acc.process_index, acc.num_processes)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + offset * 1009 + k_phase * 101)
                with acc.accumulate(*self.wrapped), acc.autocast():
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
                    if acc.sync_gradients and not skip:
                        norm = acc.clip_grad_norm_(phase.params, tcfg.max_grad_norm or float("inf"))
                        if norm is not None and not torch.isfinite(torch.as_tensor(norm)).all():
                            if tcfg.on_nan == "halt":
                                raise NonFiniteLossError(
                                    f"non-finite gradient norm at step {step} (phase {phase.name}) with a finite "
                                    "loss; set train.on_nan: skip to skip such steps")
                            skip = True
                    if acc.sync_gradients and skip:
                        optimizer.zero_grad(set_to_none=True)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients and not all(torch.isfinite(p).all() for p in phase.params):
                    raise NonFiniteLossError(
                        f"parameters became non-finite in the optimizer step of step {step} (phase {phase.name}) from "
                        f"finite gradients: the optimizer settings are the cause (train.learning_rate="
                        f"{tcfg.learning_rate}, optimizer {tcfg.optimizer}), not the data")
                if skip:
                    continue  # a skipped step's loss is not logged (it would read as 0.0)
                for k, v in out.metrics.items():
                    metrics[prefix + k] = metrics.get(prefix + k, 0.0) + v / accum
                metrics[prefix + "loss"] = metrics.get(prefix + "loss", 0.0) + out.loss.item() / accum
        return metrics, skip

    def after_step(self, metrics: dict[str, float], skipped: bool, bar) -> None:
        """Schedules, EMA, the objective's step hook, logging and periodic validation after one optimizer step."""
        acc, tcfg = self.acc, self.tcfg
        if skipped:
            self.skipped_steps += 1
            logger.warning("step %d skipped: non-finite loss", self.step)
        for sch in self.schedulers:
            sch.step()
        if self.ema is not None:
            self.ema.step(self.all_params)
        self.step += 1
        result = self.objective.on_step_end(self.step)  # round boundaries (DDO self-play, DRAGON rounds)
        if result is not None and result.reset_optimizer_state:  # a plug-in's hook may return None
            for opt in self.optimizers:
                getattr(opt, "optimizer", opt).state.clear()  # the Accelerate wrapper holds the torch optimizer
        if not skipped:
            self.last_metrics = {k: mean_over_ranks(acc, v) for k, v in sorted(metrics.items())}
            self.last_metrics["lr"] = self.schedulers[-1].get_last_lr()[0]
        loss_key = "loss" if "loss" in self.last_metrics else f"{self.phases[-1].name}/loss"
        bar.update(1)
        if loss_key in self.last_metrics:
            bar.postfix(loss=f"{self.last_metrics[loss_key]:.4f}")
        if (self.step % tcfg.log_every == 0 or self.step == tcfg.steps) and self.last_metrics:
            self.history.append({"step": self.step, **self.last_metrics})
            logger.info("step %d %s", self.step, self.last_metrics)
            if acc.is_main_process:
                self.log.metrics(self.step, self.last_metrics)
            if self.trackers:
                acc.log(self.last_metrics, step=self.step)
        every = self.cfg.validation.every
        if every and self.step % every == 0 and self.step < tcfg.steps:
            save_as = f"validation/step_{self.step:06d}" if self.trackers else None
            val = self.evaluate(f"validate step {self.step}", save_as=save_as, periodic=True)
            val_metrics = {f"val/reward/{k}": v for k, v in val.items()}
            self.history.append({"step": self.step, **val_metrics})
            logger.info("validation step %d %s", self.step, val)
            if acc.is_main_process:
                self.log.metrics(self.step, val_metrics)
            if self.trackers:
                acc.log(val_metrics, step=self.step)
                if acc.is_main_process:
                    log_validation_images(acc, self.trackers, self.run_dir / "samples" / save_as, self.step)

    # -- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Set up, train, evaluate, export; returns the summary (also ``RUN_DIR/summary.json``).

        Raises:
            NonFiniteLossError: a NaN/inf loss with ``train.on_nan: halt``.
            genalign.rewards.WeightsNotFoundError: a model or reward checkpoint is unavailable.
        """
        t_start = time.time()
        self.setup()
        reward_before = self.base_reward()
        with self.log.phase("build data"):
            self.data = self.objective.build_data(
                TrainContext(self.cfg, self.model, self.rewards, self.run_dir, self.acc, phase=self.log.phase))
        self.build_optimization()
        self.maybe_resume()
        if self.trackers:
            self.acc.init_trackers("genalign", config=flatten_config(self.cfg.model_dump(mode="json")))
        stop = _StopFlag()
        old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if in_main_thread() else {}
        try:
            with self.log.phase("train", total=self.tcfg.steps, unit="step", initial=self.step) as bar:
                while self.step < self.tcfg.steps:
                    metrics, skipped = self.train_step(self.step)
                    self.after_step(metrics, skipped, bar)
                    every = self.tcfg.checkpoint_every
                    if (every and self.step % every == 0) or stop.signum is not None:
                        self.save_checkpoint(self.step)
                    if stop.signum is not None:
                        logger.warning("stopped by signal at step %d; resume with --resume latest", self.step)
                        return {"stopped_at": self.step, "signal": stop.signum}
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        done = ckpt.list_checkpoints(self.run_dir)
        if not done or int(done[-1].name.split("_")[1]) != self.step:
            self.save_checkpoint(self.step)
        if self.ema is not None:
            self.ema.copy_to(self.all_params)
        reward_after = self.evaluate("evaluate trained", save_as="heldout-trained")
        summary = self.summary(reward_before, reward_after, t_start)
        self.finish(summary)
        return summary

    def summary(self, reward_before: dict, reward_after: dict, t_start: float) -> dict:
        """The run's summary dict (written to ``summary.json``)."""
        cfg = self.cfg
        summary = {
            "objective": cfg.objective.name, "model": cfg.pipeline.model, "steps": self.step,
            "seconds": round(time.time() - t_start, 1), "num_rows": self.data.n,
            "data_skipped": getattr(self.data, "skipped", {}), "skipped_steps": self.skipped_steps,
            "reward_before": reward_before, "reward_after": reward_after,
            "heldout_prompts": cfg.validation.prompts, "samples_per_prompt": cfg.validation.samples_per_prompt,
            "final_metrics": self.last_metrics, "history": self.history,
            "status": "ok" if all(math.isfinite(v) for v in reward_after.values()) else "failed: non-finite reward_after",
        }
        objective_metrics = self.objective.summary_metrics()  # DRAGON win rate, DDO rounds
        if objective_metrics:
            summary["objective_metrics"] = objective_metrics
        return summary

    def finish(self, summary: dict) -> None:
        """Export, ``summary.json`` (with ``phase_seconds``), the report and the console table (main process)."""
        acc, cfg = self.acc, self.cfg
        if acc.is_main_process and cfg.export.enabled:
            from genalign.export import export_pipeline, push_to_hub

            with self.log.phase("export"):
                export_pipeline(self.model, cfg, self.run_dir / "export", summary=summary)
                push_to_hub(cfg, self.run_dir / "export")  # export.push_to_hub (no-op when off)
        if acc.is_main_process:
            summary["phase_seconds"] = dict(self.log.phase_seconds)
            _atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            if cfg.export.report:
                from genalign.evaluation.report import write_report

                with self.log.phase("report"):
                    write_report(self.run_dir, device=acc.device)
                summary["phase_seconds"] = dict(self.log.phase_seconds)
                _atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            if self.progress:
                print_summary_table(summary, self.run_dir)
        acc.wait_for_everyone()
        if self.trackers:
            acc.end_training()


def train(cfg: RunConfig, run_dir: str | Path, resume: str | None = None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Run a whole diffusion training job and return the summary (see :class:`DiffusionTrainer`)."""
    trainer = DiffusionTrainer(cfg, run_dir, resume=resume, progress=progress, overwrite=overwrite)
    try:
        return trainer.run()
    finally:
        if getattr(trainer, "lock", None) is not None:
            trainer.lock.release()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
