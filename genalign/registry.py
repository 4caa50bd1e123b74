"""Name → class registries for pipelines, objectives and rewards.

Built-in entries register themselves with a decorator when their module is imported; third-party packages
add entries without forking through Python entry points::

    # in the plug-in's pyproject.toml
    [project.entry-points."genalign.objectives"]
    my_loss = "my_pkg.objectives:MyObjective"

The entry-point value is loaded lazily, the first time the name is looked up or listed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Entry:
    """One registered name: the class (or a lazy ``"module:attr"`` path) and a one-line description."""

    name: str
    target: Any
    description: str
    source: str  # "builtin" or the distribution / entry-point value

    def load(self) -> Any:
        """Import the target if it is still a ``"module:attr"`` string and return it."""
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self.target = obj
        return self.target


class Registry(Generic[T]):
    """A registry of named classes with entry-point discovery.

    Args:
        kind: human name used in messages ("objective", "reward", "pipeline").
        group: entry-point group scanned once, e.g. ``"genalign.objectives"``.
        builtin_modules: modules imported before the first lookup so their decorators run.

    Raises:
        KeyError: from :meth:`get` for an unknown name; the message lists the known names.
        ValueError: from :meth:`register` when a name is registered twice by different targets.
    """

    def __init__(self, kind: str, group: str, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self.group = group
        self._builtin_modules = builtin_modules
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Decorator registering ``cls`` under ``name``; ``description`` defaults to its docstring's first line."""

        def deco(cls: T) -> T:
            desc = description or ((getattr(cls, "__doc__", None) or "").strip().splitlines() or [""])[0]
            old = self._entries.get(name)
            if old is not None and old.target is not cls and not isinstance(old.target, str):
                raise ValueError(f"{self.kind} {name!r} is already registered by {old.target!r}")
            self._entries[name] = Entry(name, cls, desc, "builtin")
            try:
                cls.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return cls

        return deco

    def add(self, name: str, target: Any, description: str = "", source: str = "builtin") -> None:
        """Register ``target`` (a class or a lazy ``"module:attr"`` string) under ``name``."""
        self._entries[name] = Entry(name, target, description, source)

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            if importlib.util.find_spec(module) is not None:  # a family not written yet is simply absent
                importlib.import_module(module)
        for ep in entry_points(group=self.group):
            if ep.name in self._entries and self._entries[ep.name].source == "builtin":
                logger.warning("entry point %s=%s shadows the built-in %s", ep.name, ep.value, self.kind)
            dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value
            self._entries[ep.name] = Entry(ep.name, ep.value, f"(plug-in from {dist})", f"entry point {ep.value}")

    def get(self, name: str) -> T:
        """Return the class registered under ``name``.

        Raises:
            KeyError: unknown name (the message lists every known name).
            ImportError: the entry point's module could not be imported.
        """
        self._ensure_loaded()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")
        entry = self._entries[name]
        target = entry.load()
        if entry.description.startswith("(plug-in"):
            doc = ((getattr(target, "__doc__", None) or "").strip().splitlines() or [""])[0]
            entry.description = f"{doc} {entry.description}".strip()
        return target

    def names(self) -> list[str]:
        """Sorted list of registered names (built-ins and plug-ins)."""
        self._ensure_loaded()
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        """``[(name, one-line description), ...]`` for ``genalign list``."""
        self._ensure_loaded()
        return [(n, self._entries[n].description) for n in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._entries


pipelines: Registry = Registry(
    "pipeline", "genalign.pipelines",
    tuple(f"genalign.pipelines.{m}" for m in ("sd", "sdxl", "few_step", "controlnet", "audio", "language")),
)
objectives: Registry = Registry(
    "objective", "genalign.objectives",
    tuple(f"genalign.objectives.{m}" for m in
          ("mapo", "dpo", "sft", "di_star", "r0", "ddo", "dragon", "ctrl_u", "rpo", "treg", "rrpo")),
)
rewards: Registry = Registry("reward", "genalign.rewards", ("genalign.rewards.builtin",))
