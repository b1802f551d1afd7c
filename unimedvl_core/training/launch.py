"""Entry point of a training run, single process or under torchrun:

    unimedvl train --config configs/train/phantom.yaml --stage all
    torchrun --nproc_per_node=8 -m unimedvl_core.training.launch --config configs/train/unimed5m.yaml --stage 2

Each stage writes ``<run_dir>/stage<N>/`` (checkpoints, final weights in the released layout, metrics).
Stages resume from their newest checkpoint; a finished stage is skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch.distributed as dist

from .config import RecipeError, load_recipe
from .distributed import init_distributed

__all__ = ["main", "build_parser", "run_stage"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="unimedvl train", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training recipe (YAML)")
    parser.add_argument("--stage", default="all", help="stage number, or 'all' for every stage in order")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set stages.1.steps=100 (repeatable)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_stage(cfg, number: int, info, progress: bool = True):
    from .trainer import train_curriculum_stage
    from .vae_stage import train_vae_stage

    stage = cfg.stage(number)
    runner = train_vae_stage if stage.kind == "vae" else train_curriculum_stage
    return runner(cfg, stage, info, progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = init_distributed(args.device)
    try:
        cfg = load_recipe(args.config, args.set)
        numbers = sorted(cfg.stages) if args.stage == "all" else [int(args.stage)]
        for number in numbers:
            final = run_stage(cfg, number, info, not args.no_progress)
            if info.main:
                print(f"stage {number}: {final}")
    except (RecipeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
