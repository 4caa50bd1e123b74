"""The run report: one self-contained HTML page per run (``genalign report RUN_DIR``; written by training).

The report never draws a sample: it reads what training's held-out evaluation kept in
``RUN_DIR/samples/heldout-base/`` and ``RUN_DIR/samples/heldout-trained/`` (files + each sample's rewards,
:func:`genalign.evaluation.validation.read_saved_samples`), so ``genalign report RUN`` on a finished run takes
seconds. Only runs without kept samples (made before training kept them) fall back to drawing them once
(:func:`genalign.evaluation.samples.run_samples`, then scored with the run's rewards).

Sections (each ``<section id=...>``), rendered from the jinja2 template ``assets/templates/report.html.j2``:

- ``summary``: the final reward table (``reward_before`` / ``reward_after`` of ``summary.json``), run facts and the
  wall time per phase (``phase_seconds``);
- ``curves``: held-out reward over training (step 0, the ``val/reward/<name>`` points, the last step) and the
  training loss (matplotlib, SVG data URIs);
- ``samples``: per held-out prompt, base and trained samples of the same seed side by side (one column per seed),
  each with its reward values, and the prompt's mean reward before / after; images as base64 PNG (tiny ones
  upscaled with nearest-neighbour to at least 128 px), audio as ``<audio controls>`` with an embedded WAV;
- ``winrate``: the per-sample win rate of trained over base (same prompt and seed, ties ½) per reward, with its
  Wilson interval and sign-test p-value (:func:`genalign.evaluation.winrate.paired_win_rate`);
- ``histogram``: before / after reward histograms per reward (shared bins);
- ``fidelity``: the Fréchet distance to real held-out data where the run records one (``summary.json``'s
  ``fidelity``, ``objective_metrics``, or ``fd`` / ``frechet`` entries of the history), so reward hacking shows;
- ``config``: the resolved ``config.yaml``.

Failures of optional parts (no samples, a base model unavailable offline, a reward's weights missing, matplotlib
not installed) are shown as a note in the page and logged; they never stop the report.

Source: genalign's own (issue 3 §5, issue 17); HTML through jinja2, plots through matplotlib.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genalign.evaluation.figures import (MIN_DISPLAY_PX, audio_data_uri, fidelity_figures, histogram_data_uri,
                                         image_data_uri, plot_data_uri, reward_curves, training_curves)

logger = logging.getLogger(__name__)

MAX_SEEDS_SHOWN = 8  # seeds per prompt drawn in the side-by-side table (all of them count in the figures)
TEMPLATES = Path(__file__).resolve().parent.parent / "assets" / "templates"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return "" if v is None else str(v)


def _change(before: float, after: float) -> tuple[str, str]:
    d = after - before
    if math.isnan(d):
        return "nan", ""
    return f"{d:+.4f}", "up" if d > 0 else "down" if d < 0 else ""


# -- held-out samples ---------------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """One side (base or trained) of the held-out samples: rows with ``file_name``, ``index``, ``prompt``,
    ``seed`` and ``rewards`` (name → value), the folder the files are in, and notes for the page."""

    rows: list[dict] = field(default_factory=list)
    folder: Path | None = None
    source: str = "none"  # "training" (kept by evaluation) | "drawn" (fallback for old runs) | "none"
    notes: list[str] = field(default_factory=list)


def load_heldout(run_dir: str | Path, which: str, cfg=None, device=None, draw: bool = True) -> HeldOut:
    """The run's held-out samples of ``which`` (``"base"`` / ``"trained"``).

    Reads what training kept (``RUN_DIR/samples/heldout-<which>/``); only when there is nothing there and ``draw``
    is set, draws them once from the export / base model (:func:`genalign.evaluation.samples.run_samples`) and
    scores them with the run's instance rewards. Failures become notes, never exceptions.
    """
    from genalign.evaluation.samples import ensure_manifest

    run_dir = Path(run_dir)
    folder = run_dir / "samples" / f"heldout-{which}"
    try:
        rows = ensure_manifest(folder)
    except (OSError, ValueError, KeyError) as err:
        logger.warning("report: unreadable %s samples in %s: %s", which, folder, err)
        rows = []
    if rows:
        return HeldOut(rows, folder, "training")
    if not draw:
        return HeldOut(notes=[f"{which}: no samples kept by training in {folder} (not drawn: --no-samples)"])
    if cfg is None:
        return HeldOut(notes=[f"{which} samples unavailable: no readable config.yaml to draw them from"])
    return _draw_and_score(run_dir, which, cfg, device)


def _draw_and_score(run_dir: Path, which: str, cfg, device) -> HeldOut:
    """Fallback for runs made before training kept its samples: draw once (cached), score with the run's rewards."""
    from genalign.evaluation.samples import run_samples
    from genalign.evaluation.scoring import read_manifest, score_samples
    from genalign.rewards.composite import build_reward

    try:
        folder = run_samples(run_dir, which, device=device)
    except Exception as err:  # no export, base model unavailable offline, an audio run, ...
        logger.warning("report: no %s samples for %s: %s", which, run_dir, err)
        return HeldOut(notes=[f"{which} samples unavailable: {type(err).__name__}: {err}"])
    out = HeldOut(source="drawn", folder=folder)
    listed = read_manifest(folder / "metadata.jsonl")
    meta = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines() if x.strip()]
    scores: dict[str, dict[str, float]] = {}
    for item in cfg.rewards:
        try:
            reward = build_reward(item.name, item.kwargs, {}, device)
            if reward.kind != "instance":
                continue
            res = score_samples(folder, [reward], device=device)
        except Exception as err:  # weights missing offline, a modality mismatch, ...
            logger.warning("report: reward %s not scored: %s", item.name, err)
            out.notes.append(f"{which}: reward {item.name} not scored: {type(err).__name__}: {err}")
            continue
        col = next(iter(res["stats"]))
        for rec in res["per_sample"]:
            if col in rec:
                scores.setdefault(str(rec["file"]), {})[item.name] = rec[col]
    for k, ((path, prompt), m) in enumerate(zip(listed, meta)):
        out.rows.append({"file_name": m["file_name"], "index": m.get("index", k), "prompt": prompt,
                         "seed": m.get("seed"), "rewards": scores.get(str(path), {})})
    return out


def pair_by_prompt(base: list[dict], trained: list[dict]) -> list[dict]:
    """Group held-out rows by prompt (first-seen order) and pair base and trained samples by seed.

    Returns:
        ``[{"prompt", "pairs": [(seed, base_row | None, trained_row | None), ...]}, ...]``; seeds in order.
    """
    prompts: dict[str, dict[Any, list]] = {}
    for side, rows in ((0, base), (1, trained)):
        for r in rows:
            cell = prompts.setdefault(r["prompt"], {}).setdefault(r.get("seed"), [None, None])
            cell[side] = r
    return [{"prompt": p, "pairs": [(seed, b, t) for seed, (b, t) in seeds.items()]} for p, seeds in prompts.items()]


def paired_win_rates(groups: list[dict], confidence: float = 0.95) -> list[dict]:
    """Per reward: the per-sample win rate of trained over base over every (prompt, seed) pair that both sides
    scored (:func:`genalign.evaluation.winrate.paired_win_rate`; ties ½, Wilson interval, sign test)."""
    import torch

    from genalign.evaluation.winrate import paired_win_rate

    vals: dict[str, tuple[list[float], list[float]]] = {}
    for g in groups:
        for _, b, t in g["pairs"]:
            if b is None or t is None:
                continue
            for name, tv in (t.get("rewards") or {}).items():
                bv = (b.get("rewards") or {}).get(name)
                if bv is not None and math.isfinite(bv) and math.isfinite(tv):
                    vals.setdefault(name, ([], []))
                    vals[name][0].append(float(tv))
                    vals[name][1].append(float(bv))
    out = []
    for name, (new, old) in vals.items():
        res = paired_win_rate(torch.tensor(new, dtype=torch.float64), torch.tensor(old, dtype=torch.float64),
                              confidence)
        out.append({"name": name, **res})
    return out


def _media(folder: Path, row: dict) -> dict:
    from genalign.evaluation.scoring import AUDIO_SUFFIXES

    path = folder / row["file_name"]
    m: dict[str, Any] = {"name": path.name, "rewards": list((row.get("rewards") or {}).items()), "error": None}
    try:
        if path.suffix.lower() in AUDIO_SUFFIXES:
            m.update(audio=True, uri=audio_data_uri(path))
        else:
            uri, w, h = image_data_uri(path)
            m.update(audio=False, uri=uri, width=w, height=h)
    except Exception as err:  # an unreadable sample is shown as such, not dropped
        m["error"] = type(err).__name__
    return m


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _raw_config(text: str | None) -> dict:
    """The run's config.yaml as a plain dict (``{}`` when absent or unreadable): the page needs a few values only,
    and validating it would import the objective's module."""
    import yaml

    try:
        raw = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        return {}
    return raw if isinstance(raw, dict) else {}


def _samples_view(base: HeldOut, trained: HeldOut, v: dict, max_seeds: int) -> tuple[dict, list[dict]]:
    groups = pair_by_prompt(base.rows, trained.rows)
    notes = base.notes + trained.notes
    src = {h.source for h in (base, trained) if h.rows}
    meta = ("base model vs trained model, the same seed in each column (the same noise); values: the run's rewards "
            + ("(samples kept by training's held-out evaluation)" if src == {"training"} else
               "(samples drawn for this report: the run kept none)" if src else ""))
    if v:
        meta += f"; {v.get('num_inference_steps')} sampler steps, guidance {v.get('guidance_scale')}"
    prompts = []
    for g in groups:
        names = list(dict.fromkeys(n for _, b, t in g["pairs"] for r in (b, t) if r for n in (r.get("rewards") or {})))
        means = []
        for n in names:
            before = _mean([b["rewards"].get(n) for _, b, _ in g["pairs"] if b and b.get("rewards")])
            after = _mean([t["rewards"].get(n) for _, _, t in g["pairs"] if t and t.get("rewards")])
            change, cls = _change(before, after)
            means.append({"name": n, "before": before, "after": after, "change": change, "cls": cls})
        columns = [{"seed": seed, "base": _media(base.folder, b) if b else None,
                    "trained": _media(trained.folder, t) if t else None} for seed, b, t in g["pairs"][:max_seeds]]
        prompts.append({"prompt": g["prompt"], "n": len(g["pairs"]), "means": means, "columns": columns,
                        "hidden": max(0, len(g["pairs"]) - max_seeds)})
    return {"meta": meta, "notes": notes, "prompts": prompts}, groups


def _curves_view(summary: dict | None) -> dict:
    view: dict[str, Any] = {"figures": [], "notes": [], "points": [], "only_ends": False}
    if not summary:
        view["notes"].append("no summary.json: no curves")
        return view
    rc, tc = reward_curves(summary), training_curves(summary)
    try:
        for name, pts in rc.items():
            view["figures"].append({"title": f"held-out {name}",
                                    "uri": plot_data_uri({name: pts}, f"held-out reward: {name}", name)})
        if tc:
            view["figures"].append({"title": "training loss", "uri": plot_data_uri(tc, "training loss", "loss")})
        if not view["figures"]:
            view["notes"].append("no reward or loss values in summary.json")
    except ImportError:
        view["notes"].append("matplotlib is not installed: plots omitted (pip install matplotlib); values below")
    view["points"] = [(n, s, v) for n, pts in rc.items() for s, v in pts]
    view["only_ends"] = not any(k.startswith("val/reward/") for row in summary.get("history") or [] for k in row)
    return view


def _fidelity_view(summary: dict | None) -> dict:
    fig = fidelity_figures(summary)
    figures = []
    for name, pts in fig["curves"].items():
        try:
            figures.append({"title": name, "uri": plot_data_uri({name: sorted(pts)}, name, "Fréchet distance")})
        except ImportError:
            break
    return {"rows": fig["rows"], "figures": figures}


def _objective_winrate_notes(summary: dict | None) -> list[str]:
    om = (summary or {}).get("objective_metrics") or {}
    wr = om.get("win_rate") if isinstance(om, dict) else None
    if isinstance(wr, dict) and wr:
        return ["the objective's own evaluation: " + ", ".join(f"{k} {_fmt(float(v))}" for k, v in wr.items())]
    return []


# -- public -------------------------------------------------------------------------------------------------------
def build_report_html(run_dir: str | Path, samples: bool = True, device: str | None = None,
                      max_seeds: int = MAX_SEEDS_SHOWN) -> str:
    """The report page of ``run_dir`` as one HTML string (see the module docstring for the sections).

    Args:
        run_dir: a run folder (``config.yaml``, ``summary.json``, ``samples/heldout-*``).
        samples: for runs whose training kept no samples, draw them (the slow fallback); kept samples are always
            shown.
        device: torch device for the fallback's sampling and scoring (default: cuda if available, else cpu).
        max_seeds: seeds per prompt shown side by side (every seed counts in the means and the win rate).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
    """
    import jinja2

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
    raw = _raw_config(config_text)
    pipe, obj = raw.get("pipeline") or {}, raw.get("objective") or {}
    title = (f"{summary.get('objective')} on {summary.get('model')}" if summary
             else f"{obj.get('name')} on {pipe.get('model')}" if raw else run_dir.name)
    kept = all((run_dir / "samples" / f"heldout-{w}" / "metadata.rank0.jsonl").exists() for w in ("base", "trained"))
    cfg = None
    if config_text is not None and not kept and samples:  # only the fallback needs the typed config
        try:
            from genalign.config import load_config

            cfg = load_config(run_dir / "config.yaml")
        except Exception as err:
            logger.warning("report: config.yaml not loadable: %s", err)
    base = load_heldout(run_dir, "base", cfg, device, samples)
    trained = load_heldout(run_dir, "trained", cfg, device, samples)
    samples_view, groups = _samples_view(base, trained, raw.get("validation") or {}, max_seeds)
    histograms, hist_note = [], "no per-sample rewards on both sides: no histogram"
    per_side = {side: {} for side in ("base", "trained")}
    for side, h in (("base", base), ("trained", trained)):
        for r in h.rows:
            for n, v in (r.get("rewards") or {}).items():
                per_side[side].setdefault(n, []).append(float(v))
    try:
        for n in dict.fromkeys([*per_side["base"], *per_side["trained"]]):
            uri = histogram_data_uri(per_side["base"].get(n, []), per_side["trained"].get(n, []), n)
            histograms.append({"title": f"{n} histogram", "uri": uri})
    except ImportError:
        hist_note = "matplotlib is not installed: no histogram"
    except ValueError as err:
        hist_note = str(err)
    reward_table, facts, phases, final = [], [], [], []
    if summary:
        before, after = summary.get("reward_before") or {}, summary.get("reward_after") or {}
        for k in dict.fromkeys([*before, *after]):
            b, a = float(before.get(k, math.nan)), float(after.get(k, math.nan))
            change, cls = _change(b, a)
            reward_table.append({"name": k, "before": b, "after": a, "change": change, "cls": cls})
        facts = [(k, summary[k]) for k in ("objective", "model", "steps", "seconds", "num_rows", "data_skipped",
                                           "skipped_steps", "status") if k in summary]
        phases = [(k, float(v)) for k, v in (summary.get("phase_seconds") or {}).items()]
        final = list((summary.get("final_metrics") or {}).items())
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env.get_template("report.html.j2").render(
        title=title, run_dir=str(run_dir.resolve()), written=time.strftime("%Y-%m-%d %H:%M:%S"), summary=summary,
        reward_table=reward_table, facts=facts, phase_seconds=phases, final_metrics=final,
        curves=_curves_view(summary), samples=samples_view, winrates=paired_win_rates(groups),
        objective_winrates=_objective_winrate_notes(summary), histograms=histograms, histogram_note=hist_note,
        fidelity=_fidelity_view(summary), config_text=config_text)


def write_report(run_dir: str | Path, out: str | Path | None = None, samples: bool = True,
                 device: str | None = None) -> Path:
    """Write the self-contained HTML report of a run and return its path (default ``RUN_DIR/report.html``).

    Called by ``genalign report`` and at the end of training. It reads the samples training kept; only runs
    without them draw once (cached in ``RUN_DIR/samples/``, reused by later calls and ``genalign score --run``).
    The file is written atomically (``.tmp`` + rename).

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


__all__ = ["MIN_DISPLAY_PX", "HeldOut", "audio_data_uri", "build_report_html", "fidelity_figures", "histogram_data_uri",
           "image_data_uri", "load_heldout", "pair_by_prompt", "paired_win_rates", "plot_data_uri", "reward_curves",
           "training_curves", "write_report"]
