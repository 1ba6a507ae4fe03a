"""The `dopsd` command: train, sample, export, make-shards, make-tiny-model.

Every subcommand imports its modules when it runs, so that `dopsd --help` (and a mistyped command) imports no
torch. The miniature world's toy-base builder is not here: it is `dopsd-world make-toy-base` (dopsd_world)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _offline() -> None:
    # Nothing is ever fetched from a hub at run time: models and tokenizers come from local directories.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import Trainer

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"output.dir={args.output_dir}")
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if args.check:
        from .check import check_run, report

        found, problems = check_run(cfg, ranks=args.ranks or _launch_world_size())
        print(report(found, problems))
        return 2 if problems else 0
    from .preemption import INTERRUPTED_EXIT_CODE, Interrupted, Preempted, preempted_exit

    try:
        summary = Trainer(cfg).fit()
    except Preempted as e:
        if e.signal_name == "SIGINT":  # Ctrl-C: a checkpoint, and no requeue
            print(f"dopsd: interrupted by Ctrl-C after step {e.step}; checkpoint {e.checkpoint}; continue with "
                  f"--resume latest (exit {INTERRUPTED_EXIT_CODE})", file=sys.stderr)
            return INTERRUPTED_EXIT_CODE
        code = preempted_exit(e.step)
        print(f"dopsd: {e}; exit {code} (requeue and resume with --resume latest)", file=sys.stderr)
        return code
    except Interrupted as e:
        print(f"dopsd: {e} (exit {INTERRUPTED_EXIT_CODE})", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    print(f"final weights: {summary['final']}")
    if summary.get("samples"):
        print(f"samples: {summary['samples']}")
    return 0


def _launch_world_size() -> int:
    """The world size a launcher announces (torchrun / deepspeed: WORLD_SIZE; srun: SLURM_NTASKS), else 1."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def cmd_sample(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .models import load_backend
    from .sampling import generate, save_grid
    from .dist import DistInfo, device_for

    device = device_for(DistInfo(), args.device)
    backend = load_backend(ModelConfig(backend=args.backend, path=args.model), device=str(device))
    transformer = backend.transformer
    if args.lora:
        backend.load_lora(transformer, args.lora)
    height, width = args.resolution
    references = None
    if args.reference:
        from .data.references import reference_tensors

        try:
            references = reference_tensors(args.reference)
        except (OSError, ValueError) as e:  # unreadable, or refused as the pipeline refuses it
            print(f"dopsd: error: --reference: {e}", file=sys.stderr)
            return 2
    images = generate(backend, transformer.eval(), args.prompt, args.seed, height, width, args.steps,
                      references=references)
    out = save_grid([images], rows=len(args.prompt), path=Path(args.out))
    print(f"wrote {out} ({len(args.prompt)} prompts x {len(args.seed)} seeds, {args.steps} steps)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_files

    try:
        paths = export_files(args.checkpoint, args.out_dir, args.format)
    except ValueError as e:  # a format the checkpoint cannot take, a LoRA outside ComfyUI's key map
        print(f"dopsd: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_make_shards(args: argparse.Namespace) -> int:
    from .data.shards import make_shards

    cfg = None
    if args.config:
        from .config import load_config

        cfg = load_config(args.config, list(args.set or []))
    try:
        s = make_shards(args.input, args.output, samples_per_shard=args.samples_per_shard,
                        shard_size_mb=args.shard_size_mb, features=args.features, cfg=cfg, device=args.device,
                        progress=not args.no_progress, overwrite=args.overwrite)
    except ValueError as e:
        print(f"dopsd: error: {e}", file=sys.stderr)
        return 2
    print(f"make-shards: {s['shards']} shards, {s['samples']} samples in {s['output']} "
          f"(this run: {s['samples_written']} samples in {s['shards_written']} shards; skipped "
          f"{s['shards_skipped']} finished shards with {s['samples_in_skipped_shards']} samples); "
          f"bad inputs skipped: {s['skipped'] or 'none'}; features: {s['features']}")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .models import make_tiny_model

    make_tiny_model(args.backend, args.out_dir, seed=args.seed)
    print(f"wrote tiny {args.backend} checkpoint to {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import BACKENDS  # a name list: no torch
    parser = argparse.ArgumentParser(prog="dopsd", description="D-OPSD trainer for step-distilled DiTs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set train.lr=1e-4")
    p.add_argument("--output-dir", help="shortcut for --set output.dir=...")
    p.add_argument("--resume", help="'latest' or a checkpoint directory (shortcut for --set checkpoint.resume=...)")
    p.add_argument("--check", action="store_true",
                   help="check the config, every path, the data (counts, sizes, bad files) and the checkpoint to "
                        "resume, without loading a model weight; exit 0 when all is well, 2 otherwise")
    p.add_argument("--ranks", type=int, help="with --check: the number of ranks the run will have (default: the "
                                             "launcher's WORLD_SIZE / SLURM_NTASKS, else 1)")
    # the deepspeed launcher appends --local_rank=N; the rank is read from the environment instead
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="diffusers- or ComfyUI-loadable weights from a checkpoint (offline, one process)")
    p.add_argument("checkpoint", help="a complete checkpoint directory, e.g. runs/x/checkpoints/step_00002000")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=("diffusers", "comfyui", "both"), default="diffusers",
                   help="LoRA runs: diffusers (pytorch_lora_weights.safetensors, the default), comfyui "
                        "(comfyui_lora.safetensors: ComfyUI key names with alpha tensors, for LoraLoaderModelOnly) "
                        "or both")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="few-step samples from a base model and an optional LoRA")
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--backend", default="zimage", choices=BACKENDS)
    p.add_argument("--lora", help="diffusers-format LoRA (.safetensors or its folder)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--reference", action="append", metavar="IMAGE",
                   help="editing (flux2_klein): an input image given with every prompt; repeat for several, in "
                        "order (the pipeline's image=[...])")
    p.add_argument("--seed", type=int, action="append", help="repeat for several seeds (default 0)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (NFE)")
    p.add_argument("--resolution", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("make-shards", help="write WebDataset shards (optionally with cached encoder features) "
                                           "from an image folder, a JSONL manifest or existing shards")
    p.add_argument("input", help="image folder, manifest.jsonl, or shards (brace pattern, directory, pipe: URL)")
    p.add_argument("output", help="output directory (shard-NNNNNN.tar + index files); rerun to resume")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--shard-size-mb", type=float, default=1024.0, help="a shard also closes at this size")
    p.add_argument("--features", choices=("none", "student", "all"), default="none",
                   help="cache student text features (student) or student + teacher features (all)")
    p.add_argument("--config", help="run config: model, caption placeholder and buckets for --features")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override in --config")
    p.add_argument("--device", default="auto", help="device for the encoders (auto: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_make_shards)

    p = sub.add_parser("make-tiny-model", help="write a tiny random-init checkpoint (offline, from a seed)")
    p.add_argument("out_dir")
    p.add_argument("--backend", default="zimage", choices=BACKENDS)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)
    return parser


# Commands that left the library: a user who types one is told where it went, and nothing is imported.
MOVED = {"make-toy-base": "dopsd-world make-toy-base (the miniature world's own command, package dopsd_world)"}


def main(argv: list[str] | None = None) -> int:
    _offline()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MOVED:
        print(f"dopsd: error: {argv[0]} moved out of dopsd: run {MOVED[argv[0]]}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if getattr(args, "seed", None) is None and args.command == "sample":
        args.seed = [0]
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.errors import DataError
    from .dist import RendezvousTimeout

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, DataError, CheckpointError) as e:
        print(f"dopsd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, sampling, writing shards)
        print("dopsd: interrupted", file=sys.stderr)
        return 130
    except RendezvousTimeout as e:
        print(f"dopsd: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
