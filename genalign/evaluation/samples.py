"""A run's held-out samples (``genalign score --run``, the report): ``RUN_DIR/samples/heldout-<which>/``.

Training keeps the samples its before/after evaluation drew there (``sample_00000.png`` + ``metadata.rank<r>.jsonl``
with each sample's rewards, :mod:`genalign.evaluation.validation`); :func:`run_samples` reuses them and only draws
for runs that have none (old runs), from the export or the base model. Either way the folder gets a
``metadata.jsonl`` manifest (``file_name``, ``prompt``, ``seed``, ``index``, ``sample``) that ``genalign score``
reads. Sample ``i`` of the expanded held-out prompt list uses seed ``validation.seed + i``, so base and trained
samples share their noise. Cached draws are keyed by the run (what the model folder holds, the settings), not by
how the run's path is spelled.

Source: genalign's own; generation through diffusers ``DiffusionPipeline``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from genalign.evaluation.scoring import SAMPLES_DIR, read_manifest
from genalign.evaluation.validation import read_saved_samples

MANIFEST_KEYS = ("file_name", "prompt", "seed", "index", "sample")


def ensure_manifest(folder: str | Path) -> list[dict]:
    """Rows of the samples training kept in ``folder`` (every rank merged, by index), with a ``metadata.jsonl``
    manifest written beside them when missing so ``genalign score FOLDER`` reads the folder as it is.

    Returns:
        the rows of :func:`~genalign.evaluation.validation.read_saved_samples` (``[]`` when training kept none).
    """
    folder = Path(folder)
    rows = read_saved_samples(folder) if folder.is_dir() else []
    if rows and not (folder / "metadata.jsonl").exists():
        tmp = folder / ".metadata.jsonl.tmp"
        tmp.write_text("".join(json.dumps({k: r[k] for k in MANIFEST_KEYS if k in r}) + "\n" for r in rows),
                       encoding="utf-8")
        tmp.replace(folder / "metadata.jsonl")
    return rows


def _folder_stamp(folder: Path) -> str:
    """Cheap fingerprint of a model folder: relative names, sizes and mtimes of its files."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def run_samples(run_dir: str | Path, which: str = "trained", device: str | torch.device | None = None,
                regenerate: bool = False, progress: bool = False) -> Path:
    """Generate (or reuse) the run's held-out samples: ``RUN_DIR/samples/heldout-<which>/`` with PNGs and a
    ``metadata.jsonl`` (``file_name``, ``prompt``, ``seed``, ``index``, ``sample``) that :func:`score_samples`
    reads.

    Prompts, samples per prompt, sampler steps, guidance and seeds come from the run's ``config.yaml``
    (``validation``): sample ``i`` of the expanded prompt list uses seed ``validation.seed + i``, exactly as the
    trainer's before/after evaluation does, so ``base`` and ``trained`` grids share their noise. The samples
    training kept (the model as trained, before the LoRA merge of the export) are used as they are; drawn samples
    are reused while the model folder's content, the settings and the files are unchanged (``generation.json``
    records them; the run's path is not part of the key).

    Args:
        run_dir: a run folder (``config.yaml``; ``export/`` for ``which="trained"``).
        which: ``"trained"`` (``RUN_DIR/export``) or ``"base"`` (the config's ``pipeline.model`` / ``pipeline.vae``).
        device: torch device (default: cuda if available, else cpu).
        regenerate: ignore cached samples.

    Returns:
        The samples folder.

    Raises:
        FileNotFoundError: no ``config.yaml``, or no ``export/model_index.json`` for ``which="trained"``.
        genalign.rewards.WeightsNotFoundError: the base model cannot be loaded offline.
        ValueError: another ``which``, or a pipeline that is not prompt-only text-to-image (audio, ControlNet).
    """
    from genalign.config import load_config
    from genalign.data.prompts import load_prompts

    run_dir = Path(run_dir)
    if which not in ("trained", "base"):
        raise ValueError(f"which must be 'trained' or 'base', got {which!r}")
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    v = cfg.validation
    prompts = [p for p in load_prompts(v.prompts, v.max_prompts) for _ in range(v.samples_per_prompt)]
    out = run_dir / SAMPLES_DIR / f"heldout-{which}"
    kept = ensure_manifest(out) if not regenerate else []
    if kept and [r["prompt"] for r in kept] == prompts and all((out / r["file_name"]).exists() for r in kept):
        return out  # training's own samples of this run
    if which == "trained":
        model = run_dir / "export"
        if not (model / "model_index.json").exists():
            raise FileNotFoundError(f"{run_dir}: no Diffusers export (export/model_index.json); run "
                                    f"`genalign export {run_dir} {run_dir}/export` first")
        model_id, model_key, stamp = str(model), "RUN_DIR/export", _folder_stamp(model)
    else:
        model_id = cfg.pipeline.model
        local = Path(model_id)
        model_key = str(local.resolve()) if local.is_dir() else model_id
        stamp = _folder_stamp(local) if local.is_dir() else ""
    key = {"model": model_key, "vae": cfg.pipeline.vae if which == "base" else None, "stamp": stamp,
           "resolution": cfg.pipeline.resolution, "prompts": prompts, "seed": v.seed,
           "num_inference_steps": v.num_inference_steps, "guidance_scale": v.guidance_scale}
    meta = out / "metadata.jsonl"
    if not regenerate and (out / "generation.json").exists() and meta.exists():
        try:
            same = json.loads((out / "generation.json").read_text()) == key
        except ValueError:
            same = False
        rows = read_manifest(meta) if same else []
        if same and len(rows) == len(prompts) and all(r[0].exists() for r in rows):
            return out
    _generate(model_id, cfg, prompts, out, which, device, progress)
    (out / "generation.json").write_text(json.dumps(key, indent=1))
    return out


def _generate(model_id: str, cfg, prompts: list[str], out: Path, which: str, device, progress: bool) -> None:
    from diffusers.utils import numpy_to_pil
    from tqdm.auto import tqdm

    from genalign.pipelines.base import load_diffusers_pipeline

    v = cfg.validation
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_diffusers_pipeline(model_id, cfg.pipeline.revision if which == "base" else None)
    if which == "base" and cfg.pipeline.vae:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(cfg.pipeline.vae)
    if not (hasattr(pipe, "unet") and hasattr(getattr(pipe, "vae", None), "config")
            and hasattr(pipe.vae.config, "block_out_channels")):
        raise ValueError(f"{model_id}: {type(pipe).__name__} is not a text-to-image UNet pipeline; generating "
                         "held-out samples supports image runs only (score audio files with --audio DIR)")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    res = cfg.pipeline.resolution or int(pipe.unet.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.png", "metadata.rank*.jsonl"):  # nothing of an earlier draw may mix with this one
        for old in out.glob(pattern):
            old.unlink()
    n_per = v.samples_per_prompt
    rows = []
    bar = tqdm(total=len(prompts), desc=f"generating {which}", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(prompts), v.batch_size):
        idx = list(range(i, min(i + v.batch_size, len(prompts))))
        gens = [torch.Generator().manual_seed(v.seed + j) for j in idx]
        try:
            with torch.no_grad():
                imgs = pipe([prompts[j] for j in idx], num_inference_steps=v.num_inference_steps,
                            guidance_scale=v.guidance_scale, generator=gens, output_type="np", height=res,
                            width=res).images
        except TypeError as err:  # e.g. a ControlNet pipeline that needs a control image
            raise ValueError(f"{model_id}: cannot sample {type(pipe).__name__} from prompts alone ({err})") from None
        for j, img in zip(idx, numpy_to_pil(imgs)):
            name = f"{j:05d}.png"
            img.save(out / name)
            rows.append({"file_name": name, "prompt": prompts[j], "seed": v.seed + j, "index": j // n_per,
                         "sample": j % n_per})
        bar.update(len(idx))
    bar.close()
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
