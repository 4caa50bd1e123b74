"""Differentiable preprocessing shared by the reward models (pure torch unless stated otherwise).

Images (float RGB in [0, 1], ``(B, 3, H, W)``):

- :func:`clip_resize_crop`: shortest side → ``size`` (bicubic, PIL-style two-pass :func:`pil_resize`), centre
  crop. The standard CLIP eval transform (OpenAI CLIP, ``CLIPImageProcessor``, PickScore, ImageReward,
  aesthetic). Note: PIL clips its intermediate (horizontal) pass to uint8; a plain torch
  ``interpolate(bicubic, antialias=True)`` does not and lands up to 0.27 normalised units away on noise
  (checked), so :func:`pil_resize` reproduces the clip; what remains is PIL's uint8 rounding (tested).
- :func:`letterbox`: longest side → ``size``, then zero-pad to a square (HPSv2 ``ResizeMaxSize``, applied
  before normalisation, so the padding is black).
- :func:`normalize`: ``(x − mean) / std`` with CLIP constants by default.
- :func:`clip_reference_pixels`: the non-differentiable PIL path (``CLIPImageProcessorPil``) for evaluation
  parity with transformers-4-era numbers.

Features: :func:`unwrap_features` turns transformers-5 ``ModelOutput`` results of ``get_*_features`` into the
projected tensor (``pooler_output``; transformers PR #42564).

Audio: :func:`resample` (windowed sinc, torchaudio's algorithm), :func:`repeatpad`, and :class:`LogMel`, a torch
log-mel front end equal to ``ClapFeatureExtractor``'s (``rand_trunc`` filters) to ~1e-4 dB.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 3, H, W) (or 1 channel), got shape {tuple(images.shape)}")


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1|3, H, W)`` → ``(B, 3, H, W)`` (grey is repeated). Raises ValueError for other shapes."""
    _check_images(images)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Channel-wise ``(x − mean) / std``; ``(B, C, H, W)`` → same shape (differentiable)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def resize_shortest_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the shortest side becomes ``size`` (HF ``get_resize_output_image_size``: the long side
    is ``int(size · long / short)``, truncated)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _bicubic_pil(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    w1 = ((a + 2) * x - (a + 3)) * x * x + 1
    w2 = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, w1, torch.where(x < 2, w2, torch.zeros_like(x)))


@lru_cache(maxsize=64)
def _pil_weights(in_size: int, out_size: int) -> torch.Tensor:
    """``(out, in)`` resampling matrix of PIL's bicubic ``ImagingResample`` (a = −0.5, antialiased support)."""
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    xmin = (centers - support + 0.5).floor().clamp_min(0)  # PIL truncates (center − support + 0.5) ≥ 0
    xmax = (centers + support + 0.5).floor().clamp_max(in_size)
    pos = torch.arange(in_size, dtype=torch.float64)[None, :]
    w = _bicubic_pil((pos - centers[:, None] + 0.5) / fscale)
    w = torch.where((pos >= xmin[:, None]) & (pos < xmax[:, None]), w, torch.zeros_like(w))
    return (w / w.sum(1, keepdim=True)).float()


def pil_resize(images: torch.Tensor, size: tuple[int, int], clip_between: bool = True) -> torch.Tensor:
    """Differentiable bicubic resize with PIL's kernel (``Image.resize(..., BICUBIC)``), as two matrix products.

    Same kernel as torch's ``interpolate(mode="bicubic", antialias=True)`` (a = −0.5, support widened by the
    downscale factor), but PIL resamples horizontally first and stores that pass as uint8, i.e. **clipped** to
    [0, 255]. Without that clip (torch) the two differ by up to ~18/255 on noise; with ``clip_between`` (default)
    only PIL's rounding remains (≈1/255). Input in [0, 1]. ``(B, C, H, W)`` → ``(B, C, *size)``.

    Source: Pillow ``libImaging/Resample.c`` (``precompute_coeffs``, ``bicubic_filter``).
    """
    h, w = images.shape[-2:]
    nh, nw = size
    x = images
    if nw != w:
        x = torch.einsum("pw,bchw->bchp", _pil_weights(w, nw).to(x.device, x.dtype), x)
        if clip_between and nh != h:
            x = x.clamp(0, 1)
    if nh != h:
        x = torch.einsum("oh,bchp->bcop", _pil_weights(h, nh).to(x.device, x.dtype), x)
    return x


def _resize(images: torch.Tensor, size: tuple[int, int], kernel: str, antialias: bool) -> torch.Tensor:
    if kernel == "pil":
        return pil_resize(images, size)
    if kernel == "torch":
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=antialias)
    raise ValueError(f"kernel must be 'pil' or 'torch', got {kernel!r}")


def clip_resize_crop(images: torch.Tensor, size: int = 224, antialias: bool = True,
                     clamp: bool = True, kernel: str = "pil") -> torch.Tensor:
    """CLIP eval geometry in torch: shortest side → ``size`` (bicubic), then centre crop ``size × size``.

    Args:
        images: ``(B, 3, H, W)`` float in [0, 1].
        size: output side (224 for every CLIP reward here).
        kernel: ``"pil"`` (default: PIL's bicubic via :func:`pil_resize`, what the CLIP processors use) or
            ``"torch"`` (``F.interpolate`` bicubic). antialias: only for ``"torch"``.
        clamp: clamp to [0, 1] after the bicubic overshoot (the processors clip through uint8).

    Returns:
        ``(B, 3, size, size)`` in [0, 1], **not** normalised; differentiable.

    Raises:
        ValueError: wrong shape.

    Source: OpenAI CLIP ``_transform`` / ``CLIPImageProcessor`` (resize shortest edge, centre crop); crop offsets
    ``(H − size) // 2`` as in ``transformers.image_transforms.center_crop``.
    """
    _check_images(images)
    h, w = images.shape[-2:]
    nh, nw = resize_shortest_size(h, w, size)
    x = images
    if (nh, nw) != (h, w):
        x = _resize(x, (nh, nw), kernel, antialias)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    return x.clamp(0, 1) if clamp else x


def letterbox_geometry(h: int, w: int, size: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """HPSv2 ``ResizeMaxSize`` geometry: ``(new_h, new_w, (left, right, top, bottom) padding)``.

    ``new = round(dim · size / max(h, w))`` (Python rounding), padding ``⌊pad/2⌋`` left/top and the rest
    right/bottom.
    """
    scale = size / float(max(h, w))
    nh, nw = round(h * scale), round(w * scale)
    ph, pw = size - nh, size - nw
    return nh, nw, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)


def letterbox(images: torch.Tensor, size: int = 224, fill: float = 0.0, antialias: bool = True,
              clamp: bool = True, kernel: str = "torch") -> torch.Tensor:
    """Pad-to-square letterbox: longest side → ``size`` (bicubic), then pad with ``fill`` (black) to a square.

    Args:
        images: ``(B, 3, H, W)`` float in [0, 1]. size: output side. fill: padding value **before**
            normalisation (HPSv2 uses 0). antialias/clamp: as :func:`clip_resize_crop`.
        kernel: ``"torch"`` (default: HPSv2 resizes a float tensor with torchvision, i.e. ``F.interpolate``
            bicubic with ``antialias=True`` on torchvision ≥ 0.17 ⚠) or ``"pil"``.

    Returns:
        ``(B, 3, size, size)``, not normalised; differentiable. Equal to :func:`clip_resize_crop` on square input.

    Source: HPSv2 ``hpsv2/src/open_clip/transform.py`` ``ResizeMaxSize`` (``image_transform`` with
    ``resize_longest_max=True``, used for HPS eval). Difference: upstream skips the pad when the longest side is
    already ``size``; here the output is always square.
    """
    _check_images(images)
    h, w = images.shape[-2:]
    nh, nw, pad = letterbox_geometry(h, w, size)
    x = images
    if (nh, nw) != (h, w):
        x = _resize(x, (nh, nw), kernel, antialias)
    if clamp:
        x = x.clamp(0, 1)
    if any(pad):
        x = F.pad(x, pad, mode="constant", value=fill)
    return x


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels a PNG/PIL round trip keeps: ``round(255·x)/255`` (no gradient)."""
    return (images.detach().clamp(0, 1) * 255).round() / 255


def clip_reference_pixels(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                          processor=None) -> torch.Tensor:
    """Reference (non-differentiable) CLIP pixels through transformers' PIL processor.

    Args:
        images: ``(B, 3, H, W)`` float in [0, 1] (quantised to uint8 first, as a saved image would be).
        processor: an image processor to use instead (e.g. loaded from the checkpoint's
            ``preprocessor_config.json``); default ``CLIPImageProcessorPil`` with shortest edge / crop ``size``.

    Returns:
        ``(B, 3, size, size)`` normalised pixel values on ``images.device``.

    Source: ``transformers.CLIPImageProcessorPil`` (the transformers-4 PIL implementation; rewards.md §0).
    """
    import numpy as np

    if processor is None:
        processor = _pil_processor(size, tuple(mean), tuple(std))
    arr = (to_rgb(images).detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    out = processor(images=[np.ascontiguousarray(a) for a in arr], return_tensors="pt")["pixel_values"]
    return out.to(device=images.device, dtype=torch.float32)


@lru_cache(maxsize=4)
def _pil_processor(size: int, mean: tuple, std: tuple):
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:  # transformers 4: the default class is the PIL one
        from transformers import CLIPImageProcessor as Proc
    return Proc(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                image_mean=list(mean), image_std=list(std), do_convert_rgb=True)


def unwrap_features(out) -> torch.Tensor:
    """Projected embedding from ``get_image_features`` / ``get_text_features`` / ``get_audio_features``.

    transformers ≥ 5 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projected
    embedding; transformers 4 returned the tensor itself.

    Args:
        out: a tensor (returned as is), a ``ModelOutput`` / dict with ``pooler_output``, or a tuple (first item).

    Raises:
        TypeError: nothing recognisable.
    """
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, dict):
        pooled = out.get("pooler_output")
    if isinstance(pooled, torch.Tensor):
        return pooled
    for name in ("image_embeds", "text_embeds", "audio_embeds"):
        val = getattr(out, name, None)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot extract features from {type(out).__name__}")


# ------------------------------------------------------------------------------------------------- audio


@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, width_zc: int, rolloff: float) -> tuple[torch.Tensor, int]:
    base = min(orig, new) * rolloff
    width = math.ceil(width_zc * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * base).clamp(-width_zc, width_zc)
    window = torch.cos(t * math.pi / width_zc / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    return kernel, width


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of ``(..., T)`` waveforms with a Hann-windowed sinc (differentiable).

    Returns ``(..., ceil(new·T/orig))``. Same algorithm and defaults as ``torchaudio.functional.resample``
    (``sinc_interp_hann``), which genalign does not depend on.
    """
    orig_freq, new_freq = int(orig_freq), int(new_freq)
    if orig_freq == new_freq:
        return waveform
    g = math.gcd(orig_freq, new_freq)
    o, n = orig_freq // g, new_freq // g
    kernel, width = _sinc_kernel(o, n, lowpass_filter_width, rolloff)
    kernel = kernel.to(device=waveform.device, dtype=waveform.dtype)
    shape = waveform.shape
    x = waveform.reshape(-1, 1, shape[-1])
    length = shape[-1]
    x = F.pad(x, (width, width + o))
    y = F.conv1d(x, kernel, stride=o)  # (N, n, L')
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(n * length / o)
    return y[..., :target].reshape(*shape[:-1], -1)


def repeatpad(waveform: torch.Tensor, length: int) -> torch.Tensor:
    """CLAP ``repeatpad``: tile whole copies of a short clip (``⌊length/T⌋`` times), then zero-pad to ``length``.

    ``(..., T)`` → ``(..., length)``; longer inputs are returned unchanged. Source:
    ``transformers.ClapFeatureExtractor._get_input_mel`` (``padding="repeatpad"``).
    """
    t = waveform.shape[-1]
    if t >= length:
        return waveform
    reps = int(length / t)
    x = waveform.repeat(*([1] * (waveform.ndim - 1)), reps) if reps > 1 else waveform
    return F.pad(x, (0, length - x.shape[-1]))


class LogMel(nn.Module):
    """Torch log-mel spectrogram equal to ``ClapFeatureExtractor``'s non-fusion path (differentiable).

    ``|STFT|²`` (n_fft 1024, periodic Hann, hop 480, centred with reflect padding) → mel filter bank from
    ``transformers.audio_utils.mel_filter_bank`` → ``10·log10(max(mel, 1e-10))`` (no top_db).

    Args:
        sample_rate: 48 kHz for CLAP. n_fft, hop_length, n_mels, f_min, f_max: extractor settings (load them from
            the checkpoint's ``preprocessor_config.json``: the class default ``f_min`` is 0, several hub files
            use 50). mel_scale/norm: ``"slaney"``/``"slaney"`` for ``rand_trunc`` checkpoints, ``"htk"``/``None``
            for fusion.

    Shapes: ``(B, T)`` → ``(B, 1, frames, n_mels)`` with ``frames = 1 + T // hop_length`` (1001 for 10 s).
    """

    def __init__(self, sample_rate: int = 48_000, n_fft: int = 1024, hop_length: int = 480, n_mels: int = 64,
                 f_min: float = 50.0, f_max: float = 14_000.0, mel_scale: str = "slaney", norm: str | None = "slaney",
                 mel_floor: float = 1e-10):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=f_min,
                             max_frequency=f_max, sampling_rate=sample_rate, norm=norm, mel_scale=mel_scale)
        self.register_buffer("mel_fb", torch.as_tensor(fb, dtype=torch.float32), persistent=False)  # (F, n_mels)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.n_fft, self.hop_length, self.mel_floor = n_fft, hop_length, mel_floor
        self.sample_rate = sample_rate

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.ndim != 2:
            raise ValueError(f"expected mono waveforms (B, T), got {tuple(waveform.shape)}")
        dtype = waveform.dtype
        spec = torch.stft(waveform, self.n_fft, hop_length=self.hop_length, win_length=self.n_fft,
                          window=self.window.to(dtype), center=True, pad_mode="reflect", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (B, F, frames); |z|² without sqrt (finite gradient)
        mel = torch.einsum("bft,fm->btm", power, self.mel_fb.to(dtype))
        return (10.0 * torch.log10(mel.clamp_min(self.mel_floor))).unsqueeze(1)
