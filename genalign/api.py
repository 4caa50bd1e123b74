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

    First the pre-load checks of ``genalign plan`` (:func:`genalign.plan.preflight.preflight`; off with
    ``train.preflight: false``). Then ``pipeline.name: language | video_language`` → the TRL trainer (:func:`genalign.training.lm.train_lm`);
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
        genalign.plan.preflight.PreflightError: ``train.preflight`` found data that would not load, a video cut by
            ``max_length`` or parameters that do not fit the GPU — before any weight is loaded.
    """
    if cfg.train.preflight:
        from genalign.plan.preflight import preflight

        preflight(cfg, label="config")
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
             batch_size: int = 16, num_per_prompt: int = 1, max_prompts: int | None = None, grid: bool = False,
             progress: bool = False) -> list[dict]:
    """Generate images (PNG) or, for text-to-music pipelines, WAV files into ``out`` with ``metadata.jsonl``.

    Args:
        model: Diffusers folder | hub id | ``builtin:digits`` | a run folder (its ``export/``).
        prompts: prompt spec (``digits:heldout``, ``parti``, a .txt/.tsv/.jsonl file).
        out: output folder. steps: sampler steps. guidance_scale: CFG (1 = off). seed: sample i uses seed + i.
        batch_size, num_per_prompt, max_prompts: batching and prompt selection.
        grid: also write ``grid.png`` (one row per prompt, one column per sample; tiny images upscaled with
            nearest-neighbour to at least 128 px) through ``diffusers.utils.make_image_grid``.
        progress: a progress bar over the images (tqdm).

    Returns:
        the metadata rows (``file_name``, ``prompt``, ``seed``).

    Raises:
        FileNotFoundError: an unknown prompt set / missing prompt file (one line). WeightsNotFoundError: the model
            cannot be loaded (offline: at once).

    Library: diffusers ``DiffusionPipeline`` and ``make_image_grid`` (images), genalign's audio adapters (WAV).
    """
    import torch
    from diffusers.utils import numpy_to_pil
    from tqdm.auto import tqdm

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
    images = []
    if audio is not None:  # text-to-music: WAV files
        rows = generate_audio_files(audio, plist, out, steps, guidance_scale, seed, batch_size, progress=progress)
    else:
        pipe = load_diffusers_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        rows = []
        with tqdm(total=len(plist), desc="generate", unit="image", disable=not progress, dynamic_ncols=True) as bar:
            for i in range(0, len(plist), batch_size):
                chunk = plist[i:i + batch_size]
                gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
                imgs = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                            output_type="np").images
                for j, img in enumerate(numpy_to_pil(imgs)):
                    name = f"{i + j:05d}.png"
                    img.save(out / name)
                    images.append(img)
                    rows.append({"file_name": name, "prompt": chunk[j], "seed": seed + i + j})
                bar.update(len(chunk))
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if grid and images:
        image_grid(images, num_per_prompt).save(out / "grid.png")
    return rows


def image_grid(images: list, cols: int, min_px: int = 128):
    """A grid of PIL images (row-major, ``cols`` per row) with ``diffusers.utils.make_image_grid``, each image first
    upscaled by an integer factor (nearest-neighbour) until its shorter side is at least ``min_px`` pixels."""
    import math

    from diffusers.utils import make_image_grid
    from PIL import Image

    k = max(1, math.ceil(min_px / max(1, min(images[0].size))))
    big = [im.resize((im.width * k, im.height * k), Image.NEAREST) if k > 1 else im for im in images]
    rows = math.ceil(len(big) / cols)
    big += [Image.new(big[0].mode, big[0].size, "white")] * (rows * cols - len(big))  # pad the last row
    return make_image_grid(big, rows=rows, cols=cols)


def _media_manifest(samples: Path, recursive: bool, tmp: Path) -> tuple[Path, int]:
    """What to hand to the scorer for ``samples``: a single media file or a recursive folder becomes a jsonl
    manifest of absolute paths in ``tmp`` (sidecar ``<stem>.txt`` prompts kept); returns it and the number of media
    files in sub-folders left out (not recursive).

    Raises:
        ValueError: a file that is neither media nor a jsonl manifest; a folder without media files (one line).
    """
    from genalign.evaluation.scoring import AUDIO_SUFFIXES, IMAGE_SUFFIXES

    media = IMAGE_SUFFIXES + AUDIO_SUFFIXES

    def manifest(files: list[Path]) -> Path:
        lines = []
        for f in files:
            txt = f.with_suffix(".txt")
            prompt = txt.read_text(encoding="utf-8").strip() if txt.exists() else None
            lines.append(json.dumps({"file_name": str(f.resolve()), "prompt": prompt}))
        (tmp / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return tmp / "manifest.jsonl"

    if samples.is_file():
        if samples.suffix.lower() in media:
            return manifest([samples]), 0
        if samples.suffix.lower() != ".jsonl":
            raise ValueError(f"{samples}: not an image ({', '.join(IMAGE_SUFFIXES)}), audio "
                             f"({', '.join(AUDIO_SUFFIXES)}) or .jsonl manifest file")
        return samples, 0
    if not samples.is_dir():
        return samples, 0  # the scorer names the missing path
    if any((samples / m).exists() for m in ("prompts.jsonl", "metadata.jsonl")) and not recursive:
        return samples, 0
    direct = [f for f in sorted(samples.iterdir()) if f.is_file() and f.suffix.lower() in media]
    nested = [f for f in sorted(samples.rglob("*")) if f.is_file() and f.suffix.lower() in media
              and f.parent != samples]
    if recursive:
        if not direct + nested:
            raise ValueError(f"{samples}: no image or audio files in it or its sub-folders")
        return manifest(sorted(direct + nested)), 0
    if not direct:
        hint = f"; {len(nested)} in sub-folders: add --recursive (recursive=True)" if nested else ""
        raise ValueError(f"{samples}: no image or audio files{hint}")
    return samples, len(nested)


def score(samples, rewards: list, batch_size: int = 8, device: str | None = None, prompts: str | None = None,
          modality: str = "auto", progress: bool = True, recursive: bool = False) -> dict:
    """Score a folder of images / audio, a single file, or a jsonl manifest with rewards (see
    :func:`genalign.evaluation.scoring.score_samples`).

    Args:
        samples: folder, one image / audio file, or manifest. rewards: reward names or ``{"name", "weight",
            "kwargs"}`` dicts (``kwargs`` go to the reward's constructor).
        prompts: prompt file matched to samples. modality: ``image`` | ``audio`` | ``auto``.
        recursive: also score the files of sub-folders; without it they are counted (``skipped_subfolders``).

    Returns:
        ``{"per_sample": [...], "stats": {reward: {n, mean, std, min, max}}, "set": [...], "skipped": int,
        "skipped_subfolders": int, "modality": str, "folder": str}``.

    Raises:
        ValueError: a folder without samples, a file that is no sample (one line). FileNotFoundError: a missing
            path. KeyError: an unknown reward.
    """
    import tempfile

    from genalign.evaluation.scoring import score_samples

    specs = [{"name": r} if isinstance(r, str) else r for r in rewards]
    with tempfile.TemporaryDirectory(prefix="genalign-score-") as tmp:
        src, nested = _media_manifest(Path(samples), recursive, Path(tmp))
        res = score_samples(str(src), specs, batch_size=batch_size, device=device, prompts=prompts,
                            modality=modality, progress=progress)
    res["folder"] = str(samples)
    res["skipped_subfolders"] = nested
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
