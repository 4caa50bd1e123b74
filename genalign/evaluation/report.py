"""The run report: one self-contained HTML page per run (``genalign report RUN_DIR``; written by training).

Sections (each ``<section id=...>``):

- ``summary``: objective, base model, steps, wall time, data counts, and the final reward table (held-out reward of
  the base model vs the trained model, from ``summary.json``'s ``reward_before`` / ``reward_after``);
- ``curves``: reward curves over training (step 0 = ``reward_before``, the ``val/reward/<name>`` entries of
  ``summary.json``'s history, the last step = ``reward_after``) and the training loss, drawn with matplotlib and
  embedded as SVG data URIs (no scripts, no external files);
- ``samples``: per held-out prompt, the base model's and the trained export's samples side by side with the same
  seeds (:func:`genalign.evaluation.samples.run_samples`), each with its per-sample reward values; images are embedded as
  base64 PNG, small ones (the 8x8 digits) upscaled with nearest-neighbour to at least 128 px; audio samples get
  ``<audio controls>`` players with an embedded WAV;
- ``config``: the resolved ``config.yaml``.

Failures of optional parts (no export, base model unavailable offline, a reward's weights missing, matplotlib not
installed) are shown as a note in the page and logged; they never stop the report.

Source: genalign's own (issue 3 §5).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MIN_DISPLAY_PX = 128  # smaller images are upscaled (nearest-neighbour) to at least this many pixels

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#1b1b1b;
padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.meta{color:#555} table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 10px}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#11772d} .down{color:#b3261e} .note{background:#fff6e0;border-left:4px solid #e0a000;padding:6px 10px}
.plots{display:flex;flex-wrap:wrap;gap:12px} .plots figure{margin:0}
img.plot{width:460px;height:auto;border:1px solid #eee}
.prompt{margin:18px 0 6px;font-weight:600} .pair{display:flex;gap:28px;flex-wrap:wrap}
.grid{display:flex;gap:8px;flex-wrap:wrap} .grid figure{margin:0;text-align:center}
.grid figcaption{font-size:.8em;color:#444;max-width:180px}
img.sample{image-rendering:pixelated;image-rendering:crisp-edges;border:1px solid #ccc;min-width:64px}
.label{font-size:.85em;color:#555;margin-bottom:4px} pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:.85em}
"""


# -- helpers ------------------------------------------------------------------------------------------------------
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return _esc(v)


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
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -- sections -----------------------------------------------------------------------------------------------------
def _summary_section(run_dir: Path, summary: dict | None) -> str:
    parts = ['<section id="summary"><h2>Final reward</h2>']
    if not summary:
        parts.append(f'<p class="note">no summary.json in {_esc(run_dir)} (training not finished?)</p></section>')
        return "".join(parts)
    before, after = summary.get("reward_before") or {}, summary.get("reward_after") or {}
    parts.append(f"<p class=\"meta\">held-out prompts <code>{_esc(summary.get('heldout_prompts'))}</code>, "
                 f"{_esc(summary.get('samples_per_prompt'))} sample(s) per prompt</p>")
    parts.append('<table id="reward-table"><tr><th>reward</th><th>base</th><th>trained</th><th>change</th></tr>')
    for k in dict.fromkeys([*before, *after]):
        b, a = before.get(k, math.nan), after.get(k, math.nan)
        d = a - b
        cls = "up" if d > 0 else "down" if d < 0 else ""
        parts.append(f'<tr><td>{_esc(k)}</td><td class="num">{_fmt(b)}</td><td class="num">{_fmt(a)}</td>'
                     f'<td class="num {cls}">{"nan" if math.isnan(d) else f"{d:+.4f}"}</td></tr>')
    parts.append("</table>")
    facts = {k: summary.get(k) for k in ("objective", "model", "steps", "seconds", "num_rows", "data_skipped",
                                         "skipped_steps") if k in summary}
    parts.append("<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts.items())
                 + "</table>")
    fm = summary.get("final_metrics") or {}
    if fm:
        parts.append("<details><summary>final training metrics</summary><table>"
                     + "".join(f'<tr><td>{_esc(k)}</td><td class="num">{_fmt(v)}</td></tr>' for k, v in fm.items())
                     + "</table></details>")
    return "".join(parts) + "</section>"


def _curves_section(summary: dict | None) -> str:
    parts = ['<section id="curves"><h2>Reward curves</h2>']
    if not summary:
        return parts[0] + '<p class="note">no summary.json: no curves</p></section>'
    rc, tc = reward_curves(summary), training_curves(summary)
    try:
        figs = []
        for name, pts in rc.items():
            figs.append((f"held-out {name}", plot_data_uri({name: pts}, f"held-out reward: {name}", name)))
        if tc:
            figs.append(("training loss", plot_data_uri(tc, "training loss", "loss")))
        parts.append('<div class="plots">')
        for title, uri in figs:
            parts.append(f'<figure><img class="plot" alt="{_esc(title)}" src="{uri}"></figure>')
        parts.append("</div>")
        if not figs:
            parts.append('<p class="note">no reward or loss values in summary.json</p>')
    except ImportError:
        parts.append('<p class="note">matplotlib is not installed: plots omitted (pip install matplotlib); '
                     "values below</p>")
    if rc:
        parts.append("<details><summary>values</summary><table><tr><th>reward</th><th>step</th><th>value</th></tr>"
                     + "".join(f'<tr><td>{_esc(n)}</td><td class="num">{s}</td><td class="num">{_fmt(v)}</td></tr>'
                               for n, pts in rc.items() for s, v in pts) + "</table></details>")
    if not any(k.startswith("val/reward/") for row in summary.get("history") or [] for k in row):
        parts.append('<p class="meta">only before/after values (set <code>validation.every</code> for points '
                     "during training)</p>")
    return "".join(parts) + "</section>"


def _media(path: Path, caption: str, cls: str) -> str:
    from genalign.evaluation.scoring import AUDIO_SUFFIXES

    try:
        if path.suffix.lower() in AUDIO_SUFFIXES:
            return (f'<figure><audio class="{cls}" controls src="{audio_data_uri(path)}"></audio>'
                    f"<figcaption>{caption}</figcaption></figure>")
        uri, w, h = image_data_uri(path)
        return (f'<figure><img class="sample {cls}" alt="{_esc(path.name)}" width="{w}" height="{h}" src="{uri}">'
                f"<figcaption>{caption}</figcaption></figure>")
    except Exception as err:  # an unreadable sample is shown as such, not dropped
        return f'<figure><p class="note">{_esc(path.name)}: unreadable ({_esc(type(err).__name__)})</p></figure>'


def _samples_section(run_dir: Path, cfg, device, enabled: bool) -> str:
    from genalign.evaluation.samples import run_samples
    from genalign.evaluation.scoring import read_manifest, score_samples

    parts = ['<section id="samples"><h2>Samples on held-out prompts</h2>']
    if not enabled:
        return parts[0] + '<p class="note">sample grids not generated (--no-samples)</p></section>'
    if cfg is None:
        return parts[0] + '<p class="note">no readable config.yaml: cannot generate samples</p></section>'
    v = cfg.validation
    parts.append(f'<p class="meta">base model <code>{_esc(cfg.pipeline.model)}</code> vs trained export, '
                 f"{v.num_inference_steps} sampler steps, guidance {v.guidance_scale}, seeds {v.seed} + sample index "
                 "(the same noise for both); values: the run's rewards</p>")
    from genalign.rewards.composite import build_reward

    built = []  # the run's instance rewards, built once for both grids
    for item in cfg.rewards:
        try:
            r = build_reward(item.name, item.kwargs, {}, device)
        except Exception as err:  # weights missing offline, ...
            logger.warning("report: reward %s not available: %s", item.name, err)
            parts.append(f'<p class="note">reward {_esc(item.name)} not scored: {_esc(type(err).__name__)}: '
                         f"{_esc(err)}</p>")
            continue
        if r.kind == "instance" and r.modality in ("image", "audio"):
            built.append((item.name, r))
    cols: dict[str, dict] = {}
    for which in ("base", "trained"):
        try:
            folder = run_samples(run_dir, which, device=device)
        except Exception as err:
            logger.warning("report: no %s samples for %s: %s", which, run_dir, err)
            parts.append(f'<p class="note">{which} samples unavailable: {_esc(type(err).__name__)}: {_esc(err)}</p>')
            continue
        rows = read_manifest(folder / "metadata.jsonl")
        scores: dict[str, dict] = {}
        for name, reward in built:
            try:
                res = score_samples(folder, [reward], device=device)
            except Exception as err:  # e.g. a modality mismatch
                logger.warning("report: reward %s not scored: %s", name, err)
                parts.append(f'<p class="note">{which}: reward {_esc(name)} not scored: {_esc(err)}</p>')
                continue
            col = next(iter(res["stats"]))
            for rec in res["per_sample"]:
                if col in rec:
                    scores.setdefault(rec["file"], {})[name] = rec[col]
        cols[which] = {"rows": rows, "scores": scores}
    if not cols:
        return "".join(parts) + "</section>"
    # group by prompt, keeping the held-out order
    order: dict[str, None] = {}
    for c in cols.values():
        for _, prompt in c["rows"]:
            order.setdefault(prompt, None)
    for k, prompt in enumerate(order):
        parts.append(f'<div class="prompt-block" id="prompt-{k}"><p class="prompt">{_esc(prompt)}</p><div class="pair">')
        for which, c in cols.items():
            label = "base" if which == "base" else "trained"
            parts.append(f'<div class="{which}"><div class="label">{label}</div><div class="grid">')
            for path, p in c["rows"]:
                if p != prompt:
                    continue
                vals = c["scores"].get(str(path), {})
                cap = "<br>".join(f"{_esc(n)} {_fmt(x)}" for n, x in vals.items())
                parts.append(_media(path, cap, which))
            parts.append("</div></div>")
        parts.append("</div></div>")
    return "".join(parts) + "</section>"


def _config_section(config_text: str | None) -> str:
    body = (f"<pre>{_esc(config_text)}</pre>" if config_text
            else '<p class="note">no config.yaml in the run folder</p>')
    return f'<section id="config"><h2>Resolved config</h2>{body}</section>'


# -- public -------------------------------------------------------------------------------------------------------
def build_report_html(run_dir: str | Path, samples: bool = True, device: str | None = None) -> str:
    """The report page of ``run_dir`` as one HTML string (see the module docstring for the sections).

    Args:
        run_dir: a run folder (``config.yaml``, ``summary.json``, ``export/``).
        samples: generate / reuse and embed the before/after sample grids (the slow part: two pipelines).
        device: torch device for sampling and scoring (default: cuda if available, else cpu).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    summary = None
    if (run_dir / "summary.json").exists():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except ValueError as err:
            logger.warning("report: unreadable summary.json: %s", err)
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else None
    cfg = None
    if config_text is not None:
        try:
            from genalign.config import load_config

            cfg = load_config(run_dir / "config.yaml")
        except Exception as err:
            logger.warning("report: config.yaml not loadable: %s", err)
    title = (f"{summary.get('objective')} on {summary.get('model')}" if summary
             else (f"{cfg.objective.name} on {cfg.pipeline.model}" if cfg else run_dir.name))
    head = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>genalign report: {_esc(title)}"
            f"</title><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{_CSS}</style>"
            f"</head><body><h1>genalign run report: {_esc(title)}</h1><p class=\"meta\">run folder "
            f"<code>{_esc(run_dir.resolve())}</code> · written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
            '<nav><a href="#summary">final reward</a> · <a href="#curves">curves</a> · <a href="#samples">samples</a>'
            ' · <a href="#config">config</a></nav>')
    body = [_summary_section(run_dir, summary), _curves_section(summary),
            _samples_section(run_dir, cfg, device, samples), _config_section(config_text)]
    return head + "".join(body) + "</body></html>\n"


def write_report(run_dir: str | Path, out: str | Path | None = None, samples: bool = True,
                 device: str | None = None) -> Path:
    """Write the self-contained HTML report of a run and return its path (default ``RUN_DIR/report.html``).

    Called by ``genalign report`` and at the end of training. Samples are cached in ``RUN_DIR/samples/`` and
    reused by later calls and by ``genalign score --run``. The file is written atomically (``.tmp`` + rename).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist. OSError: the output cannot be written.
    """
    run_dir = Path(run_dir)
    page = build_report_html(run_dir, samples=samples, device=device)
    out = Path(out) if out is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["audio_data_uri", "build_report_html", "image_data_uri", "plot_data_uri", "reward_curves",
           "training_curves", "write_report"]
