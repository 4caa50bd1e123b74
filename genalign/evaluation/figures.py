"""Figures of the run report, each a self-contained data URI: sample images (PNG, tiny ones upscaled), audio
(WAV), reward / loss curves, before/after reward histograms (SVG through matplotlib's object API, no pyplot), and
the Fréchet-distance figures a run records.

Source: genalign's own; matplotlib (plots), Pillow (images), soundfile (audio).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

MIN_DISPLAY_PX = 128  # smaller images are upscaled (nearest-neighbour) to at least this many pixels


# -- media and plots ----------------------------------------------------------------------------------------------
def _save_svg(fig, buf) -> None:
    """SVG without a date and with fixed element ids, so the same run gives the same page."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "genalign-report"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})


def image_data_uri(path_or_image, min_px: int = MIN_DISPLAY_PX) -> tuple[str, int, int]:
    """PNG data URI of an image file or PIL image, upscaled by an integer factor with nearest-neighbour until its
    shorter side is at least ``min_px`` pixels (8x8 digits → 128x128; larger images are unchanged).

    Returns:
        ``(uri, width_px, height_px)`` of the embedded image.

    Raises:
        OSError: unreadable image.
    """
    from PIL import Image

    if isinstance(path_or_image, Image.Image):
        img = path_or_image.convert("RGBA" if path_or_image.mode in ("RGBA", "LA", "P") else "RGB")
    else:
        with Image.open(path_or_image) as im:
            img = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
    short = min(img.size)
    if 0 < short < min_px:
        k = math.ceil(min_px / short)
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.width, img.height


def audio_data_uri(path: str | Path) -> str:
    """WAV data URI (16-bit PCM) of an audio file readable by soundfile.

    Raises:
        ImportError: soundfile missing. RuntimeError: unreadable file.
    """
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -- curves -------------------------------------------------------------------------------------------------------
def reward_curves(summary: dict) -> dict[str, list[tuple[int, float]]]:
    """Held-out reward per name over training: ``{name: [(step, value), ...]}`` sorted by step.

    Step 0 is ``reward_before``, the history's ``val/reward/<name>`` entries follow, and the final step (``steps``)
    is ``reward_after`` (the last value at a step wins).
    """
    curves: dict[str, dict[int, float]] = {}
    for name, v in (summary.get("reward_before") or {}).items():
        curves.setdefault(name, {})[0] = float(v)
    for row in summary.get("history") or []:
        for k, v in row.items():
            if k.startswith("val/reward/") and isinstance(v, (int, float)):
                curves.setdefault(k[len("val/reward/"):], {})[int(row.get("step", 0))] = float(v)
    last = int(summary.get("steps") or max([s for c in curves.values() for s in c] or [0]))
    for name, v in (summary.get("reward_after") or {}).items():
        curves.setdefault(name, {})[last] = float(v)
    return {k: sorted(c.items()) for k, c in curves.items()}


def training_curves(summary: dict) -> dict[str, list[tuple[int, float]]]:
    """Training metrics whose name ends in ``loss`` from ``summary["history"]``: ``{name: [(step, value)]}``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in summary.get("history") or []:
        for k, v in row.items():
            if k.split("/")[-1].endswith("loss") and isinstance(v, (int, float)) and math.isfinite(v):
                out.setdefault(k, []).append((int(row.get("step", 0)), float(v)))
    return out


def plot_data_uri(curves: dict[str, list[tuple[int, float]]], title: str, ylabel: str) -> str:
    """Line plot (one line per name, markers at each point) as an SVG data URI, drawn with matplotlib's
    object API (no pyplot, no global backend change).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), dpi=100)
    ax = fig.add_subplot(111)
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, linewidth=1.6, label=name)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="y", useOffset=False)  # plain values, not "1e-6 + 2.537e-2" offsets
    if len(curves) > 0:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    _save_svg(fig, buf)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram_data_uri(before: list[float], after: list[float], name: str, bins: int = 20) -> str:
    """Before / after histogram of one reward's per-sample values on shared bins, as an SVG data URI.

    Raises:
        ImportError: matplotlib is not installed. ValueError: both lists are empty.
    """
    import numpy as np
    from matplotlib.figure import Figure

    vals = [v for v in [*before, *after] if math.isfinite(v)]
    if not vals:
        raise ValueError(f"no finite values of {name}")
    lo, hi = min(vals), max(vals)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    fig = Figure(figsize=(5.6, 3.4), dpi=100)
    ax = fig.add_subplot(111)
    for label, v, style in (("base", before, dict(histtype="stepfilled", color="#9a9a9a", alpha=0.6)),
                            ("trained", after, dict(histtype="step", color="#1f77b4", linewidth=2.0))):
        v = [x for x in v if math.isfinite(x)]
        if v:
            ax.hist(v, bins=edges, label=f"{label} (mean {sum(v) / len(v):.3f}, n={len(v)})", **style)
    ax.set_title(f"per-sample {name}: base vs trained", fontsize=11)
    ax.set_xlabel(name)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    _save_svg(fig, buf)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fidelity_figures(summary: dict | None) -> dict:
    """Fréchet-distance figures a run records: ``{"rows": [{"name", "before", "after"}], "curves": {name:
    [(step, value)]}}`` from ``summary["fidelity"]`` (``{name: {"before", "after"}}`` or a number),
    ``objective_metrics`` (a ``fidelity`` dict, ``round_history`` rows with ``fd``) and history keys naming ``fd``
    / ``frechet``."""
    rows, curves = [], {}
    if not summary:
        return {"rows": rows, "curves": curves}
    om = summary.get("objective_metrics") or {}
    for src in (summary.get("fidelity"), om.get("fidelity") if isinstance(om, dict) else None):
        if isinstance(src, dict):
            for name, v in src.items():
                if isinstance(v, dict):
                    rows.append({"name": name, "before": v.get("before", math.nan), "after": v.get("after", math.nan)})
                elif isinstance(v, (int, float)):
                    rows.append({"name": name, "before": math.nan, "after": float(v)})
    for r in (om.get("round_history") or []) if isinstance(om, dict) else []:
        if isinstance(r, dict) and isinstance(r.get("fd"), (int, float)):
            curves.setdefault("selection FD (per round)", []).append((int(r.get("step", 0)), float(r["fd"])))
    for row in summary.get("history") or []:
        for k, v in row.items():
            low = k.lower()
            if ("frechet" in low or low.split("/")[-1] in ("fd", "fid", "fad")) and isinstance(v, (int, float)):
                curves.setdefault(k, []).append((int(row.get("step", 0)), float(v)))
    return {"rows": rows, "curves": curves}
