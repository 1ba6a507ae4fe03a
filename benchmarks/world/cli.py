"""The `dopsd-world` command (also `python -m dopsd_world`): tools of the miniature world.

    dopsd-world make-toy-base --out DIR [--work CACHE] [--evaluator FILE] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def cmd_make_toy_base(args: argparse.Namespace) -> int:
    from .toybase import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from .toybase import add_arguments

    parser = argparse.ArgumentParser(prog="dopsd-world", description="tools of the miniature world (dopsd_world)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-toy-base", help="train the toy turbo model (VAE, pretraining, in-context training, "
                                             "4-step distillation; dopsd_world/toybase.py)")
    add_arguments(p)
    p.set_defaults(func=cmd_make_toy_base)
    return parser


def main(argv: list[str] | None = None) -> int:
    # nothing is fetched from a hub: the toy's parts are built locally
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
