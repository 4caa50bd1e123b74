"""The package's dependency rules (../shared/DESIGN.md, README "Layout"), checked on the source with ``ast``.

Layers, lowest first; a module may import its own layer and the layers below, never a layer above:

    0  errors, registry, config, overrides   infrastructure
    1  pipelines, rewards                 adapters over models; reward models (they never import each other)
    2  data                               datasets, preference pairs, on-policy buffers
    3  evaluation, export, model_card     validation, scoring, win rates, the report; export folders, model card
    4  objectives                         one file per method
    5  training                           the Accelerate loop, the TRL trainers
    6  plan, api, cli, genalign           the public API and the command line

Leaf dataset sources (``data.digits``, ``data.music`` and its synthesizer ``data.synth``) import nothing above layer 0
(but each other) and may be read from any layer
(the digits classifier reward and the digits base model are built from them). Every import counts, including
the ones inside functions: a lazy import does not change who depends on whom.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "genalign"
LAYERS = {"errors": 0, "registry": 0, "config": 0, "overrides": 0, "pipelines": 1, "rewards": 1, "data": 2,
          "evaluation": 3, "export": 3, "model_card": 3, "objectives": 4, "training": 5, "plan": 6, "api": 6, "cli": 6,
          "__init__": 6, "__main__": 6}
LEAF_SOURCES = {"genalign.data.digits", "genalign.data.music", "genalign.data.synth"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[top]


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported genalign module, names taken from it, line) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("genalign")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("genalign"):
                found.append((target, [a.name for a in node.names], node.lineno))
    return found


def test_every_top_level_part_of_the_package_has_a_layer():
    tops = {m.split(".")[1] if "." in m else "__init__" for m in _modules()}
    assert tops <= set(LAYERS), f"give these a layer in tests/test_architecture.py: {sorted(tops - set(LAYERS))}"


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    bad = []
    for module, path in modules.items():
        for target, _names, line in _imports(path, module):
            if target in LEAF_SOURCES or target == "genalign":
                continue
            if _layer(target) > _layer(module):
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_leaf_dataset_sources_stay_leaves():
    modules = _modules()
    for leaf in LEAF_SOURCES & set(modules):
        for target, _names, line in _imports(modules[leaf], leaf):
            assert _layer(target) == 0 or target in LEAF_SOURCES, (
                f"{leaf}:{line} imports {target}: a leaf source may only import layer 0 and other leaves")


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    bad = []
    for module, path in modules.items():
        for target, names, line in _imports(path, module):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} takes {private} from {target}")
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name: a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                   for a in n.names if a.name.startswith("genalign")}
        aliases |= {a.asname or a.name: f"{n.module}.{a.name}" for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("genalign")
                    for a in n.names if f"{n.module}.{a.name}" in modules}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private cross-module names:\n" + "\n".join(bad)


def test_objectives_do_not_import_each_other():
    modules = _modules()
    shared = {"genalign.objectives.base", "genalign.objectives.rounds", "genalign.objectives.lm_base"}
    bad = []
    for module, path in modules.items():
        if not module.startswith("genalign.objectives.") or module in shared:
            continue
        for target, _names, line in _imports(path, module):
            if target.startswith("genalign.objectives.") and target not in shared and target != module:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {target}")
    assert not bad, "objectives importing other objectives (move shared machinery down a layer):\n" + "\n".join(bad)


@pytest.mark.parametrize("limit", [MAX_LINES])
def test_no_module_is_two_modules_glued_together(limit):
    sizes = {str(p.relative_to(PKG.parent)): len(p.read_text().splitlines()) for p in _modules().values()}
    big = {k: v for k, v in sizes.items() if v > limit}
    assert not big, f"modules over {limit} lines: {big}"
