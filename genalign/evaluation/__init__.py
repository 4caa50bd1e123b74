"""Evaluation helpers (controllability metrics of conditional generation: :mod:`genalign.evaluation.condition`)."""
