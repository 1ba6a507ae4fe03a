"""The `dopsd-world` command (also `python -m dopsd_world`): tools of the miniature world.

    dopsd-world make-toy-base --out DIR [--world base|curved] [--work CACHE] [--evaluator FILE] [--set KEY=VALUE ...]
    dopsd-world gate --out DIR [--evaluator FILE [--pre-distillation FILE] [--prompts N] [--seeds N]]
    dopsd-world probe --evaluator FILE --steps N [--world base|curved] [--work CACHE] [--out FILE.json]
                      [--ceiling-prompts N] [--ceiling-more N,N] [--set ...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def cmd_make_toy_base(args: argparse.Namespace) -> int:
    from .toybase import run

    return run(args)


def cmd_gate(args: argparse.Namespace) -> int:
    import json

    from .gate import gate_from_build

    evaluator = None
    if args.evaluator:
        from .evaluator import load_evaluator
        evaluator = load_evaluator(args.evaluator)
    gate = gate_from_build(args.out, evaluator, args.pre_distillation, args.prompts, args.seeds)
    print(json.dumps(gate, indent=2))
    return 0 if gate["passed"] else 1


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from .toybase import add_arguments

    parser = argparse.ArgumentParser(prog="dopsd-world", description="tools of the miniature world (dopsd_world)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-toy-base", help="train the toy turbo model (VAE, pretraining, in-context training, "
                                             "4-step distillation; dopsd_world/toybase.py)")
    add_arguments(p)
    p.set_defaults(func=cmd_make_toy_base)
    g = sub.add_parser("gate", help="evaluate a curved build's gate (dopsd_world/gate.py) into its report.json; "
                                    "exit status 1 when it fails")
    g.add_argument("--out", required=True, help="the build's output directory")
    g.add_argument("--evaluator", help="recompute the scores with this world evaluator (else: the report's)")
    g.add_argument("--pre-distillation", help="the model before distillation (default: the build's "
                                              "pre_distillation.safetensors; or a --work incontext-*.safetensors)")
    g.add_argument("--prompts", type=int, help="recompute on this many prompts (default: the build's eval_prompts)")
    g.add_argument("--seeds", type=int, help="... with this many noise seeds each (default: eval_seeds)")
    g.set_defaults(func=cmd_gate)
    q = sub.add_parser("probe", help="short pretraining on a world's captions, then the accuracy of each stated "
                                     "attribute at 32 steps (dopsd_world/probe.py): check a world before a build")
    q.add_argument("--evaluator", required=True, help="world evaluator safetensors")
    q.add_argument("--steps", type=int, default=500, help="pretraining steps (default 500)")
    q.add_argument("--world", choices=("base", "curved"), default="curved")
    q.add_argument("--work", help="a build's stage cache: its VAE is reused when the settings match")
    q.add_argument("--out", help="write the result here (JSON)")
    q.add_argument("--count", type=int, default=64, help="prompts per kind (default 64)")
    q.add_argument("--sample-steps", type=int, default=32, help="Euler steps of the samples (default 32)")
    q.add_argument("--ceiling-prompts", type=int, default=32,
                   help="held-out prompts for the curvature reading, 4 vs --sample-steps steps (0: skip; default 32)")
    q.add_argument("--ceiling-seeds", type=int, default=8, help="noise seeds per prompt of that reading (default 8)")
    q.add_argument("--ceiling-more", default="", metavar="N,N",
                   help="also read the ceiling against these many-step budgets, e.g. 64,128")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a settings field")
    q.set_defaults(func=cmd_probe)
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
