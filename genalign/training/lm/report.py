"""``RUN_DIR/report.html`` for an LM run: the summary (objective, steps, losses, eval metrics, skipped rows), training
curves from TRL's log history (loss, implicit-reward margin and accuracy, objective terms) and the resolved config."""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

from genalign.evaluation.report import plot_data_uri

__all__ = ["write_lm_report"]

CURVES = (("loss", "loss"), ("rewards/margins", "implicit-reward margin"), ("rewards/accuracies", "implicit accuracy"),
          ("kl", "token KL (chosen)"), ("treg/reg", "T-REG regulariser"), ("eval_loss", "held-out loss"))


def _curves(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, _ in CURVES:
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.setdefault(key, []).append((int(row.get("step", 0)), float(v)))
    return out


def write_lm_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of an LM run (atomically) and return its path.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``summary.json`` (training not finished).
    """
    run_dir = Path(run_dir)
    sfile = run_dir / "summary.json"
    if not sfile.exists():
        raise FileNotFoundError(f"{run_dir}: no summary.json (training not finished?)")
    s = json.loads(sfile.read_text())
    esc = html.escape
    facts = {k: s.get(k) for k in ("objective", "pipeline", "steps", "first_loss", "last_loss", "train_loss",
                                   "seconds", "resumed_from")}
    facts.update({k: v for k, v in (s.get("eval") or {}).items() if "runtime" not in k and "per_second" not in k})
    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in facts.items())
    counts = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in sorted((s.get("counts") or {}).items()))
    curves = _curves(s.get("log_history") or [])
    figs = "".join(f'<img alt="{esc(title)}" src="{plot_data_uri({key: curves[key]}, title, key)}">'
                   for key, title in CURVES if key in curves)
    cfg = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>genalign LM report: "
            f"{esc(str(s.get('objective')))}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
            "th{text-align:left;padding-right:1em}img{max-width:48%}</style></head><body>"
            f"<h1>genalign run report: {esc(str(s.get('objective')))} ({esc(str(s.get('pipeline')))})</h1>"
            f"<p>run folder <code>{esc(str(run_dir.resolve()))}</code> · written {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f"</p><h2>Summary</h2><table>{rows}</table><h2>Skipped rows and statuses</h2><table>{counts or '<tr><td>none</td></tr>'}"
            f"</table><h2>Training curves</h2>{figs or '<p>no logged metrics</p>'}<h2>Resolved config</h2>"
            f"<pre>{esc(cfg)}</pre></body></html>\n")
    out = Path(out) if out is not None else run_dir / "report.html"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
