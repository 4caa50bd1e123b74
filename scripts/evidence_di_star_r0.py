"""Evidence for issue 4 §5 on the built-in digits base: DI* (α > 0 and α = 0) and R0 against the teacher / base.

Runs ``configs/di_star_digits.yaml`` (and the same with ``objective.alpha=0``) and ``configs/r0_digits.yaml``,
then scores, on the held-out prompts (``digits:heldout``, never trained on) with fixed per-sample seeds:

- the teacher with its default sampler (DDIM 25 steps, CFG 1.0, vanilla ``StableDiffusionPipeline``);
- the untrained base used as a 1-step (t = 399) and a 4-step ([999, 749, 499, 249]) generator;
- each trained generator **loaded from its export folder with vanilla Diffusers** (1 or 4 steps, no CFG);

reporting the mean ``digit_classifier`` reward (p(prompted digit | image) ∈ [0, 1]) and the Frechet distance to the
real held-out digits on the classifier's 128-d features (:func:`genalign.rewards.digits.digits_frechet_distance`;
lower = closer; a collapsed generator has a large distance). Usage::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/evidence_di_star_r0.py [--out runs/evidence_di_star_r0]
        [--samples-per-prompt 16] [--set KEY=VALUE ...] [--only di_star,di_star_alpha0,r0]

Writes ``OUT/evidence.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def heldout_jobs(samples_per_prompt: int, seed: int = 1234) -> list[tuple[str, int]]:
    """(prompt, seed) for every held-out prompt × sample (sample i of the whole list uses seed + i)."""
    from genalign.data.prompts import load_prompts

    prompts = load_prompts("digits:heldout")
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    return [(p, seed + i) for i, p in enumerate(expanded)]


@torch.no_grad()
def score(images: torch.Tensor, prompts: list[str]) -> dict:
    """Mean digit_classifier reward and digits Frechet distance of ``images`` (N, 3, H, W) in [0, 1]."""
    from genalign.rewards.digits import DigitClassifierReward, digits_frechet_distance

    clf = DigitClassifierReward()
    r = clf(images, prompts)
    return {"reward": round(float(r.mean()), 4), "reward_sem": round(float(r.std() / len(r) ** 0.5), 4),
            "frechet": round(digits_frechet_distance(images, classifier=clf), 3), "n": len(prompts)}


@torch.no_grad()
def run_pipe(pipe, jobs, batch: int = 80, **call) -> torch.Tensor:
    """Images from a vanilla Diffusers pipeline, one generator per sample."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        out.append(pipe([p for p, _ in chunk], generator=gens, output_type="pt", **call).images.float())
    return torch.cat(out)


def train_run(config: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train ``configs/<config>`` with ``overrides`` into ``run_dir`` (export included); return timing + val rewards."""
    from genalign.config import load_config
    from genalign.training.trainer import train

    cfg = load_config(ROOT / "configs" / config, overrides)
    t0 = time.time()
    summary = train(cfg, run_dir, progress=False)
    return {"config": config, "overrides": overrides, "train_seconds": round(time.time() - t0, 1),
            "steps": summary["steps"], "val_reward_before": summary["reward_before"],
            "val_reward_after": summary["reward_after"]}


def main() -> None:
    """Parse arguments, score teacher / base, train and score the runs, write evidence.json, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "evidence_di_star_r0"))
    ap.add_argument("--samples-per-prompt", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], help="extra override for every training run")
    ap.add_argument("--only", default="di_star,di_star_alpha0,r0")
    ap.add_argument("--no-train", action="store_true", help="score existing runs in --out only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    from diffusers import DiffusionPipeline

    from genalign.pipelines.base import resolve_model_path

    jobs = heldout_jobs(args.samples_per_prompt)
    prompts = [p for p, _ in jobs]
    previous = out / "evidence.json"  # runs not redone this time (--only) keep their earlier figures
    results: dict = json.loads(previous.read_text()) if previous.exists() else {}
    if results.get("samples") != len(jobs):
        results = {}
    results.update({"samples": len(jobs), "heldout": "digits:heldout", "seeds": f"1234..{1233 + len(jobs)}"})
    base_dir = resolve_model_path("builtin:digits")

    teacher = DiffusionPipeline.from_pretrained(base_dir)
    results["teacher_ddim25_cfg1"] = score(run_pipe(teacher, jobs, num_inference_steps=25, guidance_scale=1.0), prompts)
    print("teacher", results["teacher_ddim25_cfg1"], flush=True)

    # the untrained base as a 1-step / 4-step generator (what DI* / R0 start from), via the same export path
    from genalign.pipelines.few_step import build_few_step

    for K, t0 in ((1, 399), (4, 999)):
        m = build_few_step(DiffusionPipeline.from_pretrained(base_dir), lora=None, reference="frozen_copy")
        m.configure_few_step(K, t0)
        m.write_export(out / f"base_{K}step")
        pipe = DiffusionPipeline.from_pretrained(out / f"base_{K}step")
        results[f"base_{K}step"] = score(run_pipe(pipe, jobs, num_inference_steps=K, guidance_scale=0.0), prompts)
        print(f"base {K}-step", results[f"base_{K}step"], flush=True)

    runs = {"di_star": ("di_star_digits.yaml", [], 1), "di_star_alpha0": ("di_star_digits.yaml", ["objective.alpha=0"], 1),
            "r0": ("r0_digits.yaml", [], 4)}
    for name in args.only.split(","):
        config, extra, K = runs[name]
        run_dir = out / name
        info = {} if args.no_train else train_run(config, run_dir, extra + list(args.set))
        pipe = DiffusionPipeline.from_pretrained(run_dir / "export")
        info.update(score(run_pipe(pipe, jobs, num_inference_steps=K, guidance_scale=0.0), prompts))
        info["command"] = (f"genalign train configs/{config} " + " ".join(f"--set {o}" for o in extra + list(args.set))).strip()
        results[name] = info
        print(name, info, flush=True)

    (out / "evidence.json").write_text(json.dumps(results, indent=2))
    print("\n| model | steps | held-out digit_classifier | Frechet (real test digits) |\n|---|---|---|---|")
    rows = [("teacher (DDIM, CFG 1.0)", 25, "teacher_ddim25_cfg1"), ("base as 1-step generator (t=399)", 1, "base_1step"),
            ("base as 4-step generator", 4, "base_4step"), ("DI* (configs/di_star_digits.yaml)", 1, "di_star"),
            ("DI* α = 0 (pure score distillation)", 1, "di_star_alpha0"), ("R0 (configs/r0_digits.yaml)", 4, "r0")]
    for label, k, key in rows:
        if key in results:
            r = results[key]
            print(f"| {label} | {k} | {r['reward']:.4f} ± {r['reward_sem']:.4f} | {r['frechet']:.3f} |")


if __name__ == "__main__":
    main()
