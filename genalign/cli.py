"""``genalign`` command line: thin wrappers that parse arguments and call the Python API.

    genalign train [CONFIG] [--output-dir DIR] [--resume latest|PATH] [--set key.sub=value ...]
    genalign generate MODEL --prompts SPEC [--out DIR] [--steps N] [--guidance-scale G] [--seed S]
    genalign export RUN_DIR OUT_DIR [--checkpoint latest|PATH]
    genalign score SAMPLES --reward NAME [--reward NAME ...] [--out FILE]
    genalign list [objectives|rewards|pipelines]

Errors in user input (config, paths, missing weights) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  genalign train                                     # the digits quickstart (configs/quickstart.yaml defaults)
  genalign train configs/mapo_sdxl.yaml --set train.steps=500 --set pipeline.lora.rank=16
  genalign train cfg.yaml --output-dir runs/x --resume latest
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genalign", description="Align generative models with preferences and rewards.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train from a YAML config", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train an objective from a YAML run config. Writes RUN_DIR/config.yaml, "
                                   "checkpoints/, export/, logs/ and summary.json (reward_before / reward_after on "
                                   "held-out prompts, steps, seconds).", epilog=EXAMPLES)
    t.add_argument("config", nargs="?", default=None,
                   help="YAML run config (default: the built-in digits quickstart, no file needed)")
    t.add_argument("--output-dir", "-o", default=None, help="run folder (default: runs/<config name>)")
    t.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="resume from the newest complete checkpoint of the run folder, or from a checkpoint folder")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=50 (repeatable; values parsed as YAML)")
    t.add_argument("--quiet", action="store_true", help="no progress bar or result table")

    g = sub.add_parser("generate", help="generate images with a pipeline or an exported run",
                       description="Generate PNG images from a Diffusers folder, hub id, builtin:digits, or a run "
                                   "folder (uses RUN_DIR/export).")
    g.add_argument("model", help="Diffusers folder | hub id | builtin:digits | RUN_DIR")
    g.add_argument("--prompts", default="digits:heldout",
                   help="prompt spec: digits:train|digits:heldout|parti|parti:<Category>|file (.txt/.tsv/.jsonl)")
    g.add_argument("--out", default="samples", help="output folder (PNG files + prompts.jsonl)")
    g.add_argument("--num-per-prompt", type=int, default=1)
    g.add_argument("--max-prompts", type=int, default=None)
    g.add_argument("--steps", type=int, default=25, help="sampler steps")
    g.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (1 = no guidance)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=16)

    e = sub.add_parser("export", help="export a run as a vanilla Diffusers pipeline + LoRA + model card",
                       description="Export RUN_DIR's newest (or a given) checkpoint to OUT_DIR: a Diffusers pipeline "
                                   "folder (LoRA merged), pytorch_lora_weights.safetensors and README.md.")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("--checkpoint", default="latest", help="latest | path of a checkpoint folder")

    s = sub.add_parser("score", help="score samples with rewards",
                       description="Score a folder of images (prompts from metadata.jsonl/prompts.jsonl with fields "
                                   "file_name, prompt, or sidecar .txt files) with one or more rewards.")
    s.add_argument("samples", help="folder of images or a jsonl file")
    s.add_argument("--reward", action="append", required=True, help="reward name (repeatable); see `genalign list rewards`")
    s.add_argument("--out", default=None, help="write per-sample scores (.jsonl or .csv)")
    s.add_argument("--batch-size", type=int, default=8)

    ls = sub.add_parser("list", help="list registered objectives, rewards and pipelines")
    ls.add_argument("what", nargs="?", choices=["objectives", "rewards", "pipelines"], default=None)
    return p


def _cmd_train(args) -> int:
    from genalign.config import load_config
    from genalign.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    out = args.output_dir or str(Path("runs") / (Path(args.config).stem if args.config else "quickstart"))
    summary = train(cfg, out, resume=args.resume, progress=not args.quiet)
    if "stopped_at" not in summary:
        print(f"run folder: {out}  (export: {out}/export, summary: {out}/summary.json)")
    return 0


def _cmd_generate(args) -> int:
    import json

    import torch
    from diffusers.utils import numpy_to_pil

    from genalign.data.prompts import load_prompts
    from genalign.pipelines.base import load_diffusers_pipeline

    model = args.model
    if (Path(model) / "export" / "model_index.json").exists():
        model = str(Path(model) / "export")
    pipe = load_diffusers_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in load_prompts(args.prompts, args.max_prompts) for _ in range(args.num_per_prompt)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i:i + args.batch_size]
        gens = [torch.Generator().manual_seed(args.seed + i + j) for j in range(len(chunk))]
        imgs = pipe(chunk, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=gens,
                    output_type="np").images
        for j, img in enumerate(numpy_to_pil(imgs)):
            name = f"{i + j:05d}.png"
            img.save(out / name)
            rows.append({"file_name": name, "prompt": chunk[j], "seed": args.seed + i + j})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} images to {out}")
    return 0


def _cmd_export(args) -> int:
    from genalign.export import export_run

    print(f"exported to {export_run(args.run_dir, args.out_dir, args.checkpoint)}")
    return 0


def _cmd_score(args) -> int:
    from genalign.scoring import score_samples, write_scores

    res = score_samples(args.samples, [{"name": r} for r in args.reward], batch_size=args.batch_size)
    for k, v in res["mean"].items():
        print(f"{k}: {v:.4f}")
    if res.get("skipped"):
        print(f"skipped {res['skipped']} unreadable files")
    if args.out:
        write_scores(res, args.out)
    return 0


def _cmd_list(args) -> int:
    from genalign.registry import objectives, pipelines, rewards

    regs = {"objectives": objectives, "rewards": rewards, "pipelines": pipelines}
    for name, reg in regs.items():
        if args.what and args.what != name:
            continue
        print(f"{name}:")
        for n, desc in reg.describe():
            print(f"  {n:28s} {desc}")
    return 0


def _quiet_libraries() -> None:
    """Keep library chatter (per-call loading bars, safe-to-ignore warnings) out of the user's terminal."""
    import logging
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``genalign`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from genalign.config import ConfigError
    from genalign.rewards.base import WeightsNotFoundError

    handlers = {"train": _cmd_train, "generate": _cmd_generate, "export": _cmd_export, "score": _cmd_score,
                "list": _cmd_list}
    try:
        return handlers[args.command](args)
    except (ConfigError, WeightsNotFoundError, FileNotFoundError) as err:
        print(f"genalign {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
