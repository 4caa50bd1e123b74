"""genalign: align generative models with human preferences and rewards.

Data flows config → pipeline adapter → objective → trainer → export; diffusion models and language models go
through the same config and API (:mod:`genalign.api`)::

    import genalign
    cfg = genalign.load_config("configs/quickstart.yaml", ["train.steps=50"])
    summary = genalign.train(cfg, "runs/demo")          # writes runs/demo/export, summary.json
    genalign.export("runs/demo", "aligned-pipeline")      # re-export from the newest checkpoint
    genalign.train(genalign.load_config("configs/treg_tiny.yaml"), "runs/treg")   # an LM objective on TRL

Registries: ``from genalign.registry import objectives, rewards, pipelines`` (``.names()``, ``.get(name)``,
``.describe()``); ``genalign.rewards.get(name, **kwargs)`` builds a reward.
"""

from __future__ import annotations

import sys
import types

from genalign.api import export, generate, load_config, score, train


class _Package(types.ModuleType):
    """Keep ``genalign.export`` the public function: importing the submodule ``genalign.export`` (export folders)
    would otherwise rebind the package attribute to the module (``from genalign.export import ...`` still works)."""

    def __setattr__(self, name, value):
        if name == "export" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__version__ = "0.1.0"

__all__ = ["load_config", "train", "export", "generate", "score", "__version__"]
