"""Text-to-music DRAGON on CPU (issue 5 §4): a tiny Stable-Audio-architecture model pretrained briefly on synthetic
music, then DRAGON with a feature-based exemplar reward (per-song FAD on the model's own VAE latent frames,
"VAE-PSFAD", against a folder of synthetic *chord* clips).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/evidence_dragon_music.py [--out runs/evidence/music]
        [--vae-steps 300] [--dit-steps 600] [--set key=value ...]

Steps: (1) synthesize clips (tones / chords / rhythms, prompts "a fast chord in A"), train the tiny Oobleck VAE
(L1 + 1e-4 KL) and then the DiT + T5 + projection (cosine v-objective, 10 % empty prompts); save a Diffusers folder.
(2) write 32 chord exemplars as WAV files. (3) train DRAGON (``pipeline.name: stable_audio``) and report the
per-song FAD reward before/after and the win rate (summary.json). (4) write before/after WAV samples for the
evaluation prompts. Writes ``OUT/evidence_<run-name>.json`` and ``OUT/samples_<run-name>/*.wav``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pretrain(out: Path, vae_steps: int, dit_steps: int, seed: int = 0) -> dict:
    from genalign.data.audio import synthetic_music_dataset
    from genalign.pipelines.audio import tiny_stable_audio_pipeline
    from genalign.pipelines.tiny import fit_vae

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    pipe = tiny_stable_audio_pipeline()
    sr, n = pipe.vae.config.sampling_rate, pipe.transformer.config.sample_size * pipe.vae.hop_length
    data = synthetic_music_dataset(512, sample_rate=sr, duration=n / sr, seed=seed)
    x = data.waveforms
    t0 = time.time()
    vae = pipe.vae
    vae_loss = fit_vae(vae, x, vae_steps, 16, 1e-4, g)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)])
    scale = float(lat.std())  # reported only: the DiT is trained on the raw latents (latent_scale 1, as SAO)
    dit, te, proj = pipe.transformer, pipe.text_encoder, pipe.projection_model
    params = list(dit.parameters()) + list(te.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    from genalign.pipelines.audio import StableAudioAdapter

    ad = StableAudioAdapter(pipe, lora=None, reference="frozen_copy")
    for m in (te, proj):
        m.requires_grad_(True).train()
    for step in range(dit_steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        prompts = ["" if torch.rand(1, generator=g).item() < 0.1 else data.prompts[i] for i in idx.tolist()]
        cond = _cond_with_grad(pipe, prompts, ad.audio_seconds)
        noise = torch.randn(lat[idx].shape, generator=g)
        t = torch.rand(32, generator=g)
        pred = ad.predict(ad.add_noise(lat[idx], noise, t), t, cond)
        loss = F.mse_loss(pred.float(), ad.target(lat[idx], noise, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for m in (dit, te, proj, vae):
        m.eval()
    pipe.save_pretrained(out)
    return {"vae_steps": vae_steps, "vae_l1": vae_loss, "dit_steps": dit_steps, "dit_mse": loss.item(),
            "latent_std": scale, "seconds": round(time.time() - t0, 1), "sample_rate": sr, "clip_samples": n}


def _cond_with_grad(pipe, prompts, seconds):
    emb = pipe.encode_prompt(prompts, pipe.text_encoder.device, False)
    start, end = pipe.encode_duration(0.0, seconds, pipe.text_encoder.device, False, len(prompts))
    return {"encoder_hidden_states": torch.cat([emb, start, end], 1), "global_hidden_states": torch.cat([start, end], 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/evidence/music")
    ap.add_argument("--vae-steps", type=int, default=300)
    ap.add_argument("--dit-steps", type=int, default=600)
    ap.add_argument("--run-name", default="run", help="training run folder under OUT (the base model is reused)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base_model"
    report: dict = {}
    if not (base / "model_index.json").exists():
        report["pretrain"] = pretrain(base, args.vae_steps, args.dit_steps)
    from genalign.data.audio import save_audio, synth_clip, synth_prompt

    sr = json.loads((base / "vae" / "config.json").read_text())["sampling_rate"]
    ex = out / "exemplars_chords"
    for i, note in enumerate("CDEFGAB" * 5):
        save_audio(ex / f"chord_{i:02d}.wav", synth_clip(note, ["slow", "medium", "fast"][i % 3], "chord", sr, 0.512,
                                                         seed=10_000 + i), sr)
    prompts = out / "prompts.txt"
    prompts.write_text("".join(synth_prompt(n, t, k) + "\n" for n in "CDEFGAB" for t in ("slow", "fast")
                               for k in ("tone", "rhythm")))
    heldout = out / "heldout.txt"
    heldout.write_text("".join(synth_prompt(n, "medium", k) + "\n" for n in "CEGA" for k in ("tone", "chord")))
    from genalign.config import load_config
    from genalign.training.trainer import train

    cfg = load_config(None, [
        "pipeline.name=stable_audio", f"pipeline.model={base}", "pipeline.lora.rank=8",
        f"data.source={{kind: prompts, prompts: '{prompts}'}}", "objective.name=dragon",
        f"objective.rewards=[{{name: fad-song, input: latents, encoder: frames, exemplars: '{ex}'}}]",
        "objective.prompts_per_round=16", "objective.clips_per_prompt=4", "objective.num_inference_steps=10",
        "objective.steps_per_round=10", "objective.win_rate_samples_per_prompt=4", "objective.beta_dpo=5000",
        f"objective.win_rate_prompts={heldout}", "rewards=[{name: clap, kwargs: {tiny: true, sample_rate: 8000}}]",
        f"validation.prompts={heldout}", "validation.samples_per_prompt=1", "validation.num_inference_steps=10",
        "train.steps=40", "train.batch_size=8", "train.learning_rate=3e-4", "export.enabled=false",
    ] + args.overrides)
    t0 = time.time()
    summary = train(cfg, out / args.run_name, progress=False)
    report.update(train_seconds=round(time.time() - t0, 1), objective_metrics=summary["objective_metrics"])
    # WAV samples: base (LoRA off) vs trained (last checkpoint), same prompts and seeds
    from genalign.pipelines.audio import StableAudioAdapter
    from genalign.training import checkpoint as ckpt

    model = StableAudioAdapter.from_config(cfg.pipeline)
    ckpt.load_trainable(model.unet, ckpt.list_checkpoints(out / args.run_name)[-1] / "trainable.safetensors")
    wavs = []
    for i, p in enumerate(heldout.read_text().splitlines()):
        for tag, ref in (("base", True), ("dragon", False)):
            lat = model.sample_latents([p], 10, 1.0, [torch.Generator().manual_seed(4321 + i)], use_reference=ref)
            f = out / f"samples_{args.run_name}" / f"{i:02d}_{tag}_{p.replace(' ', '_')}.wav"
            save_audio(f, model.decode(lat)[0].detach(), model.sample_rate)
            wavs.append(str(f))
    report["wav_samples"] = wavs
    (out / f"evidence_{args.run_name}.json").write_text(json.dumps(report, indent=2, default=str))
    om = summary["objective_metrics"]
    for name, t in om["terms"].items():
        print(f"{name}: before {t['before']:.4f} after {t['after']:.4f} win rate {t['win_rate']:.3f} ({t['method']})")
    print("rounds:", [(r["round"], round(r[[k for k in r if k.startswith("reward/")][0]], 4)) for r in om["rounds"]])
    print("wav samples:", out / f"samples_{args.run_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
