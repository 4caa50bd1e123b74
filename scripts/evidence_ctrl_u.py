"""Evidence for issue 6 §4: on digits, does Ctrl-U raise condition consistency over a ControlNet trained without
the reward term (same data, same steps), and how does it compare with the unweighted ControlNet++ term?

For each of ``configs/controlnet_sft_digits.yaml``, ``configs/controlnet_pp_digits.yaml`` and
``configs/ctrl_u_digits.yaml`` (identical except for the objective) the script trains with ``genalign.train``,
loads the *exported* folder with vanilla ``DiffusionPipeline.from_pretrained`` and generates one image per
held-out condition (the stroke masks of the 360 real test digits, ``digits:test``; prompts from the held-out
templates; seed = row index; DDIM 25 steps, guidance 1). Reported per run:

- ``mask_iou``: IoU between the generated image's stroke mask (grey > 0.5) and the real digit's (= the condition
  with the default ``--reward digit_stroke_mask``) (↑; main metric for masks);
- ``edge_ssim``: SSIM between the soft edges of the generated image and of the real test digit (↑; main metric
  with ``--reward soft_edges``, a cross-check otherwise);
- ``edge_f1``: pixel F1 of those edge maps binarised at 0.5 (↑);
- ``digit_prob``: digit classifier p(prompted digit | image) (prompt fidelity, ↑);
- the untrained ControlNet (``from_unet``: zero residuals = the base model) as a floor.

Usage::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/evidence_ctrl_u.py --out runs/ctrl_u_evidence

Results go to ``OUT/results.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"controlnet_sft": "controlnet_sft_digits.yaml", "controlnet_pp": "controlnet_pp_digits.yaml",
        "ctrl_u": "ctrl_u_digits.yaml"}


@torch.no_grad()
def evaluate(pipe, n_eval: int, steps: int, guidance: float, batch: int = 120, reward: str = "digit_stroke_mask") -> dict:
    """Controllability and fidelity of a ControlNet pipeline on held-out digit conditions made by ``reward``
    (stroke masks for ``digit_stroke_mask``, soft edge maps for ``soft_edges``) from the real test digits."""
    from genalign.data.digits import HELDOUT_TEMPLATES, digit_prompt
    from genalign.data.images import load_image_data
    from genalign.evaluation.condition import edge_f1, mask_iou, ssim
    from genalign.rewards.condition import DigitStrokeMask, SoftEdges
    from genalign.rewards.digits import DigitClassifierReward

    data = load_image_data("digits:test", 8)
    real, labels = data.images[:n_eval], data.labels[:n_eval]
    seg, edges, clf = DigitStrokeMask(), SoftEdges(), DigitClassifierReward()
    cond = (edges if reward == "soft_edges" else seg).condition_from_image(real)
    prompts = [digit_prompt(HELDOUT_TEMPLATES[i % 2], int(d)) for i, d in enumerate(labels.tolist())]
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(10_000 + j) for j in range(i, min(i + batch, len(prompts)))]
        out.append(pipe(prompts[i:i + batch], image=cond[i:i + batch], num_inference_steps=steps,
                        guidance_scale=guidance, generator=gens, output_type="pt", height=8, width=8).images.float())
    imgs = torch.cat(out)
    iou = mask_iou(DigitStrokeMask.mask_of(imgs), DigitStrokeMask.mask_of(real))
    e_gen, e_real = edges.predict(imgs), edges.predict(real)
    return {"mask_iou": float(iou.mean()), "mask_iou_sem": float(iou.std() / len(iou) ** 0.5),
            "edge_ssim": float(ssim(e_gen, e_real).mean()), "edge_f1": float(edge_f1(e_gen, e_real).mean()),
            "digit_prob": float(clf(imgs, prompts).mean()), "n": len(prompts)}


def main(argv=None) -> dict:
    """Train the three digits runs, evaluate each export on held-out conditions, print and save."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="default: the configs' train.steps")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the configs' train.batch_size")
    ap.add_argument("--model", default="builtin:digits")
    ap.add_argument("--out", default="runs/ctrl_u_evidence")
    ap.add_argument("--n-eval", type=int, default=360)
    ap.add_argument("--eval-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--only", nargs="*", default=list(RUNS), help="subset of runs")
    ap.add_argument("--reward", default="digit_stroke_mask", choices=["digit_stroke_mask", "soft_edges"],
                    help="condition / reward: stroke masks (default) or soft edge maps")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    args = ap.parse_args(argv)

    from diffusers import DiffusionPipeline

    from genalign.config import load_config
    from genalign.pipelines.base import load_diffusers_pipeline
    from genalign.pipelines.controlnet import build_controlnet_pipeline, controlnet_from_unet
    from genalign.training.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}
    base = load_diffusers_pipeline(args.model)
    untrained = build_controlnet_pipeline(base, controlnet_from_unet(base.unet, vae_scale_factor=1))
    results["untrained_controlnet"] = evaluate(untrained, args.n_eval, args.eval_steps, args.guidance,
                                               reward=args.reward)
    print("untrained", results["untrained_controlnet"], flush=True)
    for name in args.only:
        overrides = [f"pipeline.model={args.model}", f"objective.reward={args.reward}",
                     "validation.samples_per_prompt=1", "validation.max_prompts=2",
                     "validation.num_inference_steps=5", *args.set]
        overrides += [f"train.steps={args.steps}"] if args.steps else []
        overrides += [f"train.batch_size={args.batch_size}"] if args.batch_size else []
        cfg = load_config(ROOT / "configs" / RUNS[name], overrides)
        t0 = time.time()
        summary = train(cfg, out / name, progress=False)
        pipe = DiffusionPipeline.from_pretrained(out / name / "export")  # the vanilla-loadable export
        results[name] = {**evaluate(pipe, args.n_eval, args.eval_steps, args.guidance, reward=args.reward),
                         "train_seconds": round(time.time() - t0, 1), "steps": summary["steps"],
                         "final_metrics": summary["final_metrics"], "overrides": overrides}
        print(name, results[name], flush=True)
        res_file.write_text(json.dumps(results, indent=2))
    res_file.write_text(json.dumps(results, indent=2))
    print(f"\n{'run':22s} {'mask IoU':>10s} {'edge SSIM':>10s} {'edge F1':>9s} {'digit p':>8s}")
    for k, v in results.items():
        print(f"{k:22s} {v['mask_iou']:10.4f} {v['edge_ssim']:10.4f} {v['edge_f1']:9.4f} {v['digit_prob']:8.4f}")
    return results


if __name__ == "__main__":
    main()
