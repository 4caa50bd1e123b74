"""Score the base digits model and exported runs the same way: held-out reward and Frechet distance.

For each folder (the base ``builtin:digits`` first, then ``RUN_DIR/export`` of every run given) this loads the
pipeline with vanilla ``diffusers.StableDiffusionPipeline``, draws 16 samples for each of the 20 held-out prompts
(``digits:heldout``; sample i uses seed i, DDIM 25 steps, CFG 1) and prints a Markdown table of the mean
``digit_classifier`` reward and the Frechet distance to the real held-out digits on the classifier's features
(:func:`genalign.rewards.digits.digits_frechet_distance`; lower = closer to real data). Usage::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/evidence_quickstart.py runs/quickstart [runs/other ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


@torch.no_grad()
def score_folder(folder: str | Path, per_prompt: int = 16, guidance: float = 1.0) -> tuple[float, float]:
    """``(mean digit_classifier reward, Frechet distance)`` of a Diffusers folder on the held-out prompts."""
    from diffusers import StableDiffusionPipeline

    from genalign.data.digits import digits_prompts
    from genalign.rewards.digits import DigitClassifierReward, digits_frechet_distance

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in digits_prompts("heldout") for _ in range(per_prompt)]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    imgs = pipe(prompts, num_inference_steps=25, guidance_scale=guidance, output_type="pt", generator=gens).images
    return DigitClassifierReward().score(imgs, prompts).mean().item(), digits_frechet_distance(imgs)


def main() -> None:
    from genalign.pipelines.digits import digits_base_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run folders (their export/ is scored)")
    ap.add_argument("--samples-per-prompt", type=int, default=16)
    args = ap.parse_args()
    rows = [("base (builtin:digits)", digits_base_path())] + [(r, Path(r) / "export") for r in args.runs]
    print("| model | held-out reward | FD to real held-out digits |\n|---|---|---|")
    for name, folder in rows:
        reward, fd = score_folder(folder, args.samples_per_prompt)
        print(f"| {name} | {reward:.4f} | {fd:.1f} |")


if __name__ == "__main__":
    main()
