"""``genalign`` command line: thin wrappers that parse arguments and call the Python API.

    genalign train [CONFIG] [--output-dir DIR] [--resume latest|PATH] [--set key.sub=value ...]
    genalign generate MODEL --prompts SPEC [--out DIR] [--steps N] [--guidance-scale G] [--seed S]
    genalign export RUN_DIR OUT_DIR [--checkpoint latest|PATH]
    genalign score --reward NAME[,NAME...] (--images DIR | --audio DIR | --run RUN_DIR) [--prompts FILE] [--out FILE]
    genalign relabel PAIRS --reward NAME --out OUT.jsonl
    genalign report RUN_DIR [--out report.html]
    genalign list [objectives|rewards|pipelines]

Errors in user input (config, paths, missing weights) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent / "assets" / "quickstart.yaml"

EXAMPLES = """examples:
  genalign train                                     # the digits quickstart (configs/quickstart.yaml)
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
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a previous run (removes only genalign's run files)")
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
    g.add_argument("--grid", action="store_true",
                   help="also write grid.png: one row per prompt, one column per sample (tiny images upscaled)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("export", help="export a run as a vanilla Diffusers pipeline + LoRA + model card",
                       description="Export RUN_DIR's newest (or a given) checkpoint to OUT_DIR: a Diffusers pipeline "
                                   "folder (LoRA merged), pytorch_lora_weights.safetensors and README.md.")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("--checkpoint", default="latest", help="latest | path of a checkpoint folder")

    s = sub.add_parser("score", help="score samples with rewards", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score a folder of images or audio files with one or more rewards: per-sample rows "
                                   "(--out) and an aggregate table. Prompts come from metadata.jsonl / prompts.jsonl "
                                   "(file_name, prompt), sidecar <stem>.txt files, or --prompts (a manifest matched by "
                                   "file name, or a prompt list matched by the number in each file name). --run scores "
                                   "a run's export on its held-out prompts (samples generated once, then reused).",
                       epilog="examples:\n  genalign score --reward pickscore,hps-v2.1 --images samples/ --out scores.csv\n"
                              "  genalign score --reward clap --audio clips/ --prompts prompts.txt\n"
                              "  genalign score --run runs/quickstart            # the run's own rewards")
    s.add_argument("samples", nargs="?", default=None,
                   help="folder of samples, one image / audio file, or a jsonl manifest (same as --images)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR", default=None,
                     help="folder of images, one image file, or a jsonl manifest")
    src.add_argument("--audio", metavar="DIR", default=None,
                     help="folder of audio files (.wav/.flac/.ogg) or one audio file")
    src.add_argument("--run", metavar="RUN_DIR", default=None,
                     help="a run folder: generate (or reuse) its held-out samples and score them")
    src.add_argument("--conditions", metavar="DIR", default=None,
                     help="condition dataset: metadata.jsonl rows with file_name (generated image), condition "
                          "(condition image) and optional image (real); scored by --reward (a condition reward, "
                          "e.g. digit_stroke_mask, segformer, dpt_depth, soft_edges) with --metric")
    s.add_argument("--metric", default=None, choices=["mask_iou", "miou", "rmse", "ssim", "edge_f1"],
                   help="with --conditions: the consistency metric (default: the reward's task default)")
    s.add_argument("--reward", action="append", default=None, metavar="NAME[,NAME...]",
                   help="reward name(s), comma-separated or repeated; see `genalign list rewards` "
                        "(default with --run: the run's config rewards)")
    s.add_argument("--reward-kwargs", default=None, metavar="JSON",
                   help='constructor settings for every --reward, a JSON object, e.g. \'{"tiny": true}\'')
    s.add_argument("--reward-config", default=None, metavar="YAML",
                   help="rewards with their settings: a YAML list of {name, weight, kwargs} items, or a run config "
                        "(its rewards: section)")
    s.add_argument("--recursive", action="store_true",
                   help="also score the files in sub-folders (without it they are counted as skipped)")
    s.add_argument("--prompts", default=None, metavar="FILE", help="prompts file: manifest (.jsonl with file_name, "
                   "prompt) or prompt list (.txt/.tsv/.jsonl)")
    s.add_argument("--which", choices=["trained", "base", "both"], default="trained",
                   help="with --run: score the export (trained), the base model, or both")
    s.add_argument("--out", default=None, help="write per-sample scores (.csv, .jsonl, or .json for everything)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default=None, help="torch device (default: cpu; cuda if given)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    rl = sub.add_parser("relabel", help="re-label preference pairs with a reward",
                        description="Re-label a preference dataset (genalign jsonl + images, or Pick-a-Pic "
                                    "parquet/arrow) with a reward: the higher-reward image becomes 'chosen'; pairs "
                                    "with equal rewards are dropped and counted. Writes genalign's jsonl schema.")
    rl.add_argument("pairs", help="jsonl file, folder of jsonl / parquet / arrow data, or a datasets hub id")
    rl.add_argument("--reward", required=True, help="an instance image reward (see `genalign list rewards`)")
    rl.add_argument("--out", required=True, help="output .jsonl (encoded images go to <stem>_images/ beside it)")
    rl.add_argument("--split", default="train")
    rl.add_argument("--max-pairs", type=int, default=None)
    rl.add_argument("--batch-size", type=int, default=8)
    rl.add_argument("--device", default=None)
    rl.add_argument("--quiet", action="store_true", help="no progress bar")

    rp = sub.add_parser("report", help="write a run's self-contained HTML report",
                        description="Write one self-contained HTML page for a run from what training kept (nothing is "
                                    "drawn again): per held-out prompt the base and trained samples of the same seed "
                                    "side by side with the prompt's mean reward before/after, the per-sample win rate, "
                                    "reward histograms and curves, the fidelity figure where the run has one, the "
                                    "final reward table and the resolved config.")
    rp.add_argument("run_dir")
    rp.add_argument("--out", default=None, help="output .html (default: RUN_DIR/report.html)")
    rp.add_argument("--no-samples", action="store_true",
                    help="for runs that kept no samples (older runs): do not draw them for the page")
    rp.add_argument("--device", default=None)

    pl = sub.add_parser("plan", help="pre-flight: parameters, peak memory per GPU, step time, data and sequence "
                        "checks; exit 1 if the run would not fit or not start")
    pl.add_argument("config")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--gpus", type=int, default=1)
    pl.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    pl.add_argument("--gpu", default="A100", help="GPU for the step-time estimate (H100, A100, L40S, A10G, L4, RTX4090)")
    pl.add_argument("--parallelism", default="ddp", choices=["ddp", "zero2", "fsdp"])
    pl.add_argument("--online", action="store_true", help="read unshipped model configs from the hub")
    pl.add_argument("--require-data", action="store_true", help="fail when a data file / folder does not exist yet")
    pl.add_argument("--no-trace", action="store_true", help="skip the activation / FLOP trace (parameter items only)")

    ls = sub.add_parser("list", help="list registered objectives, rewards and pipelines")
    ls.add_argument("what", nargs="?", choices=["objectives", "rewards", "pipelines"], default=None)
    return p


def _cmd_train(args) -> int:
    from genalign import api

    # No config: the built-in quickstart (configs/quickstart.yaml, shipped as package data).
    cfg = api.load_config(args.config or QUICKSTART, args.overrides)
    out = args.output_dir or str(Path("runs") / (Path(args.config).stem if args.config else "quickstart"))
    summary = api.train(cfg, out, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    if "stopped_at" in summary:  # checkpointed after SIGINT / SIGTERM: the shell's 128 + signal convention
        return 128 + int(summary.get("signal") or 15)
    if summary.get("status", "ok") != "ok":
        print(f"genalign train: error: {summary['status']} (see {out}/summary.json)", file=sys.stderr)
        return 1
    print(f"run folder: {out}  (export: {out}/export, summary: {out}/summary.json)")
    return 0


def _cmd_generate(args) -> int:
    from genalign import api

    from genalign.data.prompts import load_prompts

    try:  # an unknown prompt set / missing prompt file: one line naming the option, before the model loads
        load_prompts(args.prompts, args.max_prompts)
    except (FileNotFoundError, ValueError) as err:
        raise OSError(f"--prompts {args.prompts}: {err}") from None
    rows = api.generate(args.model, args.prompts, args.out, steps=args.steps, guidance_scale=args.guidance_scale,
                        seed=args.seed, batch_size=args.batch_size, num_per_prompt=args.num_per_prompt,
                        max_prompts=args.max_prompts, grid=args.grid, progress=not args.quiet)
    kind = "WAV files" if rows and str(rows[0]["file_name"]).endswith(".wav") else "images"
    grid = f" and {Path(args.out) / 'grid.png'}" if args.grid and (Path(args.out) / "grid.png").exists() else ""
    print(f"wrote {len(rows)} {kind} to {args.out}{grid}")
    return 0


def _reward_specs(args) -> list:
    """--reward names (+ --reward-kwargs) and --reward-config items as validated reward specs (dicts)."""
    import yaml
    from pydantic import ValidationError

    from genalign.config import ConfigError, RewardItem

    names = [n.strip() for r in (args.reward or []) for n in r.split(",") if n.strip()]
    kwargs = {}
    if args.reward_kwargs:
        try:
            kwargs = json.loads(args.reward_kwargs)
        except ValueError as err:
            raise ConfigError(f"--reward-kwargs: not valid JSON: {err}") from None
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--reward-kwargs: expected a JSON object {{...}}, got {type(kwargs).__name__}")
        if not names and not args.reward_config:
            raise ConfigError("--reward-kwargs needs --reward NAME")
    items: list = [{"name": n, "kwargs": kwargs} for n in names]
    if args.reward_config:
        path = Path(args.reward_config)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"--reward-config {path}: not valid YAML: {str(err).splitlines()[0]}") from None
        listed = raw.get("rewards") if isinstance(raw, dict) else raw
        if not isinstance(listed, list) or not listed:
            raise ConfigError(f"--reward-config {path}: expected a list of rewards ({{name, weight, kwargs}}) or a "
                              "mapping with a rewards: list")
        for i, it in enumerate(listed):
            try:
                items.append(RewardItem.model_validate({"name": it} if isinstance(it, str) else it).model_dump())
            except ValidationError as err:
                e = err.errors()[0]
                key = ".".join(str(x) for x in e["loc"])
                where = f"rewards.{i}" + (f".{key}" if key else "")
                raise ConfigError(f"--reward-config {path}: {where}: {e['msg']}") from None
    return items


def _cmd_export(args) -> int:
    from genalign import api

    print(f"exported to {api.export(args.run_dir, args.out_dir, args.checkpoint)}")
    return 0


def _user_errors(fn):
    """Report unknown reward names / unmatched prompts (KeyError, ValueError) as one line, exit status 2."""
    import functools

    @functools.wraps(fn)
    def wrapped(args) -> int:
        from genalign.config import ConfigError

        try:
            return fn(args)
        except KeyError as err:
            raise ConfigError(str(err.args[0]) if err.args else repr(err)) from None
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return wrapped


@_user_errors
def _cmd_score(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from genalign import api
    from genalign.config import ConfigError
    from genalign.evaluation.scoring import write_scores

    specs = _reward_specs(args)
    names = [it["name"] for it in specs]
    if args.conditions:  # controllability of a ControlNet's samples (Ctrl-U / ControlNet++ evaluation)
        if len(names) != 1:
            raise ConfigError("--conditions needs exactly one --reward (a condition reward)")
        res = api.score_conditions(args.conditions, names[0], args.metric, device=args.device)
        print(f"{res['metric']}: {res['value']:.4f} over {res['n']} images ({names[0]})")
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2, default=str))
        return 0
    if args.samples and (args.images or args.audio or args.run):
        raise ConfigError("give the samples either positionally or with --images/--audio/--run, not both")
    modality = "audio" if args.audio else "image" if (args.images or args.samples) else "auto"
    if args.run:
        results = api.score_run(args.run, specs, args.which, batch_size=args.batch_size, device=args.device,
                                progress=not args.quiet)
    elif args.images or args.audio or args.samples:
        if not specs:
            raise ConfigError("give at least one --reward NAME (see `genalign list rewards`)")
        try:
            results = {"samples": api.score(args.images or args.audio or args.samples, specs,
                                            batch_size=args.batch_size, device=args.device, prompts=args.prompts,
                                            modality=modality, progress=not args.quiet, recursive=args.recursive)}
        except TypeError as err:  # a reward setting its constructor does not take
            if not any(it.get("kwargs") for it in specs):
                raise
            raise ConfigError(f"reward settings (--reward-kwargs / --reward-config): {err}") from None
    else:
        raise ConfigError("nothing to score: give --images DIR, --audio DIR or --run RUN_DIR")
    console = Console()
    for res in results.values():
        nested = res.get("skipped_subfolders", 0)
        table = Table(title=f"{res['folder']}: {len(res['per_sample'])} {res['modality']} sample(s)"
                            + (f", {res['skipped']} unreadable skipped" if res["skipped"] else "")
                            + (f", {nested} in sub-folders skipped (--recursive scores them)" if nested else ""))
        for col in ("reward", "n", "mean", "std", "min", "max"):
            table.add_column(col, justify="left" if col == "reward" else "right")
        for k, st in res["stats"].items():
            table.add_row(k + (" (set)" if k in res["set"] else ""), str(st["n"]),
                          *(f"{st[c]:.4f}" for c in ("mean", "std", "min", "max")))
        console.print(table)
    if args.out:
        if len(results) == 1:
            out = write_scores(next(iter(results.values())), args.out)
        else:  # --which both: one file, a "model" column
            merged = {"per_sample": [{"model": k, **r} for k, res in results.items() for r in res["per_sample"]],
                      "runs": results}
            out = write_scores(merged, args.out)
        console.print(f"wrote {out}")
    return 0


@_user_errors
def _cmd_relabel(args) -> int:
    from genalign.evaluation.relabel import relabel_pairs

    st = relabel_pairs(args.pairs, args.reward, args.out, batch_size=args.batch_size, split=args.split,
                       max_pairs=args.max_pairs, device=args.device, progress=not args.quiet)
    print(f"wrote {st['pairs']} pairs to {st['out']}; dropped {st['ties']} ties, {st['unreadable_images']} with "
          f"unreadable images, {st['bad_rows']} bad rows; reward agrees with the original label on "
          f"{st['agreement']:.1%} ({st['flipped']} flipped)")
    return 0


def _cmd_report(args) -> int:
    from genalign import api

    print(f"wrote {api.report(args.run_dir, args.out, samples=not args.no_samples, device=args.device)}")
    return 0


def _cmd_plan(args) -> int:
    from genalign.plan import run_cli

    return run_cli(args.config, args.overrides, args.gpus, args.gpu_memory, args.gpu, args.parallelism, args.online,
                   args.require_data, trace=not args.no_trace)


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
    if args.command == "list":  # names + descriptions from the registry's static table: no torch import
        return _cmd_list(args)
    if args.command == "report":  # reads what training kept: diffusers / transformers are not imported up front
        try:
            return _cmd_report(args)
        except OSError as err:
            print(f"genalign report: error: {err}", file=sys.stderr)
            return 2
    _quiet_libraries()
    from genalign.config import ConfigError
    from genalign.plan.models import PlanError
    from genalign.rewards.base import WeightsNotFoundError
    from genalign.rewards.composite import RewardError
    from genalign.training.trainer import NonFiniteLossError

    handlers = {"train": _cmd_train, "generate": _cmd_generate, "export": _cmd_export, "score": _cmd_score,
                "relabel": _cmd_relabel, "report": _cmd_report,
                "plan": _cmd_plan, "list": _cmd_list}
    try:
        return handlers[args.command](args)
    except (ConfigError, PlanError, WeightsNotFoundError, RewardError, NonFiniteLossError, OSError) as err:
        # OSError covers missing files, a refused export destination, a read-only or full disk: one line each.
        print(f"genalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints): one line, no traceback
        hint = " (cached pairs and the base reward are kept: --resume latest continues)" if args.command == "train" else ""
        print(f"genalign {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
