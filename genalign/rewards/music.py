"""Rewards of the ``builtin:music`` demo: ``music_key``, ``music_style`` (a small trained classifier) and
``music_clap`` (a tiny CLAP trained contrastively on the corpus).

- ``music_key``: ``p(prompted key and mode | audio)`` over the 24 major / minor keys.
- ``music_style``: ``p(prompted collection | audio)`` over chorale / mass / madrigal / fiddle tune.

Both come from one :class:`MusicClassifier` (a shared trunk, two heads) trained on the rendered corpus clips
(:mod:`genalign.data.music`). Why a trained classifier for the key and not chroma + Krumhansl–Schmuckler: it is
differentiable in torch end to end (librosa's chroma is numpy), needs no extra dependency, and on these 4-second
clips it is more accurate than a key profile (the held-out accuracies of both are in ``build_report.json``). Its
input is a log *semitone* spectrogram (:class:`SemitoneSpectrogram`: ``torch.stft`` power summed by triangular
filters centred on equal-tempered pitches), so transposing a clip by k semitones shifts the input by k rows;
training rolls the pitch axis by a random k and rotates the key label with it (exact transposition
augmentation).

``music_clap``: :class:`~genalign.rewards.clap.CLAPScore` with the shipped tiny ``ClapModel`` (HTS-AT audio tower
on a log-mel at 4 kHz, RoBERTa text tower on a byte-level BPE trained on the captions), trained with the
symmetric InfoNCE loss of CLAP (Wu et al. 2023, arXiv 2211.06687, §2.2). The same weights load through the
``clap`` reward with ``kwargs: {weights: <folder>}`` (:func:`music_clap_path`).

The classifier's 128-d penultimate features also serve Fréchet distances to held-out real clips
(:func:`music_frechet_distance`; reference statistics shipped with the base).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genalign.data.music import KEY_NAMES, SAMPLE_RATE, STYLES, parse_prompt
from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward, WeightsNotFoundError, load_state_dict
from genalign.rewards.clap import CLAPScore

MUSIC_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "music"
CLASSIFIER_FILE = MUSIC_ASSETS / "classifier.safetensors"
CLAP_DIR = MUSIC_ASSETS / "clap"
REBUILD = "rebuild them with `python scripts/build_music.py` (needs `pip install genalign[music]`)"


def _check_asset(path: Path, what: str) -> Path:
    if not path.exists():
        raise WeightsNotFoundError(f"{what} {str(path)!r} not found; {REBUILD}")
    return path


def music_clap_path() -> Path:
    """Folder of the shipped tiny CLAP (``ClapModel.from_pretrained`` + tokenizer + preprocessor config).

    Raises:
        WeightsNotFoundError: missing (rebuild with ``scripts/build_music.py``).
    """
    return _check_asset(CLAP_DIR / "config.json", "music CLAP").parent


class SemitoneSpectrogram(nn.Module):
    """Waveform ``(B, T)`` or ``(B, 1, T)`` at ``sample_rate`` → log semitone spectrogram ``(B, 1, P, frames)``.

    ``|STFT|²`` (Hann, ``n_fft``, ``hop``, ``torch.stft`` centred) summed by triangular filters centred on MIDI
    pitches ``midi_lo .. midi_hi`` (edges at the neighbouring semitones, linear in Hz, unit peak), then
    ``log(1e-6 + ·)`` minus its per-clip mean (loudness invariance). Differentiable. Rows = semitones, low to high.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = 1024, hop: int = 256, midi_lo: int = 40,
                 midi_hi: int = 95):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
        midi = torch.arange(midi_lo - 1, midi_hi + 2, dtype=torch.float64)
        edges = 440.0 * 2.0 ** ((midi - 69.0) / 12.0)
        lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
        fb = torch.clamp(torch.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), min=0.0)
        self.register_buffer("filters", fb.float(), persistent=False)  # (P, n_fft/2 + 1)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    @property
    def num_pitches(self) -> int:
        return int(self.filters.shape[0])

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.float()
        if x.ndim == 3:
            x = x.mean(1)
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        power = spec.real.pow(2) + spec.imag.pow(2)  # (B, F, frames)
        logp = torch.log(1e-6 + self.filters @ power)
        return (logp - logp.mean(dim=(1, 2), keepdim=True))[:, None]


class MusicClassifier(nn.Module):
    """Key (24) and style (len(STYLES)) classifier on :class:`SemitoneSpectrogram` input.

    Trunk: three 3x3 conv layers (16, 32, 32 channels, ReLU) with max-pooling over time only, so the pitch axis
    keeps its positions (the key depends on them); mean over time; flatten (channels × pitches) → 128 (ReLU) =
    :meth:`features`. Heads: ``key`` (24 logits, :data:`~genalign.data.music.KEY_NAMES` order) and ``style``.

    Shapes: waveforms ``(B, 1, T)`` at 4 kHz → ``(B, 24)``, ``(B, 4)`` logits; features ``(B, 128)``.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        self.frontend = SemitoneSpectrogram(sample_rate)
        p = self.frontend.num_pitches
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((1, 2)),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d((1, 2)),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * p, 128), nn.ReLU())
        self.key = nn.Linear(128, 24)
        self.style = nn.Linear(128, len(STYLES))

    def features_from_spec(self, spec: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(spec).mean(-1))

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 128)`` (for Fréchet distances)."""
        return self.features_from_spec(self.frontend(wave))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(wave)
        return self.key(h), self.style(h)


def roll_key(keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Key labels of audio transposed by ``shift`` semitones: the tonic moves, the mode stays."""
    return (keys % 12 + shift) % 12 + 12 * (keys >= 12).long()


def shift_pitch(spec: torch.Tensor, shift: int) -> torch.Tensor:
    """Transpose a semitone spectrogram ``(B, 1, P, T)`` up by ``shift`` rows; vacated rows get the clip minimum."""
    if shift == 0:
        return spec
    out = torch.roll(spec, shifts=shift, dims=2)
    fill = spec.amin(dim=(2, 3), keepdim=True).expand_as(out)
    if shift > 0:
        out[:, :, :shift] = fill[:, :, :shift]
    else:
        out[:, :, shift:] = fill[:, :, shift:]
    return out


def train_music_classifier(waveforms: torch.Tensor, keys: torch.Tensor, styles: torch.Tensor, seed: int = 0,
                           epochs: int = 12, batch_size: int = 32, lr: float = 2e-3, max_shift: int = 4,
                           noise: float = 0.02, progress: bool = False) -> MusicClassifier:
    """Train :class:`MusicClassifier` (cross-entropy on both heads, AdamW) with exact transposition augmentation
    (pitch-axis roll by k ∈ [−max_shift, max_shift], key label rotated by k) and additive noise of std ``noise``
    on the waveform (generated clips are noisier than renderings). Deterministic for a seed.

    Args:
        waveforms: ``(N, 1, T)`` float32 clips. keys: ``(N,)`` in [0, 24). styles: ``(N,)`` in [0, len(STYLES)).
    """
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MusicClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(waveforms) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    for _ in tqdm(range(epochs), desc="music classifier", disable=not progress):
        perm = torch.randperm(len(waveforms), generator=g)
        for i in range(0, len(waveforms), batch_size):
            idx = perm[i:i + batch_size]
            x = waveforms[idx] + noise * torch.randn(waveforms[idx].shape, generator=g)
            shift = int(torch.randint(-max_shift, max_shift + 1, (1,), generator=g))
            spec = shift_pitch(model.frontend(x), shift)
            h = model.features_from_spec(spec)
            loss = F.cross_entropy(model.key(h), roll_key(keys[idx], shift)) + F.cross_entropy(model.style(h), styles[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: MusicClassifier, waveforms: torch.Tensor, keys: torch.Tensor,
                        styles: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracies ``{"key", "style", "key_or_relative"}`` (the last counts the relative major/minor, which
    shares the key signature, as correct too)."""
    kl, sl = [], []
    for i in range(0, len(waveforms), 64):
        a, b = model(waveforms[i:i + 64])
        kl.append(a.argmax(-1))
        sl.append(b.argmax(-1))
    kp, sp = torch.cat(kl), torch.cat(sl)
    rel = torch.where(keys >= 12, (keys % 12 + 3) % 12, (keys + 9) % 12 + 12)  # relative major / minor
    return {"key": (kp == keys).float().mean().item(), "style": (sp == styles).float().mean().item(),
            "key_or_relative": ((kp == keys) | (kp == rel)).float().mean().item()}


class _MusicClassifierReward(Reward):
    """Shared loading and prompt parsing of ``music_key`` / ``music_style``."""

    modality = "audio"
    kind = "instance"
    differentiable = True
    input_format = "waveform (B, 1, T) or (B, T) float at 4 kHz + B prompts naming a key / a style"
    head = "key"

    def __init__(self, weights: str | None = None, device: str | torch.device | None = None, tiny: bool = False,
                 sample_rate: int = SAMPLE_RATE):
        super().__init__()
        self.net = MusicClassifier()
        if not tiny:
            path = _check_asset(Path(weights) if weights else CLASSIFIER_FILE, f"{self.head} classifier weights")
            self.net.load_state_dict(load_state_dict(path))
        self.sample_rate = int(sample_rate)
        if device is not None:
            self.to(device)
        self.freeze()

    def _labels(self, prompts) -> list[int]:
        if prompts is None:
            raise ValueError(f"music_{self.head} needs one prompt per clip (the prompted {self.head} is the label)")
        out = []
        for p in prompts:
            lab = parse_prompt(p)[0 if self.head == "key" else 1]
            if lab is None:
                raise ValueError(f"music_{self.head}: prompt {p!r} names no {self.head}")
            out.append(lab)
        return out

    def _input(self, samples: torch.Tensor, conditions: dict) -> torch.Tensor:
        sr = int(conditions.get("sample_rate") or self.sample_rate)
        x = samples.float()
        if x.ndim == 3:
            x = x.mean(1)
        if x.ndim != 2:
            raise ValueError(f"expected waveform (B, C, T) or (B, T), got {tuple(samples.shape)}")
        if sr != SAMPLE_RATE:
            from genalign.rewards.preprocess import resample

            x = resample(x, sr, SAMPLE_RATE)
        return x

    def probabilities(self, samples: torch.Tensor, **conditions) -> torch.Tensor:
        """Class probabilities ``(B, 24)`` (key) or ``(B, 4)`` (style)."""
        logits = self.net(self._input(samples, conditions))[0 if self.head == "key" else 1]
        return logits.softmax(-1)

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        labels = self._labels(prompts)
        if len(labels) != samples.shape[0]:
            raise ValueError(f"music_{self.head}: {samples.shape[0]} clips but {len(labels)} prompts")
        probs = self.probabilities(samples, **conditions)
        return probs.gather(1, torch.tensor(labels, device=probs.device)[:, None]).squeeze(1).float()

    def embed(self, samples: torch.Tensor, **conditions) -> torch.Tensor:
        """Penultimate features ``(B, 128)`` (an encoder for ``fad-dataset``: ``encoder: music_key``)."""
        return self.net.features(self._input(samples, conditions))


@REWARDS.register("music_key", "p(prompted key and mode | audio): classifier trained on the music21 corpus (demo)")
class MusicKeyReward(_MusicClassifierReward):
    """``p(prompted key and mode | clip)`` ∈ [0, 1] from the shipped :class:`MusicClassifier` (24 keys).

    Prompts name the key as "G major", "F sharp minor", "B flat major" (also "F#", "Bb").

    Args:
        weights: safetensors state dict (default: ``genalign/assets/music/classifier.safetensors``).
        tiny: random weights (tests). sample_rate: input rate (Hz; resampled to 4 kHz); a ``sample_rate=``
            condition overrides it per call. device: where to run.

    Shapes: ``(B, 1, T)`` / ``(B, T)`` waveform + B prompts → ``(B,)`` float32. Differentiable in the waveform.

    Raises:
        WeightsNotFoundError: weights missing. ValueError: missing prompts or a prompt naming no key.

    Source: genalign (classifier trained by ``scripts/build_music.py``; labels from music21's key analysis).
    """

    head = "key"


@REWARDS.register("music_style", "p(prompted collection | audio): chorale / mass / madrigal / fiddle tune (demo)")
class MusicStyleReward(_MusicClassifierReward):
    """``p(prompted style | clip)`` ∈ [0, 1] over :data:`~genalign.data.music.STYLES` (same network as
    ``music_key``, style head). Prompts name "chorale", "mass", "madrigal" or a fiddle dance ("reel", "jig", ...).

    Args / shapes / raises: as :class:`MusicKeyReward`.
    """

    head = "style"


@REWARDS.register("music_clap", "CLAP cosine with the tiny CLAP trained on the music21 corpus (builtin:music)")
class MusicCLAPScore(CLAPScore):
    """:class:`~genalign.rewards.clap.CLAPScore` whose default weights are the shipped tiny music CLAP.

    The shipped ``preprocessor_config.json`` sets the front end to 4 kHz (n_fft 256, hop 80, 32 mels, 20 Hz–2 kHz),
    so 10 s windows give the ``(B, 1, 501, 32)`` input of the HTS-AT tower (``spec_size`` 128). Args, shapes and raises as
    :class:`~genalign.rewards.clap.CLAPScore` (``sample_rate`` defaults to 4 kHz).
    """

    def __init__(self, weights: str | None = None, device: str | torch.device | None = None,
                 sample_rate: int = SAMPLE_RATE, tiny: bool = False, **kwargs):
        if tiny and weights is None:
            super().__init__(tiny=True, device=device, sample_rate=sample_rate, **kwargs)
        else:
            super().__init__(weights=str(weights or music_clap_path()), device=device, sample_rate=sample_rate,
                             **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# CLAP training (build time)


def clap_tokenizer(captions: list[str], vocab_size: int = 400):
    """A byte-level BPE ``RobertaTokenizerFast`` trained on ``captions`` (``<s>``, ``<pad>``, ``</s>``, ``<unk>``,
    ``<mask>`` specials, ids 0–4). Deterministic; saves / reloads with ``AutoTokenizer`` offline.

    Source: ``tokenizers`` ``ByteLevelBPETokenizer`` (RoBERTa's tokenizer family, Liu et al. 2019).
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sorted(set(captions)), vocab_size=vocab_size, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    from tokenizers.processors import RobertaProcessing

    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=64)


def music_clap_config(vocab_size: int):
    """Tiny ``ClapConfig`` (rewards.md §6 tiny build with the caption vocabulary): text 2 × 32, audio HTS-AT
    16 → 32 (depths [1, 1]) on 32 mels with ``spec_size`` 128 (a 10 s window of 501 frames folds into a 128 × 128
    image: a quarter of the default's patches), projection 32, no fusion."""
    from transformers import ClapConfig

    return ClapConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, projection_dim=32, max_position_embeddings=72, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2),
        audio_config=dict(patch_embeds_hidden_size=16, hidden_size=32, depths=[1, 1], num_attention_heads=[2, 2],
                          window_size=8, spec_size=128, num_mel_bins=32, projection_dim=32, enable_fusion=False),
        projection_dim=32,
    )


MUSIC_CLAP_PREPROCESSOR = {  # 4 kHz front end: 10 s → 501 frames of 32 mels (HTS-AT spec_size 128: 4x cheaper)
    "feature_extractor_type": "ClapFeatureExtractor", "sampling_rate": SAMPLE_RATE, "fft_window_size": 256,
    "hop_length": 80, "feature_size": 32, "frequency_min": 20.0, "frequency_max": 2000.0,
    "max_length_s": 10, "truncation": "rand_trunc", "padding": "repeatpad", "return_attention_mask": False,
}


def clap_contrastive_loss(audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLAP: ``(CE(s·A Tᵀ, I) + CE(s·T Aᵀ, I)) / 2`` on unit rows, ``s = exp(logit_scale)``.

    Rows with identical captions are treated as positives of each other (soft targets spread evenly over them), so
    duplicate captions in a batch are not pushed apart.

    Args:
        audio, text: ``(B, D)`` unit-norm embeddings of matching pairs. logit_scale: scalar (log temperature⁻¹).

    Source: Wu et al. 2023 (arXiv 2211.06687) Eq. 1–3; CLIP (Radford et al. 2021).
    """
    logits = logit_scale.exp() * audio @ text.T
    same = (text @ text.T > 1 - 1e-6).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_music_clap(waveforms: torch.Tensor, captions: list[str], out_dir: str | Path, steps: int = 600,
                     batch_size: int = 32, lr: float = 1e-3, seed: int = 0, progress: bool = False) -> dict:
    """Train the tiny music CLAP contrastively on (clip, caption) pairs and save it to ``out_dir`` (``ClapModel``
    folder + tokenizer + ``preprocessor_config.json``). Deterministic for a seed.

    Returns:
        ``{"steps", "final_loss", "seconds"}``.
    """
    import time

    from tqdm import tqdm
    from transformers import ClapModel

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = clap_tokenizer(captions)
    torch.manual_seed(seed)
    model = ClapModel(music_clap_config(len(tok)))
    tok.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(MUSIC_CLAP_PREPROCESSOR, indent=2))
    model.save_pretrained(out_dir)  # the front end below is built from these files
    scorer = MusicCLAPScore(weights=str(out_dir))
    scorer.model = model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1.0 - s / steps))
    g = torch.Generator().manual_seed(seed)
    from genalign.rewards.preprocess import unwrap_features

    for _ in tqdm(range(steps), desc="music CLAP", disable=not progress):
        idx = torch.randint(0, len(waveforms), (batch_size,), generator=g)
        x = waveforms[idx] + 0.02 * torch.randn(waveforms[idx].shape, generator=g)
        win, _ = scorer.windows(x)
        a = F.normalize(unwrap_features(model.get_audio_features(input_features=scorer.frontend(win))).float(), dim=-1)
        t = tok([captions[i] for i in idx.tolist()], padding=True, return_tensors="pt")
        te = F.normalize(unwrap_features(model.get_text_features(input_ids=t["input_ids"],
                                                                 attention_mask=t["attention_mask"])).float(), dim=-1)
        loss = clap_contrastive_loss(a, te, model.logit_scale_a.clamp(max=math.log(100.0)))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval().save_pretrained(out_dir)
    return {"steps": steps, "final_loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def clap_retrieval_accuracy(scorer: CLAPScore, waveforms: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Held-out retrieval: for each clip, is its own caption the best-scoring among the distinct held-out captions
    (top-1 / top-5)? Clips sharing a caption count the shared caption as correct.

    Returns:
        ``{"top1", "top5", "num_captions", "chance_top1"}``.
    """
    distinct = sorted(set(captions))
    text = scorer.encode_text(distinct)
    audio = torch.cat([scorer.embed(waveforms[i:i + 32]) for i in range(0, len(waveforms), 32)])
    sims = audio @ text.T
    target = torch.tensor([distinct.index(c) for c in captions])
    rank = (sims > sims.gather(1, target[:, None])).sum(1)
    return {"top1": (rank == 0).float().mean().item(), "top5": (rank < 5).float().mean().item(),
            "num_captions": len(distinct), "chance_top1": 1.0 / len(distinct)}


@torch.no_grad()
def music_frechet_distance(waveforms: torch.Tensor, reference, classifier: MusicClassifier | None = None) -> float:
    """Fréchet distance between clips ``(N, 1, T)`` (4 kHz) and reference statistics on the classifier's 128-d
    features (the "FAD" of the music demo; lower is closer). ``reference``: a
    :class:`~genalign.rewards.fad.ReferenceStats` or a path to one (e.g. the shipped held-out statistics).

    Source: Kilgour et al. 2019 (arXiv 1812.08466) with this classifier's features instead of VGGish's;
    :func:`genalign.rewards.fad.frechet_distance`.
    """
    from genalign.rewards.fad import ReferenceStats, frechet_distance, gaussian_stats

    ref = reference if isinstance(reference, ReferenceStats) else ReferenceStats.load(reference)
    if classifier is None:
        classifier = MusicKeyReward().net
    feats = torch.cat([classifier.features(waveforms[i:i + 64]) for i in range(0, len(waveforms), 64)])
    mu, cov = gaussian_stats(feats.double())
    return float(frechet_distance(mu, cov, ref.mu, ref.cov, sqrt_cov2=ref.sqrt_cov))


__all__ = [
    "KEY_NAMES", "MusicCLAPScore", "MusicClassifier", "MusicKeyReward", "MusicStyleReward", "SemitoneSpectrogram",
    "clap_contrastive_loss", "clap_retrieval_accuracy", "classifier_accuracy", "music_clap_config",
    "music_clap_path", "music_frechet_distance", "roll_key", "shift_pitch", "train_music_classifier",
    "train_music_clap",
]
