"""The ``zeda plan`` command: argparse wiring and handler (cli.py adds it with `add_plan_command`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from zeda.planning.memory import plan

__all__ = ["add_plan_command", "plan_cli"]


def add_plan_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``zeda plan RECIPE [--gpus N] [--gpu-memory GB]`` to an argparse subparsers object."""
    s = subparsers.add_parser("plan", help="predict peak memory per GPU of a recipe and whether it fits")
    s.add_argument("recipe", help="recipe YAML")
    s.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    s.add_argument("--gpus", type=int, default=1, help="GPUs (FSDP full shard when > 1)")
    s.add_argument("--gpu-memory", type=float, default=None, help="memory of one GPU in GiB (e.g. 80)")
    s.add_argument("--model-config", default=None, help="built-in name, config.json or model dir")
    s.add_argument("--loss-chunk-tokens", type=int, default=None, help="tokens per KD-loss chunk")
    s.add_argument("--gradient-checkpointing", action="store_true", help="assume layer recomputation")
    s.add_argument("--overhead", type=float, default=1.0, help="fixed runtime overhead in GiB")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=plan_cli)
    return s


def plan_cli(args: argparse.Namespace) -> int:
    """Handler of ``zeda plan``: print the table (or JSON); exit 0 if it fits (or no size given), 1 if not."""
    result = plan(
        args.recipe,
        args.gpus,
        args.gpu_memory,
        model_config=args.model_config,
        overrides=args.overrides,
        loss_chunk_tokens=args.loss_chunk_tokens,
        gradient_checkpointing=True if args.gradient_checkpointing else None,
        overhead_gib=args.overhead,
    )
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.table())
    return 0 if result.fits is not False else 1
