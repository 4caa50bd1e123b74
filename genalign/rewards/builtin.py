"""Imports every built-in reward module so their ``@rewards.register`` decorators run.

Modules whose optional dependency (e.g. open_clip) is missing still import: they import it lazily on build.
"""

import genalign.rewards.digits  # noqa: F401  digit_classifier (the digits demo)
import genalign.rewards.style  # noqa: F401  ink_mass, contrast (weight-free digits-style rewards)
import genalign.rewards.jpeg  # noqa: F401  jpeg-compressibility, jpeg-incompressibility (DDPO)
import genalign.rewards.fad  # noqa: F401  fad-dataset, fad-song
import genalign.rewards.vendi  # noqa: F401  vendi
import genalign.rewards.clip  # noqa: F401  pickscore-v1, hps-v2.1, hps-v2.0, clipscore (+ aliases)
import genalign.rewards.aesthetic  # noqa: F401  laion-aesthetic-v2 (+ alias aesthetic)
import genalign.rewards.imagereward  # noqa: F401  imagereward-v1.0 (+ alias imagereward)
import genalign.rewards.clap  # noqa: F401  clap (transformers ClapModel, torch log-mel)
import genalign.rewards.music  # noqa: F401  music_key, music_style, music_clap (the builtin:music demo)
import genalign.rewards.condition  # noqa: F401  condition rewards: digit_stroke_mask, soft_edges, canny, dpt_depth
import genalign.rewards.segmentation  # noqa: F401  segmentation rewards: segformer, upernet, mask2former
