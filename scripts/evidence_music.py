"""Alignment evidence on the built-in music model (issue 18): DRAGON (music_key) and DDO (real clips) from configs.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/evidence_music.py dragon --seed 0 [--set key=value ...]
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/evidence_music.py ddo --seed 1

For each run: ``genalign train configs/{dragon,ddo}_music.yaml`` into ``OUT/<method>_seed<k>`` (``--out``, default
``runs/evidence/music``), then the base (``builtin:music``) and the exported aligned pipeline generate one clip per
held-out caption and seed (same prompt, same seed; the base's default sampler: cosine DDIM 25, no CFG) and both are
scored: music_key, music_style, music_clap (means), the per-sample music_key win rate with its Wilson 95 % interval,
and the Fréchet distance (music classifier features) of each set to the held-out real clips. WAV pairs for the
first prompts go to ``OUT/<run>/listen/`` and the figures to ``OUT/<run>/evidence.json``.
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


def score_model(ad, prompts: list[str], seeds: list[int], rewards: dict, stats) -> tuple[dict, torch.Tensor, dict]:
    from genalign.rewards.music import music_frechet_distance

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    wav = ad.sample(prompts, num_inference_steps=25, guidance_scale=1.0, generator=gens, batch_size=16)
    per = {}
    with torch.no_grad():
        for name, r in rewards.items():
            per[name] = torch.cat([r(wav[i:i + 32], prompts[i:i + 32]) for i in range(0, len(wav), 32)])
        fd = music_frechet_distance(wav, stats, rewards["music_key"].net)
    means = {k: round(v.mean().item(), 4) for k, v in per.items()}
    means["fd_to_heldout_real"] = round(fd, 3)
    return means, wav, per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=["dragon", "ddo"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/evidence/music")
    ap.add_argument("--seeds-per-prompt", type=int, default=3)
    ap.add_argument("--listen", type=int, default=6, help="WAV pairs written for the first N prompts")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    from genalign.config import load_config
    from genalign.data.audio import save_audio
    from genalign.data.prompts import load_prompts
    from genalign.evaluation.winrate import paired_win_rate
    from genalign.pipelines.audio import StableAudioAdapter
    from genalign.pipelines.base import load_diffusers_pipeline
    from genalign.pipelines.music import HELDOUT_PROMPTS, HELDOUT_STATS
    from genalign.rewards.music import MusicCLAPScore, MusicKeyReward, MusicStyleReward
    from genalign.training.trainer import train

    run = Path(args.out) / f"{args.method}_seed{args.seed}"
    cfg = load_config(ROOT / "configs" / f"{args.method}_music.yaml", [f"seed={args.seed}"] + args.overrides)
    t0 = time.time()
    summary = train(cfg, run, progress=False)
    train_seconds = round(time.time() - t0, 1)

    prompts_1 = load_prompts(str(HELDOUT_PROMPTS))
    prompts = [p for p in prompts_1 for _ in range(args.seeds_per_prompt)]
    seeds = [9000 + i for i in range(len(prompts))]
    rewards = {"music_key": MusicKeyReward(), "music_style": MusicStyleReward(), "music_clap": MusicCLAPScore()}
    base = StableAudioAdapter(load_diffusers_pipeline("builtin:music"), lora=None, reference="none")
    aligned = StableAudioAdapter(load_diffusers_pipeline(str(run / "export")), lora=None, reference="none")
    res_b, wav_b, per_b = score_model(base, prompts, seeds, rewards, HELDOUT_STATS)
    res_a, wav_a, per_a = score_model(aligned, prompts, seeds, rewards, HELDOUT_STATS)
    wr = {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in paired_win_rate(per_a[k], per_b[k]).items()}
          for k in per_a}
    listen = run / "listen"
    for i in range(min(args.listen, len(prompts_1))):
        j = i * args.seeds_per_prompt
        save_audio(listen / f"{i:02d}_base.wav", wav_b[j], base.sample_rate)
        save_audio(listen / f"{i:02d}_{args.method}.wav", wav_a[j], base.sample_rate)
    (listen / "prompts.txt").write_text("".join(f"{i:02d}: {p}\n" for i, p in enumerate(prompts_1[: args.listen])))
    ev = {"method": args.method, "seed": args.seed, "train_seconds": train_seconds, "heldout_samples": len(prompts),
          "base": res_b, "aligned": res_a, "win_rate": wr, "summary_objective": summary.get("objective_metrics"),
          "summary_rewards": {k: summary.get(k) for k in ("reward_before", "reward_after") if k in summary},
          "command": " ".join(sys.argv)}
    (run / "evidence.json").write_text(json.dumps(ev, indent=2, default=str))
    print(json.dumps({k: ev[k] for k in ("method", "seed", "train_seconds", "base", "aligned")}, indent=2))
    print("music_key win rate:", wr["music_key"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
