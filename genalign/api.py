"""genalign's public Python API, in one place (``genalign/__init__.py`` re-exports it; the CLI only calls it).

    import genalign
    cfg = genalign.load_config("configs/treg_tiny.yaml", ["train.steps=5"])
    summary = genalign.train(cfg, "runs/treg")             # LM run on TRL (pipeline.name: language)
    summary = genalign.train(genalign.load_config(), "runs/quickstart")   # diffusion quickstart
    genalign.export("runs/quickstart", "aligned-pipeline")
    genalign.generate("runs/quickstart", "digits:heldout", "samples/")
    genalign.score("samples/", ["digit_classifier"])
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from genalign.config import LMRunConfig, RunConfig
from genalign.config import load_config as _load_config

__all__ = ["load_config", "train", "export", "generate", "score", "score_run", "score_conditions", "report"]

QUICKSTART = Path(__file__).resolve().parent / "assets" / "quickstart.yaml"


def load_config(path=None, overrides: list[str] | None = None) -> RunConfig | LMRunConfig:
    """Load and validate a run config (diffusion or language model; see :func:`genalign.config.load_config`).

    Args:
        path: YAML file; ``None`` = the built-in digits quickstart's defaults. overrides: ``["train.steps=5", ...]``.

    Raises:
        ConfigError: one line naming the file, the key and the value.
    """
    return _load_config(path, overrides)


def train(cfg: RunConfig | LMRunConfig, run_dir, resume: str | None = None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Train from a validated config; the pipeline family picks the trainer.

    ``pipeline.name: language | video_language`` → the TRL trainer (:func:`genalign.training.lm.train_lm`);
    anything else → the diffusion Accelerate loop (:func:`genalign.training.trainer.train`). Both write the same
    run folder: ``config.yaml``, ``checkpoints/`` (atomic), ``summary.json``, ``export/``.

    Args:
        cfg: from :func:`load_config`. run_dir: run folder (created).
        resume: None | ``"latest"`` (newest complete checkpoint of ``run_dir``) | a checkpoint folder.
        progress: progress bar / result table.
        overwrite: start over in a folder holding a previous run (only genalign's run files are removed).

    Returns:
        the summary dict (also ``run_dir/summary.json``).

    Raises:
        genalign.training.run_folder.RunFolderError: a non-empty folder without ``resume`` / ``overwrite``, a locked
            folder, or a resume whose config changes the run.
    """
    if isinstance(cfg, LMRunConfig):
        from genalign.training.lm import train_lm  # TRL is an optional dependency ([lm] extra)

        return train_lm(cfg, run_dir, resume=resume, progress=progress, overwrite=overwrite)
    from genalign.training.trainer import train as train_diffusion

    return train_diffusion(cfg, run_dir, resume=resume, progress=progress, overwrite=overwrite)


def _run_family(run_dir: Path) -> str:
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        raw = yaml.safe_load(cfg_path.read_text()) or {}
        name = (raw.get("pipeline") or {}).get("name") if isinstance(raw, dict) else None
        if name in ("language", "video_language"):
            return "lm"
    return "diffusion"


def export(run_dir, out_dir, checkpoint: str = "latest") -> Path:
    """Export a run's checkpoint: diffusion runs as a vanilla Diffusers folder + LoRA + model card
    (:func:`genalign.training.checkpoint.export_checkpoint`), LM runs as merged weights + ``adapter/`` (:func:`genalign.training.lm.
    export_lm_run`). Returns the export folder.

    Raises:
        FileNotFoundError: no run / no complete checkpoint.
    """
    run_dir = Path(run_dir)
    if _run_family(run_dir) == "lm":
        from genalign.training.lm import export_lm_run

        return Path(export_lm_run(run_dir, out_dir, checkpoint))
    from genalign.training.checkpoint import export_checkpoint

    return Path(export_checkpoint(run_dir, out_dir, checkpoint))


def generate(model: str, prompts: str, out, steps: int = 25, guidance_scale: float = 1.0, seed: int = 0,
             batch_size: int = 16, num_per_prompt: int = 1, max_prompts: int | None = None) -> list[dict]:
    """Generate images (PNG) or, for text-to-music pipelines, WAV files into ``out`` with ``metadata.jsonl``.

    Args:
        model: Diffusers folder | hub id | ``builtin:digits`` | a run folder (its ``export/``).
        prompts: prompt spec (``digits:heldout``, ``parti``, a .txt/.tsv/.jsonl file).
        out: output folder. steps: sampler steps. guidance_scale: CFG (1 = off). seed: sample i uses seed + i.
        batch_size, num_per_prompt, max_prompts: batching and prompt selection.

    Returns:
        the metadata rows (``file_name``, ``prompt``, ``seed``).

    Library: diffusers ``DiffusionPipeline`` (images), genalign's audio adapters (WAV).
    """
    import torch
    from diffusers.utils import numpy_to_pil

    from genalign.data.prompts import load_prompts
    from genalign.data.audio import generate_audio_files
    from genalign.pipelines.audio import audio_adapter_for
    from genalign.pipelines.base import load_diffusers_pipeline

    if (Path(model) / "export" / "model_index.json").exists():
        model = str(Path(model) / "export")
    out = Path(out)
    plist = [p for p in load_prompts(prompts, max_prompts) for _ in range(num_per_prompt)]
    out.mkdir(parents=True, exist_ok=True)
    audio = audio_adapter_for(model)
    if audio is not None:  # text-to-music: WAV files
        rows = generate_audio_files(audio, plist, out, steps, guidance_scale, seed, batch_size)
    else:
        pipe = load_diffusers_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        rows = []
        for i in range(0, len(plist), batch_size):
            chunk = plist[i:i + batch_size]
            gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
            imgs = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                        output_type="np").images
            for j, img in enumerate(numpy_to_pil(imgs)):
                name = f"{i + j:05d}.png"
                img.save(out / name)
                rows.append({"file_name": name, "prompt": chunk[j], "seed": seed + i + j})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def score(samples, rewards: list, batch_size: int = 8, device: str | None = None, prompts: str | None = None,
          modality: str = "auto", progress: bool = True) -> dict:
    """Score a folder of images / audio (or a jsonl manifest) with rewards (see
    :func:`genalign.evaluation.scoring.score_samples`).

    Args:
        samples: folder or manifest. rewards: reward names or ``{"name", "weight", "kwargs"}`` dicts.
        prompts: prompt file matched to samples. modality: ``image`` | ``audio`` | ``auto``.

    Returns:
        ``{"per_sample": [...], "stats": {reward: {n, mean, std, min, max}}, "set": [...], "skipped": int,
        "modality": str, "folder": str}``.
    """
    from genalign.evaluation.scoring import score_samples

    specs = [{"name": r} if isinstance(r, str) else r for r in rewards]
    res = score_samples(str(samples), specs, batch_size=batch_size, device=device, prompts=prompts,
                        modality=modality, progress=progress)
    res.setdefault("folder", str(samples))
    return res


def score_run(run_dir, rewards: list | None = None, which: str = "trained", batch_size: int = 8,
              device: str | None = None, progress: bool = True) -> dict[str, dict]:
    """Score a run's held-out samples (generated once into ``RUN_DIR/samples/``, then reused) with ``rewards``
    (default: the run config's rewards).

    Args:
        which: ``trained`` (the export), ``base`` or ``both``.

    Returns:
        ``{"trained" | "base": result}`` with results as :func:`score` returns them.
    """
    from genalign.evaluation.samples import run_samples

    specs = [{"name": r} if isinstance(r, str) else r for r in rewards or []]
    if not specs:
        specs = [it.model_dump() for it in load_config(Path(run_dir) / "config.yaml").rewards]
    out = {}
    for label in (["base", "trained"] if which == "both" else [which]):
        folder = run_samples(run_dir, label, device=device, progress=progress)
        out[label] = score(folder, specs, batch_size=batch_size, device=device, modality="auto", progress=progress)
    return out


def score_conditions(folder, reward: str, metric: str | None = None, device: str | None = None) -> dict:
    """Controllability of a ControlNet's samples on a condition dataset (see
    :func:`genalign.evaluation.condition.score_condition_dataset`): ``{"metric", "value", "n", ...}``."""
    from genalign.evaluation.condition import score_condition_dataset

    return score_condition_dataset(folder, reward, metric, device=device)

def report(run_dir, out=None, samples: bool = True, device: str | None = None) -> Path:
    """Write a run's self-contained HTML report (default ``RUN_DIR/report.html``): diffusion runs with before/after
    sample grids and reward curves (:func:`genalign.evaluation.report.write_report`), LM runs with their training
    curves (:func:`genalign.training.lm.report.write_lm_report`).

    Raises:
        FileNotFoundError: no run folder / no summary.
    """
    run_dir = Path(run_dir)
    if _run_family(run_dir) == "lm":
        from genalign.training.lm.report import write_lm_report

        return write_lm_report(run_dir, out)
    from genalign.evaluation.report import write_report

    return write_report(run_dir, out, samples=samples, device=device)
