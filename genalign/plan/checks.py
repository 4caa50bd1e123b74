"""Data and sequence checks of ``genalign plan`` (first rows against the objective's schema, video tokens against
``max_length``) and the printed table."""


from __future__ import annotations

import math
from pathlib import Path


from genalign.plan.models import GIB, GPUS, MFU, Plan


def _missing(p: Plan, what: str, require: bool) -> None:
    """A data file / folder that does not exist yet: a problem with ``require_data``, else a warning (recipes
    point at data the user prepares; CI plans them before any data exists)."""
    (p.problems if require else p.data).append(f"{what}: not found — prepare it before training")


def check_data_rows(cfg, p: Plan, rows: int = 16, require: bool = False) -> None:
    """Read the first ``rows`` rows of a diffusion data source and note missing columns, unreadable images and ties
    in ``p`` (a missing source is a warning, or a problem with ``require``)."""
    src = cfg.data.source
    try:
        if src.kind == "preference":
            from genalign.data.preference import PreferenceSource

            ps = PreferenceSource(src.source, split=src.split, ties=src.ties, max_pairs=rows * 4)
            head = ps.head(rows)
            bad = [h for h in head if not h["ok"]]
            p.data.append(f"{src.source}: {ps.n} usable pairs in the first rows read; ties {ps.skipped['ties']}, "
                          f"bad rows {ps.skipped['bad_rows']}, unreadable images {len(bad)} of {len(head)} decoded")
            if len(bad) == len(head):
                p.problems.append(f"data.source {src.source}: none of the first {len(head)} pairs decodes "
                                  f"({bad[0]['error']})")
        elif src.kind in ("prompts", "onpolicy"):
            from genalign.data.prompts import load_prompts

            p.data.append(f"prompts {src.prompts}: {len(load_prompts(src.prompts))} prompts")
        elif src.kind == "images":
            if src.source.startswith("digits:"):
                p.data.append(f"images {src.source}: built-in")
            elif src.source.startswith("music:"):
                import importlib.util

                from genalign.data.audio import MUSIC_SOURCES

                if src.source not in MUSIC_SOURCES:
                    p.problems.append(f"data.source {src.source}: the built-in music splits are "
                                      + " and ".join(MUSIC_SOURCES))
                elif importlib.util.find_spec("music21") is None:
                    p.problems.append(f"data.source {src.source} renders the music21 corpus: pip install "
                                      "'genalign[music]'")
                else:
                    p.data.append(f"audio {src.source}: built-in (rendered from the music21 corpus, about a minute)")
            elif Path(src.source).exists():
                p.data.append(f"images {src.source}: folder found")
            else:
                raise FileNotFoundError(f"data.source: {src.source!r} not found")
    except FileNotFoundError as err:
        where = getattr(src, "source", None) or getattr(src, "prompts", "")
        if _looks_like_hub_id(where) and not Path(where).exists():
            p.data.append(f"{where}: hub dataset not reachable offline — not checked")
        elif not Path(where).exists():
            _missing(p, f"data.source {where}", require)
        else:
            p.problems.append(str(err))
    except (ValueError, OSError) as err:
        p.problems.append(str(err).splitlines()[0])


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/")) and not Path(s).suffix


def check_lm_data(cfg, p: Plan, require: bool = False, rows: int = 16) -> None:
    """Read the first ``rows`` rows of an LM run's preference file with the trainer's own row checks (text:
    prompt / chosen / rejected; video: + video, with the official loader's aliases) and note in ``p`` how many are
    usable and why the others are skipped. None usable among them is a problem; some skipped is a data line (the
    trainer skips and counts them)."""
    from collections import Counter

    from genalign.data.jsonl import read_checked_jsonl, text_row_problem
    from genalign.data.video import video_row_problem

    d = cfg.data
    if d.synthetic is not None:
        p.data.append(f"synthetic {d.synthetic.kind} pairs: {d.synthetic.n_train} train")
        return
    path = Path(d.train)
    if not path.exists():
        if _looks_like_hub_id(d.train):
            p.data.append(f"{d.train}: not reachable offline — not checked")
        else:
            _missing(p, f"data.train {d.train}", require)
        return
    check = video_row_problem if cfg.pipeline.name == "video_language" else text_row_problem
    skipped: Counter = Counter()
    usable = read_checked_jsonl(str(path), check, skipped, max_lines=rows, log_skips=False)  # counted below
    read = len(usable) + sum(skipped.values())
    why = ", ".join(f"{k.removeprefix('bad_rows/')} {v}" for k, v in sorted(skipped.items()))
    p.data.append(f"{path}: {len(usable)} of the first {read} rows usable" + (f"; skipped: {why}" if why else ""))
    if read and not usable:
        p.problems.append(f"data.train {path}: none of the first {read} rows is usable ({why})")


def video_tokens(spec: dict, frames: int) -> int | None:
    """Expanded video placeholder tokens for ``frames`` frames under the model's rule (None: not a video-LM)."""
    vt = spec.get("video_tokens")
    if vt is None:
        return None
    if "per_frame" in vt:
        return frames * vt["per_frame"] + vt.get("per_video_extra", 0)
    v = spec["components"]["model"]["config"]["vision_config"]
    side = 336 // v["patch_size"] // v["spatial_merge_size"]  # Qwen2-VL default video max pixels ≈ 336² a frame
    return math.ceil(frames / v["temporal_patch_size"]) * side * side


def sequence_checks(cfg, p: Plan, spec: dict) -> None:
    """Prompt + expanded video tokens + completion against ``max_length`` (a video cut is a problem in ``p``)."""
    d = cfg.data
    vt = video_tokens(spec, d.num_frames) if cfg.pipeline.name == "video_language" else None
    budget = d.max_length
    if vt is not None:
        p.sequence.append(f"video tokens: {d.num_frames} frames → {vt} (expanded placeholders)")
        if vt >= budget:
            p.problems.append(f"data.max_length {budget} ≤ {vt} expanded video tokens ({d.num_frames} frames): the "
                              "video would be cut (raise max_length or lower num_frames)")
            return
    p.sequence.append(f"max_length {budget}: {budget - (vt or 0)} tokens left for prompt + completion")


# -- output --------------------------------------------------------------------------------------------------------


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def print_plan(p: Plan, console=None) -> None:
    """Print the plan as rich tables (components, memory per GPU, step time, data, sequences, verdict)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(emoji=False)
    t = Table(title=f"genalign plan: {p.config}  ({p.model})")
    for col in ("component", "role", "parameters", "trainable", "note"):
        t.add_column(col, justify="right" if col in ("parameters", "trainable") else "left")
    for c in p.components:
        t.add_row(c.name, c.role, _fmt_params(c.total), _fmt_params(c.trainable), c.note)
    console.print(t)
    m = Table(title=f"estimated peak memory per GPU ({p.gpus} × {p.gpu}, {p.parallelism}; {p.shape})")
    m.add_column("item")
    m.add_column("GiB", justify="right")
    for k, v in p.memory.items():
        m.add_row(k, f"{v / GIB:.2f}")
    m.add_row("[bold]total[/bold]", f"[bold]{p.peak / GIB:.2f}[/bold] of {p.gpu_memory:g}")
    console.print(m)
    if p.step_seconds:
        console.print(f"optimizer step: {p.flops_per_step / 1e12:.1f} TFLOP per GPU → [bold]≈{p.step_seconds:.1f} s[/bold] "
                      f"on one {p.gpu} (estimate: {MFU:.0%} of {GPUS[p.gpu] / 1e12:.0f} TFLOP/s peak bf16; "
                      "communication and data loading not included)")
    for label, lines in (("data", p.data), ("sequence", p.sequence), ("note", p.notes)):
        for line in lines:
            console.print(f"{label}: {escape(line)}")
    if p.fits:
        console.print("[green]OK: fits and should start[/green]")
    for line in p.problems:
        console.print(f"[red]problem: {escape(line)}[/red]")
