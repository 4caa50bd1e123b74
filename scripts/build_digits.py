"""Rebuild the built-in digits demo deterministically: the digit classifier, then the base pipeline.

Usage: ``python scripts/build_digits.py [--skip-classifier] [--skip-base] [--unet-steps 4000]``

Writes ``genalign/assets/digits_classifier.safetensors`` (+ ``.json`` with the held-out accuracy) and the
Diffusers folder ``genalign/assets/digits/`` (+ ``build_report.json``), then evaluates the base model on the
held-out prompts with the classifier (mean p(prompted digit)) at the default sampler settings and with CFG.
"""

import argparse
import json

import torch
from safetensors.torch import save_file

from genalign.pipelines.digits import DEFAULT_GUIDANCE, DEFAULT_STEPS, DIGITS_DIR, build_digits_base
from genalign.rewards.digits import ASSETS, CLASSIFIER_FILE, train_digit_classifier


def evaluate(guidance: float, steps: int = DEFAULT_STEPS, per_prompt: int = 8) -> float:
    from diffusers import StableDiffusionPipeline

    from genalign.data.digits import digits_prompts
    from genalign.rewards.digits import DigitClassifierReward

    pipe = StableDiffusionPipeline.from_pretrained(DIGITS_DIR)
    pipe.set_progress_bar_config(disable=True)
    reward = DigitClassifierReward()
    prompts = [p for p in digits_prompts("heldout") for _ in range(per_prompt)]
    imgs = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                generator=torch.Generator().manual_seed(1234)).images
    return reward.score(imgs, prompts).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-classifier", action="store_true")
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    if not args.skip_classifier:
        model, acc = train_digit_classifier(seed=args.seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(CLASSIFIER_FILE))
        (ASSETS / "digits_classifier.json").write_text(json.dumps({"heldout_accuracy": round(acc, 4), "seed": args.seed}, indent=2))
        print(f"classifier held-out accuracy: {acc:.4f}")
    if not args.skip_base:
        print(build_digits_base(unet_steps=args.unet_steps, seed=args.seed))
    report_path = DIGITS_DIR / "build_report.json"
    report = json.loads(report_path.read_text())
    report["heldout_reward_default_sampler"] = round(evaluate(DEFAULT_GUIDANCE), 4)
    report["heldout_reward_cfg3"] = round(evaluate(3.0), 4)
    report["default_guidance_scale"] = DEFAULT_GUIDANCE
    report_path.write_text(json.dumps(report, indent=2))
    print(report)


if __name__ == "__main__":
    main()
