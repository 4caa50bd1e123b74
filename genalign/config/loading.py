"""Loading and saving a run config: YAML in, ``--set a.b=c`` overrides, one clear line per error.

A run config has the sections of the data flow: ``pipeline`` (what model, LoRA or full fine-tune, reference
strategy) → ``data`` (preference pairs, on-policy pairs, prompts) → ``objective`` (name + its own typed
hyperparameters, validated by the objective's ``Config`` class) → ``rewards`` (scoring / training signals) →
``train`` (the Accelerate loop) → ``validation`` → ``export``. Unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` with a single line naming the file, the key and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from genalign.config.base import ConfigError
from genalign.config.diffusion import DATA_SOURCES_BY_KIND, ObjectiveConfig, RunConfig
from genalign.config.lm import LM_PIPELINES, LMRunConfig
from genalign.overrides import OverrideError, override_source, safe_user_yaml
from genalign.overrides import apply_overrides as _apply_overrides


def is_lm_data(data: dict) -> bool:
    pipe = data.get("pipeline")
    return isinstance(pipe, dict) and pipe.get("name") in LM_PIPELINES


def _format_error(err: ValidationError, source: str, prefix: str = "") -> str:
    e = err.errors()[0]
    key = _error_key(err, prefix) or "(root)"
    value = e.get("input")
    if isinstance(value, dict):
        value = "{...}"
    msg = e["msg"].replace("\n", " ")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {value!r}: {msg}{more}"


_UNION_TAGS = ("onpolicy", "preference", "prompts", "images")


def _error_key(err: ValidationError, prefix: str = "") -> str:
    """The failing key as the user writes it: ``data.source.rounds`` (pydantic's union tags dropped), list
    elements by index (``rewards.0.weight``)."""
    # a key with a newline or control character is shown escaped, so the error stays one line
    loc = [str(p) if str(p).isprintable() else repr(str(p)) for p in err.errors()[0]["loc"]
           if str(p) not in _UNION_TAGS]
    return ".".join(([prefix] if prefix else []) + loc)


def _source_of(err: ValidationError, source: str, overrides: list[str] | None, prefix: str = "") -> str:
    """Name ``--set`` as the source when the failing key was overridden on the command line."""
    return override_source(_error_key(err, prefix), source, overrides)


def _schema_default(path: list[str]) -> Any:
    """The default (JSON form) of the config field at ``path`` (e.g. ``["rewards"]``), or None when none."""
    try:
        node: Any = RunConfig().model_dump(mode="json")
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node[p]
    except (ValidationError, KeyError, IndexError, ValueError, TypeError):
        return None
    return node


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """A copy of ``raw`` with ``--set`` overrides applied (:func:`genalign.overrides.apply_overrides`; a list the
    YAML leaves out, e.g. ``rewards``, starts from the schema's default).

    Raises:
        ConfigError: a malformed item or an index out of range (one line starting with ``--set ITEM:``).
    """
    try:
        return _apply_overrides(raw, overrides, _schema_default)
    except OverrideError as err:
        raise ConfigError(str(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> RunConfig | LMRunConfig:
    """Load and validate a run config.

    Args:
        path: YAML file (``None`` = all defaults: the digits quickstart).
        overrides: ``["train.steps=50", "pipeline.lora.rank=4", ...]``.
        data: a dict used instead of reading ``path`` (still reported as ``path`` in errors).

    Returns:
        the validated :class:`RunConfig`, or :class:`LMRunConfig` when ``pipeline.name`` is ``language`` /
        ``video_language`` (language-model objectives trained on TRL).

    Raises:
        ConfigError: missing/unparsable file, unknown key, wrong type, out-of-range value, unknown
            objective/reward name — one line naming the file, the key and the value.
    """
    source = str(path) if path else "<defaults>"
    if data is None and path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{source}: config file not found")
        if p.is_dir():
            raise ConfigError(f"{source}: is a folder, not a YAML config file")
        try:
            data = safe_user_yaml(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: not a text file (a YAML run config is expected)") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
    schema = LMRunConfig if is_lm_data(data) else RunConfig
    try:
        cfg = schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, _source_of(err, source, overrides))) from None
    from genalign.registry import objectives, rewards

    try:
        obj_cls = objectives.get(cfg.objective.name)
    except KeyError as err:
        where = override_source("objective.name", source, overrides)
        raise ConfigError(f"{where}: objective.name: {cfg.objective.name!r}: {err.args[0]}") from None
    family = getattr(obj_cls, "family", "diffusion")

    def at(key: str) -> str:  # the file, or the --set item that set the key
        return override_source(key, source, overrides)

    if isinstance(cfg, LMRunConfig) and family != "lm":
        raise ConfigError(f"{at('objective.name')}: objective.name: {cfg.objective.name!r}: a diffusion objective; "
                          f"pipeline {cfg.pipeline.name!r} trains language-model objectives (dpo, rpo, fdpo, "
                          "treg, rrpo)")
    if not isinstance(cfg, LMRunConfig) and family == "lm":
        hint = "; for diffusion use diffusion_dpo" if cfg.objective.name == "dpo" else ""
        raise ConfigError(f"{at('objective.name')}: objective.name: {cfg.objective.name!r}: a language-model objective; set "
                          f"pipeline.name: language (or video_language){hint}")
    try:
        params = obj_cls.Config.model_validate(cfg.objective.model_extra or {})
    except ValidationError as err:
        where = _source_of(err, source, overrides, "objective")
        raise ConfigError(_format_error(err, where, prefix="objective")) from None
    if isinstance(cfg, LMRunConfig):
        if cfg.pipeline.name == "video_language" and not getattr(obj_cls, "video", False):
            raise ConfigError(f"{at('objective.name')}: objective.name: {cfg.objective.name!r}: video-LM training is implemented "
                              "for rrpo only")
        if cfg.pipeline.lora is None and cfg.pipeline.reference == "adapter_off":
            raise ConfigError(f"{at('pipeline.reference')}: pipeline.reference: 'adapter_off': a full fine-tune (lora: null) needs "
                              "reference: frozen_copy")
        cfg.objective = ObjectiveConfig(name=cfg.objective.name, **params.model_dump())
        return cfg
    if getattr(obj_cls, "needs_reference", False) and cfg.pipeline.reference == "none":
        raise ConfigError(f"{at('pipeline.reference')}: pipeline.reference: 'none': objective {cfg.objective.name!r} needs a reference "
                          "model (adapter_off with LoRA, or frozen_copy)")
    kinds = getattr(obj_cls, "data_sources", None) or DATA_SOURCES_BY_KIND.get(obj_cls.data_kind)
    if kinds and cfg.data.source.kind not in kinds:
        raise ConfigError(f"{at('data.source.kind')}: data.source.kind: {cfg.data.source.kind!r}: objective {cfg.objective.name!r} "
                          f"needs one of {', '.join(kinds)}")
    # Keep the validated, defaults-filled parameters so the saved config is fully resolved.
    cfg.objective = ObjectiveConfig(name=cfg.objective.name, **params.model_dump())
    for i, item in enumerate(cfg.rewards):
        if item.name not in rewards:
            raise ConfigError(f"{override_source(f'rewards.{i}.name', source, overrides)}: rewards.{i}.name: "
                              f"{item.name!r}: unknown reward; known: {', '.join(rewards.names())}")
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically: temp file then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
