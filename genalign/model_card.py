"""The export's model card (``README.md``) and the optional upload of the export to the Hugging Face Hub.

The card is a ``huggingface_hub.ModelCard`` built from ``ModelCardData`` — YAML front matter with ``base_model``
(when the base is a hub id), ``license`` (inherited from the base where known), ``pipeline_tag``,
``library_name: diffusers`` and ``tags`` (``genalign``, the objective, ``lora``) — and the jinja2 template
``assets/templates/model_card.md.j2``: a loading snippet that runs in vanilla Diffusers (no ``import genalign``),
the before/after rewards and the hyperparameters as a table.

``export.push_to_hub: true`` uploads the export folder to ``export.hub_model_id`` (``export.hub_private``) with
``huggingface_hub.HfApi``; :func:`check_push_to_hub` is the set-up check (offline, no token, no repo id) that fails
in one line before training starts.

Source: huggingface_hub ``ModelCard`` / ``ModelCardData`` / ``HfApi.create_repo`` / ``upload_folder``; the Hub's
model-card metadata conventions.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from genalign.config import ConfigError
from genalign.pipelines.base import hub_offline_reason

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "assets" / "templates"
# Licenses of well-known bases (their hub model cards), used when the base's own card is not at hand.
KNOWN_LICENSES = {
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "stabilityai/stable-audio-open-1.0": "other",
    "cvssp/audioldm2": "cc-by-nc-sa-4.0",
}
BUILTIN_LICENSE = "apache-2.0"  # builtin:digits / builtin:music are trained by genalign (Apache-2.0) on open data
AUDIO_PIPELINES = ("stable_audio", "audioldm2", "music")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubPushError(ConfigError):
    """``export.push_to_hub`` cannot work (offline, no token, no repo id); the message is one line."""


def is_hub_id(model: str) -> bool:
    """Whether ``model`` names a hub repo (``owner/name``, not an existing local path)."""
    return bool(_HUB_ID.match(model)) and not Path(model).exists()


def base_license(model: str) -> str | None:
    """The base model's license: from its own model card (a local folder's ``README.md``, or the hub card in the
    local HF cache — no network), else :data:`KNOWN_LICENSES`, ``apache-2.0`` for genalign's built-in bases, None
    when unknown."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if model.startswith("builtin:"):
        return BUILTIN_LICENSE
    card_file = Path(model) / "README.md" if Path(model).is_dir() else None
    if card_file is None and is_hub_id(model):
        cached = try_to_load_from_cache(model, "README.md")
        card_file = Path(cached) if isinstance(cached, str) else None
    if card_file is not None and card_file.is_file():
        try:
            lic = ModelCard.load(card_file).data.license
            if lic:
                return str(lic)
        except Exception as err:  # a card without metadata / unreadable YAML: fall back to the table
            logger.info("model card of %s unreadable (%s)", model, err)
    return KNOWN_LICENSES.get(model)


def base_lora_line(model: str) -> str:
    """The card's "LoRA alone on the base" line (a comment), naming the base the way a Diffusers user loads it."""
    if model.startswith("tiny:"):
        return f"# ({model} is built in memory by genalign.pipelines.tiny: load the merged folder above)"
    # builtin:digits is a plain Diffusers folder shipped inside the package.
    ref = "genalign.pipelines.digits.digits_base_path()" if model == "builtin:digits" else repr(model)
    return f"# base = DiffusionPipeline.from_pretrained({ref}); base.load_lora_weights('<this folder>')"


def _example_prompt(cfg) -> str:
    from genalign.data.prompts import load_prompts

    try:
        return load_prompts(cfg.validation.prompts, 1)[0]
    except Exception:  # a prompt file that is not at hand where the card is written
        return "a photo of a cat"


def loading_snippet(cfg, location: str) -> str:
    """Python that loads the export with vanilla Diffusers and draws one sample with the run's validation sampler
    settings (``location``: the hub repo id or the export folder)."""
    v, name = cfg.validation, cfg.pipeline.name
    prompt = _example_prompt(cfg)
    lines = ["from diffusers import DiffusionPipeline", "",
             f"pipe = DiffusionPipeline.from_pretrained({location!r})  # the aligned pipeline, LoRA merged"]
    call = f"pipe({prompt!r}, num_inference_steps={v.num_inference_steps}, guidance_scale={v.guidance_scale})"
    if name in AUDIO_PIPELINES:
        lines += [f"audio = {call}.audios[0]  # (channels, samples) at pipe's sample rate"]
    elif name == "controlnet":
        lines += [f"# image = {call[:-1]}, image=control_image).images[0]  # a ControlNet needs its condition"]
    else:
        lines += [f"image = {call}.images[0]", "image.save('sample.png')"]
    lines += ["", "# or the LoRA alone on the base model:", base_lora_line(cfg.pipeline.model)]
    return "\n".join(lines)


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def hyperparameters(cfg) -> list[tuple[str, str]]:
    """The card's hyperparameter table: objective parameters, LoRA, optimisation, sampling of the data."""
    t = cfg.train
    rows = [("objective", cfg.objective.name)]
    rows += [(f"objective.{k}", v) for k, v in cfg.objective.model_dump().items() if k != "name"]
    lora = cfg.pipeline.lora
    rows += ([("LoRA rank / alpha", f"{lora.rank} / {lora.alpha or lora.rank}"),
              ("LoRA target modules", ", ".join(lora.target_modules))] if lora else [("LoRA", "none (full fine-tune)")])
    rows += [("steps", t.steps),
             ("batch size x gradient accumulation", f"{t.batch_size} x {t.gradient_accumulation_steps}"),
             ("learning rate", t.learning_rate), ("LR schedule", t.lr_scheduler),
             ("optimizer", getattr(t, "optimizer", "adamw")), ("mixed precision", t.mixed_precision),
             ("seed", cfg.seed)]
    return [(_cell(k), _cell(v)) for k, v in rows]


def model_card(cfg, summary: dict | None = None, location: str | None = None) -> str:
    """The export's ``README.md``: a Hub model card (see the module docstring).

    Args:
        cfg: the run's :class:`~genalign.config.RunConfig`.
        summary: the training summary (``reward_before`` / ``reward_after``, ``heldout_prompts``).
        location: what the loading snippet loads; default: ``export.hub_model_id`` when pushing, else ``"."`` (the
            export folder, run from inside it).

    Returns:
        Markdown with YAML front matter.
    """
    from huggingface_hub import ModelCard, ModelCardData

    model, name = cfg.pipeline.model, cfg.objective.name
    audio = cfg.pipeline.name in AUDIO_PIPELINES
    lic = base_license(model)
    tags = ["genalign", name, *(["lora"] if cfg.pipeline.lora else []), "diffusers",
            "text-to-audio" if audio else "text-to-image"]
    data = ModelCardData(base_model=model if is_hub_id(model) else None, license=lic, library_name="diffusers",
                         pipeline_tag="text-to-audio" if audio else "text-to-image", tags=tags)
    rewards = []
    before, after = (summary or {}).get("reward_before") or {}, (summary or {}).get("reward_after") or {}
    for k in dict.fromkeys([*before, *after]):
        b, a = float(before.get(k, math.nan)), float(after.get(k, math.nan))
        rewards.append({"name": k, "before": f"{b:.4f}", "after": f"{a:.4f}",
                        "change": "nan" if math.isnan(a - b) else f"{a - b:+.4f}"})
    if location is None:
        location = cfg.export.hub_model_id if getattr(cfg.export, "push_to_hub", False) else "."
    base_desc = (f"[`{model}`](https://huggingface.co/{model})" if is_hub_id(model) else f"`{model}`")
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATES / "model_card.md.j2"),
        title=f"{name} on {model}", base_description=f"The base model {base_desc}", objective=name,
        lora=cfg.pipeline.lora, snippet=loading_snippet(cfg, location), rewards=rewards,
        heldout_prompts=(summary or {}).get("heldout_prompts"),
        samples_per_prompt=(summary or {}).get("samples_per_prompt"),
        hyperparameters=hyperparameters(cfg), data=_cell(cfg.data.source.model_dump()),
        license_note=None if lic else "License: that of the base model (not known to genalign).")
    return str(card)


def check_push_to_hub(cfg) -> None:
    """Set-up check for ``export.push_to_hub`` (call before any long phase); a no-op when it is off.

    Raises:
        HubPushError: one line: no ``export.hub_model_id``, the export disabled, no network / ``HF_HUB_OFFLINE``
            (:func:`genalign.pipelines.base.hub_offline_reason`), or no Hugging Face token.
    """
    ex = cfg.export
    if not getattr(ex, "push_to_hub", False):
        return
    if not ex.hub_model_id:
        raise HubPushError("export.hub_model_id: needed when export.push_to_hub is true (owner/name)")
    if not ex.enabled:
        raise HubPushError("export.push_to_hub: true needs export.enabled: true (there is nothing to push)")
    reason = hub_offline_reason()
    if reason is not None:
        raise HubPushError(f"export.push_to_hub: cannot reach the Hugging Face Hub ({reason}); set "
                           "export.push_to_hub: false (RUN_DIR/export is written anyway) or run with network")
    from huggingface_hub import get_token

    if not get_token():
        raise HubPushError("export.push_to_hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN "
                           "(a token with write access)")


def push_to_hub(cfg, export_dir: str | Path) -> str | None:
    """Upload ``export_dir`` to ``export.hub_model_id`` when ``export.push_to_hub`` is set (creating the repo,
    private when ``export.hub_private``); returns the repo URL, or None when pushing is off.

    Raises:
        HubPushError: as :func:`check_push_to_hub`. huggingface_hub errors (HTTP) pass through.
    """
    if not getattr(cfg.export, "push_to_hub", False):
        return None
    check_push_to_hub(cfg)
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(cfg.export.hub_model_id, private=cfg.export.hub_private, exist_ok=True)
    api.upload_folder(repo_id=cfg.export.hub_model_id, folder_path=str(export_dir),
                      commit_message=f"genalign: {cfg.objective.name} on {cfg.pipeline.model}")
    logger.info("pushed %s to %s", export_dir, repo)
    return str(repo)
