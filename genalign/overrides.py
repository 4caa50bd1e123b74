"""``--set key.sub=value`` overrides on a raw config dict (before validation), and which override set a key.

Plain dict / list manipulation with no knowledge of the schema: :mod:`genalign.config` wraps it, turning
:class:`OverrideError` into its one-line ``ConfigError`` and supplying the defaults of lists the YAML leaves out.

Source: genalign's own (issue 17: ``--set rewards.0.weight=2``; errors say ``--set`` and name keys as written).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import yaml


class OverrideError(ValueError):
    """A malformed ``--set`` item; the message is one line starting with ``--set ITEM:``."""



def shown(item: str) -> str:
    """An override as it is echoed in an error: escaped when it holds a newline or control character (one line)."""
    return item if item.isprintable() else repr(item)


def override_source(key: str, source: str, overrides: list[str] | None) -> str:
    """``--set ITEM`` when the failing ``key`` (or a section above / a key below it) was overridden on the command
    line, else ``source`` (the config file's name). The last matching override wins, as it is the one applied."""
    for item in reversed(overrides or []):
        k = item.partition("=")[0].strip()
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            return f"--set {shown(item)}"
    return source


def safe_user_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses anchors and aliases (``&a`` / ``*a``) and keys written twice in one section.

    Six lines of nested aliases expand to gigabytes (a "billion laughs" document) once validated or saved; run
    configs never need them, so they are refused before anything is built.

    Raises:
        yaml.YAMLError: not valid YAML. ValueError: the text uses an alias or repeats a key.
    """
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ValueError(f"YAML alias *{event.anchor} is not allowed in genalign configs (write the value out)")
    _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    return yaml.safe_load(text)


def _refuse_duplicate_keys(node, path: str = "") -> None:
    """A key written twice in one mapping would silently keep the last value: refuse it, naming the key."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            name = f"{path}.{key.value}" if path else str(key.value)
            if key.value in seen:
                raise ValueError(f"{name}: the key appears twice in one section (line {key.start_mark.line + 1})")
            seen.add(key.value)
            _refuse_duplicate_keys(value, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}.{i}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.steps=50"`` → (["train", "steps"], 50); the value is parsed as YAML (numbers, bools, lists).
    ``"rewards.0.weight=2"`` addresses element 0 of the ``rewards`` list.

    Raises:
        OverrideError: no ``=`` in ``item``, an empty key part, or a value that is not valid YAML.
    """
    if "=" not in item:
        raise OverrideError(f"--set {shown(item)}: expected key.sub=value")
    key, _, value = item.partition("=")
    path = key.strip().split(".")
    if not all(p.strip() for p in path):
        raise OverrideError(f"--set {shown(item)}: empty part in the key {key.strip()!r} (expected key.sub=value)")
    try:
        parsed = safe_user_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise OverrideError(f"--set {shown(item)}: the value is not valid YAML: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise OverrideError(f"--set {shown(item)}: {err}") from None
    return [p.strip() for p in path], parsed


def _is_index(part: str) -> bool:
    return part.lstrip("-").isdigit()


def apply_overrides(raw: dict, overrides: list[str] | None,
                    default_at: Callable[[list[str]], Any] | None = None) -> dict:
    """Return a copy of ``raw`` with ``--set`` overrides applied (creating intermediate sections).

    A numeric key part indexes a list (``rewards.0.weight=2``, ``pipeline.lora.target_modules.-1=to_k``); a list
    the dict leaves out starts from ``default_at(path)`` (the schema's default, e.g. the quickstart's rewards).

    Raises:
        OverrideError: ``--set ITEM: ...`` for a malformed item, an index beyond the list, or a key below a value
            that is neither a section nor a list.
    """
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        path, value = parse_override(item)
        node: Any = raw
        for depth, p in enumerate(path):
            last, above, here = depth == len(path) - 1, ".".join(path[:depth]), ".".join(path[:depth + 1])
            if isinstance(node, list):
                if not _is_index(p):
                    raise OverrideError(f"--set {shown(item)}: {above or '(root)'} is a list; address an element by its "
                                        f"index, e.g. {'.'.join(path[:depth] + ['0'] + path[depth:])}")
                i = int(p)
                if not -len(node) <= i < len(node):
                    raise OverrideError(f"--set {shown(item)}: {above} has {len(node)} element(s); index {i} is out of range")
                if not last and not isinstance(node[i], (dict, list)):
                    raise OverrideError(f"--set {shown(item)}: {here} is the value {node[i]!r}, not a section")
                if last:
                    node[i] = value
                node = node[i]
                continue
            if not isinstance(node, dict):
                raise OverrideError(f"--set {shown(item)}: {above} is the value {node!r}, not a section")
            if last:
                node[p] = value
                break
            if p not in node or node[p] is None:
                # a section or list the dict leaves out: start from its default so an index has something to address
                default = default_at(path[:depth + 1]) if default_at else None
                node[p] = copy.deepcopy(default) if isinstance(default, list) else {}
            elif not isinstance(node[p], (dict, list)):
                if _is_index(path[depth + 1]):
                    raise OverrideError(f"--set {shown(item)}: {here} is the value {node[p]!r}, not a list")
                node[p] = {}  # e.g. a string shorthand replaced by a section: pydantic names what is wrong
            node = node[p]
    return raw
