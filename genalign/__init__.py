"""genalign: align generative models with human preferences and rewards.

Data flows config → pipeline adapter → objective → trainer → export::

    import genalign
    cfg = genalign.load_config("configs/quickstart.yaml", ["train.steps=50"])
    summary = genalign.train(cfg, "runs/demo")          # writes runs/demo/export, summary.json
    genalign.export("runs/demo", "aligned-pipeline")      # re-export from the newest checkpoint

Registries: ``from genalign.registry import objectives, rewards, pipelines`` (``.names()``, ``.get(name)``,
``.describe()``); ``genalign.rewards.get(name, **kwargs)`` builds a reward.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_config(path=None, overrides=None):
    """Load a run config (see :func:`genalign.config.load_config`)."""
    from genalign.config import load_config as _load

    return _load(path, overrides)


def train(cfg, run_dir, resume=None, progress=True):
    """Train from a config (see :func:`genalign.training.trainer.train`); returns the summary dict."""
    from genalign.training.trainer import train as _train

    return _train(cfg, run_dir, resume=resume, progress=progress)


def export(run_dir, out_dir, checkpoint="latest"):
    """Export a run's checkpoint as a vanilla Diffusers folder (see :func:`genalign.export.export_run`)."""
    from genalign.export import export_run

    return export_run(run_dir, out_dir, checkpoint)
