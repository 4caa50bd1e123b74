"""Evidence runs for issue 5 §4 on the built-in digits base (CPU, a few minutes each).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/evidence_ddo_dragon.py ddo    [--set key=value ...]
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/evidence_ddo_dragon.py dragon [--set key=value ...]

- **ddo**: trains ``configs/ddo_digits.yaml`` (real train digits vs the base's own samples), then samples one image
  per held-out real test digit (prompt "a handwritten digit {label}", seed i, DDIM 25, no guidance) from the base
  and from the exported model, and reports the Frechet distance to the 360 held-out real digits
  (:func:`genalign.rewards.digits.digits_frechet_distance`) before and after.
- **dragon**: trains ``configs/dragon_digits.yaml`` and reports the objective's per-term reward before/after and the
  per-sample win rate vs the base with its Wilson 95 % interval (``summary.json`` → ``objective_metrics``; set terms
  also list the subset-bootstrap preference, which is not a win rate), plus the held-out FD as a fidelity check.

Writes ``OUT/<which>/evidence.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@torch.no_grad()
def heldout_fd(model_path: str, steps: int = 25, batch: int = 120) -> float:
    """FD of one sample per held-out test digit (its label as prompt, seed = index) to the held-out digits."""
    from genalign.data.digits import load_digits_split
    from genalign.pipelines.base import load_diffusers_pipeline
    from genalign.rewards.digits import digits_frechet_distance

    pipe = load_diffusers_pipeline(model_path)
    pipe.set_progress_bar_config(disable=True)
    _, labels = load_digits_split("test")
    prompts = [f"a handwritten digit {int(d)}" for d in labels]
    imgs = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(j) for j in range(i, min(i + batch, len(prompts)))]
        imgs.append(pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=1.0, generator=gens,
                         output_type="pt").images.float())
    return digits_frechet_distance(torch.cat(imgs), "test")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["ddo", "dragon"])
    ap.add_argument("--out", default="runs/evidence")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from genalign.config import load_config
    from genalign.training.trainer import train

    cfg_file = ROOT / "configs" / ("ddo_digits.yaml" if args.which == "ddo" else "dragon_digits.yaml")
    cfg = load_config(cfg_file, args.overrides)
    run = Path(args.out) / args.which
    t0 = time.time()
    summary = train(cfg, run, progress=False)
    report = {"config": str(cfg_file.relative_to(ROOT)), "overrides": args.overrides, "run_dir": str(run),
              "train_seconds": round(time.time() - t0, 1), "steps": summary["steps"],
              "reward_before": summary["reward_before"], "reward_after": summary["reward_after"],
              "objective_metrics": summary.get("objective_metrics")}
    report["fd_heldout_base"] = heldout_fd(cfg.pipeline.model)
    report["fd_heldout_trained"] = heldout_fd(str(run / "export"))
    (run / "evidence.json").write_text(json.dumps(report, indent=2))
    print(f"## {args.which} on {cfg.pipeline.model} ({summary['steps']} steps, {report['train_seconds']} s)")
    print("| metric | base | trained |\n|---|---|---|")
    print(f"| FD to held-out real digits (360 samples) | {report['fd_heldout_base']:.3f} | "
          f"{report['fd_heldout_trained']:.3f} |")
    for k, v in summary["reward_before"].items():
        print(f"| held-out reward {k} | {v:.4f} | {summary['reward_after'][k]:.4f} |")
    om = summary.get("objective_metrics") or {}
    for name, t in (om.get("terms") or {}).items():
        extra = f"; subset-bootstrap preference {t['subset_bootstrap_preference']:.2f}" if t["kind"] == "set" else ""
        print(f"| {name} ({t['kind']}, n={t['n']}) | {t['before']:.4f} | {t['after']:.4f} |  win rate "
              f"{t['win_rate']:.3f} [{t['ci_low']:.3f}, {t['ci_high']:.3f}] ({t['method']}){extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
