"""Language-model / video-LM preference training on TRL: collator, trainer, synthetic data, runner, export.

``train_lm(cfg, run_dir, resume)`` is what :func:`genalign.api.train` calls for ``pipeline.name: language`` /
``video_language`` configs.
"""

from genalign.training.lm.collator import TokenFieldCollator
from genalign.training.lm.export import export_lm, export_lm_run
from genalign.training.lm.runner import train_lm
from genalign.training.lm.synthetic import make_arithmetic_preference_rows
from genalign.training.lm.trainers import PreferenceTrainer

__all__ = ["TokenFieldCollator", "PreferenceTrainer", "make_arithmetic_preference_rows", "train_lm", "export_lm",
           "export_lm_run"]
