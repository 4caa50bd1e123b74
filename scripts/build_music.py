"""Rebuild the built-in music demo deterministically: corpus clips, classifier, CLAP, base model, evaluation.

Usage::

    OMP_NUM_THREADS=1 python scripts/build_music.py [--stages corpus,classifier,clap,base,stats,eval,clips]
        [--jobs 2] [--per-style 40] [--cache runs/music/corpus.pt] [--wav-dir runs/music/base_samples]

Needs ``pip install -e ".[music]"`` (music21). The defaults are the settings of the shipped assets (each stage seeds
itself, so a stage run alone reproduces its files bit for bit). Writes into ``genalign/assets/music/``:
``classifier.safetensors`` (music_key / music_style), ``clap/`` (tiny ClapModel folder), ``base/`` (the
``builtin:music`` Diffusers folder + its ``build_report.json``), ``heldout_stats_classifier.safetensors`` (Gaussian
of the classifier features of the held-out real clips, for FAD), ``prompts_train.txt`` / ``prompts_heldout.txt``
and ``build_report.json`` (every figure: skipped files, accuracies, VAE posterior-noise check, base held-out
rewards and FAD). The ``clips`` stage writes the train clips as WAV files + ``metadata.jsonl`` (``--clips-dir``,
default ``runs/music/train_clips``) for tools that read folders; ``configs/ddo_music.yaml`` renders the same clips
itself (``data.source.source: music:train``). With ``--jobs 2`` (default) the classifier, CLAP and stats
stages run in a second process beside the base (one core each; the rendered corpus is cached with ``--cache``,
default ``runs/music/corpus.pt``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genalign.data.music import DEMO_PER_STYLE  # noqa: E402
from genalign.pipelines.music import MUSIC_ASSETS  # noqa: E402

REPORT = MUSIC_ASSETS / "build_report.json"


def _update_report(**items) -> dict:
    from filelock import FileLock

    # stages may run in two processes (--jobs 2); the lock file lives in the temp folder, not among the assets
    # (deleting a lock file another process may hold would break the lock)
    with FileLock(str(Path(tempfile.gettempdir()) / "genalign-build-music-report.lock")):
        report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
        report.update(items)
        REPORT.write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def load_corpus(args):
    from genalign.data.music import render_corpus

    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        return torch.load(cache, weights_only=False)
    t0 = time.time()
    train = render_corpus("train", per_style=args.per_style, clips_per_piece=3, progress=True)
    held = render_corpus("heldout", per_style=args.per_style, clips_per_piece=3, progress=True)
    data = {"train": train, "heldout": held, "seconds": round(time.time() - t0, 1)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, cache)
    return data


def stage_corpus(data, args) -> None:
    from genalign.data.music import STYLES

    tr, he = data["train"], data["heldout"]
    MUSIC_ASSETS.mkdir(parents=True, exist_ok=True)
    (MUSIC_ASSETS / "prompts_train.txt").write_text("".join(c + "\n" for c in sorted(set(tr.captions))))
    (MUSIC_ASSETS / "prompts_heldout.txt").write_text("".join(c + "\n" for c in sorted(set(he.captions))))
    rep = {
        "per_style": args.per_style, "sample_rate": tr.sample_rate, "clip_samples": int(tr.waveforms.shape[-1]),
        "train_clips": len(tr), "train_pieces": len(set(tr.pieces)), "heldout_clips": len(he),
        "heldout_pieces": len(set(he.pieces)), "heldout_captions": len(set(he.captions)),
        "skipped_train": tr.skipped, "skipped_heldout": he.skipped, "render_seconds": data["seconds"],
        "train_clips_per_style": {s: int((tr.styles == i).sum()) for i, s in enumerate(STYLES)},
        "heldout_clips_per_style": {s: int((he.styles == i).sum()) for i, s in enumerate(STYLES)},
    }
    print(json.dumps(rep, indent=2))
    _update_report(corpus=rep)


def stage_classifier(data, args) -> None:
    from safetensors.torch import save_file

    from genalign.rewards.music import CLASSIFIER_FILE, classifier_accuracy, train_music_classifier

    tr, he = data["train"], data["heldout"]
    t0 = time.time()
    model = train_music_classifier(tr.waveforms, tr.keys, tr.styles, seed=args.seed, epochs=args.clf_epochs,
                                   progress=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(CLASSIFIER_FILE))
    acc = {k: round(v, 4) for k, v in classifier_accuracy(model, he.waveforms, he.keys, he.styles).items()}
    rep = {"heldout_accuracy": acc, "epochs": args.clf_epochs, "seconds": round(time.time() - t0, 1),
           "heldout_clips": len(he), "chance_key": round(1 / 24, 4), "chance_style": 0.25}
    print("classifier:", rep)
    _update_report(classifier=rep)


def stage_clap(data, args) -> None:
    from genalign.rewards.music import CLAP_DIR, MusicCLAPScore, clap_retrieval_accuracy, train_music_clap

    tr, he = data["train"], data["heldout"]
    rep = train_music_clap(tr.waveforms, tr.captions, CLAP_DIR, steps=args.clap_steps, batch_size=args.clap_batch,
                           seed=args.seed, progress=True)
    scorer = MusicCLAPScore()
    rep["heldout_retrieval"] = {k: round(v, 4) for k, v in clap_retrieval_accuracy(scorer, he.waveforms, he.captions).items()}
    with torch.no_grad():
        matched = torch.cat([scorer(he.waveforms[i:i + 32], he.captions[i:i + 32]) for i in range(0, len(he), 32)])
        shuffled = [he.captions[(i + len(he) // 2) % len(he)] for i in range(len(he))]
        mism = torch.cat([scorer(he.waveforms[i:i + 32], shuffled[i:i + 32]) for i in range(0, len(he), 32)])
    rep["heldout_cosine_matched"] = round(matched.mean().item(), 4)
    rep["heldout_cosine_shuffled"] = round(mism.mean().item(), 4)
    print("clap:", rep)
    _update_report(clap=rep)


def stage_base(data, args) -> None:
    from genalign.data.music import caption_words
    from genalign.pipelines.music import MUSIC_DIR, build_music_base

    tr = data["train"]
    rep = build_music_base(tr.waveforms, tr.captions, caption_words(), MUSIC_DIR, dit_steps=args.dit_steps,
                           batch_size=args.dit_batch, seed=args.seed)
    print("base:", rep)
    _update_report(base=rep)


def stage_stats(data, args) -> None:
    from genalign.pipelines.music import HELDOUT_STATS
    from genalign.rewards.fad import ReferenceStats
    from genalign.rewards.music import MusicKeyReward

    he = data["heldout"]
    clf = MusicKeyReward()
    with torch.no_grad():
        feats = torch.cat([clf.embed(he.waveforms[i:i + 64]) for i in range(0, len(he), 64)])
    sha = ReferenceStats.from_embeddings(feats, encoder="music_key classifier features (128-d)",
                                         data="music21 corpus, held-out pieces", sample_rate=str(he.sample_rate)).save(HELDOUT_STATS)
    _update_report(heldout_stats={"n": len(he), "dim": int(feats.shape[1]), "sha256": sha})


def stage_eval(data, args) -> None:
    """Base model on the held-out captions: mean music_key / music_style / music_clap, FD to held-out real clips."""
    from genalign.data.audio import save_audio
    from genalign.pipelines.audio import StableAudioAdapter
    from genalign.pipelines.base import load_diffusers_pipeline
    from genalign.pipelines.music import DEFAULT_GUIDANCE, DEFAULT_STEPS, HELDOUT_STATS
    from genalign.rewards.music import MusicCLAPScore, MusicKeyReward, MusicStyleReward, music_frechet_distance

    he = data["heldout"]
    prompts = he.captions[: args.eval_clips]
    key, style, clap = MusicKeyReward(), MusicStyleReward(), MusicCLAPScore()
    out = {"prompts": len(prompts)}
    with torch.no_grad():
        real = he.waveforms[: len(prompts)]
        out["real_heldout"] = {"music_key": key(real, prompts).mean().item(), "music_style": style(real, prompts).mean().item(),
                               "music_clap": clap(real, prompts).mean().item()}
    ad = StableAudioAdapter(load_diffusers_pipeline("builtin:music"), lora=None, reference="none")
    for guidance in (DEFAULT_GUIDANCE, 3.0):
        gens = [torch.Generator().manual_seed(1234 + i) for i in range(len(prompts))]
        wav = ad.sample(prompts, num_inference_steps=DEFAULT_STEPS, guidance_scale=guidance, generator=gens, batch_size=16)
        with torch.no_grad():
            res = {"music_key": key(wav, prompts).mean().item(), "music_style": style(wav, prompts).mean().item(),
                   "music_clap": clap(wav, prompts).mean().item(),
                   "fd_to_heldout_real": music_frechet_distance(wav, HELDOUT_STATS, key.net)}
        out[f"base_cfg{guidance:g}"] = {k: round(v, 4) for k, v in res.items()}
        if args.wav_dir:
            for i in range(min(8, len(prompts))):
                save_audio(Path(args.wav_dir) / f"cfg{guidance:g}_{i:02d}.wav", wav[i], ad.sample_rate)
    if args.wav_dir:
        for i in range(min(8, len(prompts))):
            save_audio(Path(args.wav_dir) / f"real_{i:02d}.wav", he.waveforms[i], he.sample_rate)
        (Path(args.wav_dir) / "prompts.txt").write_text("".join(p + "\n" for p in prompts[:8]))
    # the VAE on held-out real clips: reconstruction SNR and the classifier's accuracy on the reconstructions
    from genalign.pipelines.music import encode_posterior
    from genalign.rewards.music import classifier_accuracy

    mu, _ = encode_posterior(ad.pipe.vae, he.waveforms, desc="eval: encode held-out clips")
    with torch.no_grad():
        rec = torch.cat([ad.pipe.vae.decode(mu[i:i + 32]).sample for i in range(0, len(mu), 32)])
    snr = 10 * torch.log10(he.waveforms.pow(2).sum() / (rec - he.waveforms).pow(2).sum())
    out["vae_heldout"] = {"snr_db": round(float(snr), 2), "clips": len(he),
                          "accuracy_on_reconstructions": {k: round(v, 4) for k, v in
                                                          classifier_accuracy(key.net, rec, he.keys, he.styles).items()},
                          "accuracy_on_originals": {k: round(v, 4) for k, v in
                                                    classifier_accuracy(key.net, he.waveforms, he.keys, he.styles).items()}}
    with torch.no_grad():
        out["fd_real_train_vs_heldout"] = round(music_frechet_distance(data["train"].waveforms[: len(prompts) * 4][::4],
                                                                       HELDOUT_STATS, key.net), 4)
    out["real_heldout"] = {k: round(v, 4) for k, v in out["real_heldout"].items()}
    print("eval:", json.dumps(out, indent=2))
    _update_report(evaluation=out)


def stage_clips(data, args) -> None:
    """Write the rendered train clips as WAV files + ``metadata.jsonl`` (``{"file_name", "prompt"}``) to
    ``--clips-dir``: the real-data source of ``configs/ddo_music.yaml`` (not shipped: ~30 MB)."""
    from genalign.data.audio import save_audio

    tr = data["train"]
    out = Path(args.clips_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (w, cap) in enumerate(zip(tr.waveforms, tr.captions)):
        name = f"{i:05d}.wav"
        save_audio(out / name, w, tr.sample_rate)
        rows.append(json.dumps({"file_name": name, "prompt": cap}))
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    print(f"clips: {len(rows)} WAV files in {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="corpus,classifier,clap,base,stats,eval")
    ap.add_argument("--per-style", type=int, default=DEMO_PER_STYLE)
    ap.add_argument("--cache", default=None, help="cache file for the rendered corpus (reused when present)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clf-epochs", type=int, default=20)
    ap.add_argument("--clap-steps", type=int, default=500)
    ap.add_argument("--clap-batch", type=int, default=24)
    ap.add_argument("--dit-steps", type=int, default=1000)
    ap.add_argument("--dit-batch", type=int, default=32)
    ap.add_argument("--eval-clips", type=int, default=96)
    ap.add_argument("--wav-dir", default=None, help="write a few base / real WAV files here (listening samples)")
    ap.add_argument("--clips-dir", default="runs/music/train_clips", help="stage clips: where the train WAVs go")
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2],
                    help="2: the classifier, clap and stats stages run in a second process beside the base")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    names = args.stages.split(",")
    side = [n for n in ("classifier", "clap", "stats") if n in names] if args.jobs == 2 and "base" in names else []
    if side and not args.cache:  # the second process reads the rendered corpus from a cache file
        args.cache = str(ROOT / "runs" / "music" / "corpus.pt")
    data = load_corpus(args)
    proc = None
    if side:
        cmd = [sys.executable, __file__, "--stages", ",".join(side), "--cache", args.cache, "--jobs", "1",
               "--per-style", str(args.per_style), "--seed", str(args.seed), "--clf-epochs", str(args.clf_epochs),
               "--clap-steps", str(args.clap_steps), "--clap-batch", str(args.clap_batch)]
        proc = subprocess.Popen(cmd)
        print(f"[{','.join(side)}] running in process {proc.pid}", flush=True)
    stages = {"corpus": stage_corpus, "classifier": stage_classifier, "clap": stage_clap, "base": stage_base,
              "stats": stage_stats, "eval": stage_eval, "clips": stage_clips}
    for name in names:
        if name in side:
            continue
        if name == "eval" and proc is not None:  # eval reads the classifier, CLAP and stats the side process writes
            if proc.wait() != 0:
                raise SystemExit(f"stages {side} failed (exit {proc.returncode})")
            proc = None
        t = time.time()
        stages[name](data, args)
        print(f"[{name}] {time.time() - t:.0f} s", flush=True)
    if proc is not None and proc.wait() != 0:
        raise SystemExit(f"stages {side} failed (exit {proc.returncode})")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
