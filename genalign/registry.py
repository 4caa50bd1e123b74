"""Name → class registries for pipelines, objectives and rewards.

Built-in entries register themselves with a decorator when their module is imported; third-party packages
add entries without forking through Python entry points::

    # in the plug-in's pyproject.toml
    [project.entry-points."genalign.objectives"]
    my_loss = "my_pkg.objectives:MyObjective"

The entry-point value is loaded lazily, the first time the name is looked up or listed.

Built-in entries are also listed in :data:`BUILTIN_TABLE` (name → ``"module:attr"`` and the one-line description
the class registers with), so ``genalign list``, ``names()`` and ``name in registry`` answer without importing
torch-heavy modules; :meth:`Registry.get` imports only the module that defines the name. ``tests/test_registry.py``
checks the table against what the modules really register, so it cannot drift silently.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
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

    def __init__(self, kind: str, group: str, builtin_modules: tuple[str, ...] = (),
                 table: dict[str, tuple[str, str]] | None = None):
        self.kind = kind
        self.group = group
        self._builtin_modules = builtin_modules
        self._table = table or {}
        self._entries: dict[str, Entry] = {}
        self._loaded = False  # table + entry points listed
        self._imported = False  # every built-in module imported (decorators ran)

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
        """List the built-ins from the static table (no import) and scan the entry points once."""
        if self._loaded:
            return
        self._loaded = True
        for name, (target, desc) in self._table.items():
            if name not in self._entries and module_exists(target.partition(":")[0]):
                self._entries[name] = Entry(name, target, desc, "builtin")
        for ep in entry_points(group=self.group):
            if ep.name in self._entries and self._entries[ep.name].source == "builtin":
                logger.warning("entry point %s=%s shadows the built-in %s", ep.name, ep.value, self.kind)
            dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value
            self._entries[ep.name] = Entry(ep.name, ep.value, f"(plug-in from {dist})", f"entry point {ep.value}")

    def import_builtins(self) -> None:
        """Import every built-in module so their decorators register everything (the table's check, and lookups
        of names the table does not know)."""
        self._ensure_loaded()
        if self._imported:
            return
        self._imported = True
        for module in self._builtin_modules:
            if module_exists(module):  # a family not written yet is simply absent
                importlib.import_module(module)

    def get(self, name: str) -> T:
        """Return the class registered under ``name`` (importing only the module that defines it).

        Raises:
            KeyError: unknown name (the message lists every known name).
            ImportError: the entry point's module could not be imported.
        """
        self._ensure_loaded()
        if name not in self._entries:
            self.import_builtins()
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


def module_exists(module: str) -> bool:
    """Whether a ``genalign.*`` module's file exists, without importing its package (``find_spec`` would import
    ``genalign.rewards`` and with it torch)."""
    parts = module.split(".")
    if parts[0] != "genalign":
        return importlib.util.find_spec(module) is not None
    base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


# name -> ("module:attr", one-line description), exactly as the built-in modules register them.
# ``genalign list`` reads this instead of importing every module; tests/test_registry.py compares it with the
# real registrations (update it when a built-in is added, renamed or re-described).
BUILTIN_TABLE: dict[str, dict[str, tuple[str, str]]] = {
    "objectives": {
        'controlnet_pp': ('genalign.objectives.ctrl_u:ControlNetPP',
                          'ControlNet++: diffusion loss + λ·reward consistency (unweighted)'),
        'controlnet_sft': ('genalign.objectives.ctrl_u:ControlNetSFT',
                           'ControlNet baseline: diffusion loss only (no reward term)'),
        'ctrl_u': ('genalign.objectives.ctrl_u:CtrlU',
                   'Ctrl-U: uncertainty-weighted reward consistency for ControlNet (ICLR 2025)'),
        'ddo': ('genalign.objectives.ddo:DDO',
                "DDO: real data vs the frozen reference's samples, implicit likelihood-ratio discriminator, "
                'self-play rounds (Zheng et al. 2025)'),
        'di_star': ('genalign.objectives.di_star:DiffInstructStar',
                    'Diff-Instruct*: one-step generator, reward + pseudo-Huber score divergence (Luo et al. 2025)'),
        'diffusion_dpo': ('genalign.objectives.dpo:DiffusionDPO',
                          'Diffusion-DPO: DPO on denoising errors vs a frozen reference (Wallace et al. 2024)'),
        'dpo': ('genalign.objectives.rpo:DPO',
                'DPO for (video-)LMs on TRL (Rafailov et al. 2023); diffusion: diffusion_dpo'),
        'dragon': ('genalign.objectives.dragon:DRAGON',
                   'DRAGON: on-policy D+/D- from instance, instance-to-set and set rewards, Diffusion-DPO '
                   '(paired) or Diffusion-KTO (unpaired) (Bai et al. 2025)'),
        'fdpo': ('genalign.objectives.rpo:FDPO',
                 'f-DPO: DPO with an f-divergence (Wang et al. 2023), on TRL'),
        'mapo': ('genalign.objectives.mapo:MaPO',
                 'MaPO: reference-free margin loss + SFT on winners (Hong et al. 2024)'),
        'r0': ('genalign.objectives.r0:R0',
               'R0 / Reward-Instruct: few-step generator by regularised reward maximisation (Luo et al. 2025)'),
        'rpo': ('genalign.objectives.rpo:RPO',
                'RPO: DPO + NLL on the chosen response (Liu et al. 2024), on TRL'),
        'rrpo': ('genalign.objectives.rrpo:RRPO',
                 'RRPO: sub-sequence rewards + token-wise KL (Sarkar & Etemad, NeurIPS 2025), on TRL'),
        'sft': ('genalign.objectives.sft:SFT',
                'SFT on the chosen images only (denoising loss), the usual baseline'),
        'treg': ('genalign.objectives.treg:TREG',
                 'T-REG: DPO + token-level reward regularisation (Zhou et al., ACL 2025), on TRL'),
    },
    "rewards": {
        'aesthetic': ('genalign.rewards.aesthetic:LaionAesthetic',
                      'alias of laion-aesthetic-v2'),
        'canny': ('genalign.rewards.condition:CannyEdges',
                  'kornia Canny edges (binary, not differentiable); consistency with an edge map'),
        'clap': ('genalign.rewards.clap:CLAPScore',
                 'CLAP text–audio cosine (transformers ClapModel, default laion/larger_clap_music)'),
        'clipscore': ('genalign.rewards.clip:CLIPScore',
                      'CLIPScore: image–prompt cosine on a transformers CLIP (default ViT-L/14)'),
        'contrast': ('genalign.rewards.style:Contrast',
                     'pixel standard deviation per image (digits demo; weight-free, differentiable)'),
        'digit_classifier': ('genalign.rewards.digits:DigitClassifierReward',
                             'p(prompted digit | image) under a CNN trained on real digits (demo)'),
        'digit_stroke_mask': ('genalign.rewards.condition:DigitStrokeMask',
                              'digits: soft stroke segmenter (2 classes), consistency with a stroke mask'),
        'dpt_depth': ('genalign.rewards.condition:DPTDepth',
                      'DPT depth (transformers, dpt-hybrid-midas); squared error to a depth condition'),
        'fad-dataset': ('genalign.rewards.fad:FADDataset',
                        '−Fréchet Audio Distance of the whole set vs reference stats (set reward)'),
        'fad-song': ('genalign.rewards.fad:FADSong',
                     "−per-song FAD: Gaussian of one clip's frame embeddings vs reference stats"),
        'hps-v2.0': ('genalign.rewards.clip:HPSv20',
                     'HPSv2.0: plain cosine on fine-tuned open_clip ViT-H-14 (not comparable to v2.1)'),
        'hps-v2.1': ('genalign.rewards.clip:HPSv21',
                     'HPSv2.1: plain cosine on fine-tuned open_clip ViT-H-14, letterbox preprocessing'),
        'hpsv2.1': ('genalign.rewards.clip:HPSv21',
                    'alias of hps-v2.1'),
        'imagereward': ('genalign.rewards.imagereward:ImageReward',
                        'alias of imagereward-v1.0'),
        'imagereward-v1.0': ('genalign.rewards.imagereward:ImageReward',
                             'ImageReward v1.0 (BLIP ViT-L/16 + BERT cross-attention + MLP head)'),
        'ink_mass': ('genalign.rewards.style:InkMass',
                     'mean pixel intensity (digits demo; weight-free, differentiable)'),
        'jpeg-compressibility': ('genalign.rewards.jpeg:JpegCompressibility',
                                 'DDPO JPEG compressibility: −kB at quality 95 (non-differentiable)'),
        'jpeg-incompressibility': ('genalign.rewards.jpeg:JpegIncompressibility',
                                   'DDPO JPEG size in kB at quality 95 (+kB; non-differentiable)'),
        'laion-aesthetic-v2': ('genalign.rewards.aesthetic:LaionAesthetic',
                               'LAION aesthetic predictor v2 (CLIP ViT-L/14 + linear MLP head; 1–10 scale)'),
        'mask2former': ('genalign.rewards.segmentation:Mask2FormerSeg',
                        'Mask2Former semantic segmentation (transformers); the ADE20K evaluation model'),
        'music_clap': ('genalign.rewards.music:MusicCLAPScore',
                       'CLAP cosine with the tiny CLAP trained on the music21 corpus (builtin:music)'),
        'music_key': ('genalign.rewards.music:MusicKeyReward',
                      'p(prompted key and mode | audio): classifier trained on the music21 corpus (demo)'),
        'music_style': ('genalign.rewards.music:MusicStyleReward',
                        'p(prompted collection | audio): chorale / mass / madrigal / fiddle tune (demo)'),
        'pickscore': ('genalign.rewards.clip:PickScore',
                      'alias of pickscore-v1'),
        'pickscore-v1': ('genalign.rewards.clip:PickScore',
                         'PickScore v1: exp(logit_scale)·cos on CLIP-H/14 (Pick-a-Pic)'),
        'segformer': ('genalign.rewards.segmentation:SegformerSeg',
                      'Segformer segmentation (transformers); CE consistency with a label-map condition'),
        'soft_edges': ('genalign.rewards.condition:SoftEdges',
                       'differentiable Sobel soft edges; consistency with an edge-map condition'),
        'upernet': ('genalign.rewards.segmentation:UperNetSeg',
                    'UperNet segmentation (transformers); the Ctrl-U ADE20K reward model family'),
        'vendi': ('genalign.rewards.vendi:Vendi',
                  'Vendi score (effective number of distinct items; set reward, cosine kernel)'),
    },
    "pipelines": {
        'audioldm2': ('genalign.pipelines.audioldm2:AudioLDM2Adapter',
                      'AudioLDM2: mel-latent UNet, CLAP + T5 + GPT-2 conditioning, epsilon / DDIM'),
        'controlnet': ('genalign.pipelines.controlnet:ControlNetAdapter',
                       'ControlNet over a frozen SD 1.x/2.x or SDXL base; only the ControlNet trains'),
        'few_step': ('genalign.pipelines.few_step:FewStepAdapter',
                     'One-step / few-step generator from an SD or SDXL UNet (DI*, R0); K-step DDIM export'),
        'language': ('genalign.pipelines.language:LanguagePipeline',
                     'Causal LMs (transformers + peft LoRA), preference-trained on TRL'),
        'sd': ('genalign.pipelines.sd:SDAdapter',
               'Stable Diffusion 1.x/2.x (and the built-in digits model): UNet + CLIP text encoder'),
        'sdxl': ('genalign.pipelines.sdxl:SDXLAdapter',
                 'Stable Diffusion XL: two text encoders, pooled embeddings, micro-conditioning time_ids'),
        'stable_audio': ('genalign.pipelines.audio:StableAudioAdapter',
                         'Stable Audio Open: DiT + Oobleck VAE, cosine v-objective (text-to-music)'),
        'video_language': ('genalign.pipelines.language:VideoLanguagePipeline',
                           'Video-LMs (LLaVA-Video/OneVision, Qwen2-VL; LoRA on the LLM), preference-trained on TRL'),
    },
}

pipelines: Registry = Registry(
    "pipeline", "genalign.pipelines",
    tuple(f"genalign.pipelines.{m}" for m in ("sd", "sdxl", "few_step", "controlnet", "audio", "language")),
    BUILTIN_TABLE["pipelines"],
)
objectives: Registry = Registry(
    "objective", "genalign.objectives",
    tuple(f"genalign.objectives.{m}" for m in
          ("mapo", "dpo", "sft", "di_star", "r0", "ddo", "dragon", "ctrl_u", "rpo", "treg", "rrpo")),
    BUILTIN_TABLE["objectives"],
)
rewards: Registry = Registry("reward", "genalign.rewards", ("genalign.rewards.builtin",), BUILTIN_TABLE["rewards"])
