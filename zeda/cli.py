"""The ``zeda`` command line: a thin layer over the Python API.

zeda run RECIPE.yaml [key=value ...]
zeda distill RECIPE.yaml [key=value ...]
zeda inject --model DIR --out DIR [--num-zero-experts N] [--seed S] [--overwrite]
zeda eval --model DIR --tasks T1,T2 --out DIR [--limit N] [--overwrite]
zeda export --model DIR --out DIR [--overwrite]
zeda flops --model-config NAME_OR_PATH [--zero-share S] [--num-zero-experts Z] [--json]
zeda ls
zeda validate RECIPE.yaml [...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from zeda.errors import ZedaError


def _cmd_run(args: argparse.Namespace) -> int:
    from zeda.pipeline import run

    result = run(args.recipe, args.overrides, evaluate=True)
    print(json.dumps(result.to_dict(), indent=1, default=str))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from zeda.pipeline import run

    result = run(args.recipe, args.overrides, evaluate=False)
    print(json.dumps(result.to_dict(), indent=1, default=str))
    return 0


def _cmd_inject(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from zeda.io import atomic_save, load
    from zeda.zero.inject import inject_zero_experts

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ZedaError(f"output directory {out} already exists; pass --overwrite to replace it")
    model = load(args.model, dtype=args.dtype)
    report = inject_zero_experts(model, num_zero_experts=args.num_zero_experts, seed=args.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    atomic_save(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(json.dumps(report.to_dict(), indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from zeda.evaluation.evaluator import evaluate_cli

    result, out = evaluate_cli(args)
    print(result._repr_markdown_())
    print(f"\nwrote {out}/results.json, report.md, zero_share_per_layer.png, frontier.png")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from zeda.export import export_cli

    out = export_cli(args)
    print(f"exported and verified {out}")
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    from zeda.evaluation.flops import flop_report

    report = flop_report(
        args.model_config,
        zero_share=args.zero_share,
        num_zero_experts=args.num_zero_experts,
        context_len=args.context_len,
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report._repr_markdown_())
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    from zeda.evaluation.flops import builtin_config_names
    from zeda.families import all_specs

    print("families (model_type, router kind, attention):")
    for spec in all_specs():
        print(f"  {spec.model_type:<15} {spec.router_kind:<13} {spec.attention}")
    print("built-in configs (zeda flops --model-config NAME):")
    for name in builtin_config_names():
        print(f"  {name}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from zeda.config import validate_recipe

    for path in args.recipes:
        validate_recipe(path)
        print(f"ok  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``zeda`` command."""
    p = argparse.ArgumentParser(
        prog="zeda", description="Zero-output experts for trained MoE language models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    for name, fn, help_ in (
        ("run", _cmd_run, "inject, distill, evaluate and export as a recipe says"),
        ("distill", _cmd_distill, "inject, distill and export (no evaluation)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="recipe YAML")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.output_dir=runs/x")
        s.set_defaults(fn=fn)

    s = sub.add_parser("inject", help="add zero experts to a checkpoint and save it")
    s.add_argument("--model", required=True, help="original model directory or hub id")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num-zero-experts", type=int, default=None, help="Z per MoE layer (default E/2)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_inject)

    s = sub.add_parser("eval", help="evaluate a model: tasks, quality vs teacher, measured FLOPs")
    s.add_argument("--model", required=True)
    s.add_argument("--tasks", default="ref_perplexity", help="comma-separated lm-eval task names")
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--recipe", default=None, help="recipe YAML whose eval/data sections to use")
    s.add_argument("--teacher", default=None, help="separate original model (default: teacher mode)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("export", help="merge LoRA, write a standard checkpoint, reload and verify")
    s.add_argument("--model", required=True, help="a run directory (with checkpoint/) or a model directory")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("flops", help="parameters and per-token FLOPs from a config")
    s.add_argument("--model-config", required=True, help="built-in name (zeda ls), config.json or model dir")
    s.add_argument("--zero-share", type=float, default=0.0)
    s.add_argument("--num-zero-experts", type=int, default=None)
    s.add_argument("--context-len", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=_cmd_flops)

    s = sub.add_parser("ls", help="supported families and built-in configs")
    s.set_defaults(fn=_cmd_ls)

    s = sub.add_parser("validate", help="check recipes (unknown keys, types, ranges)")
    s.add_argument("recipes", nargs="+")
    s.set_defaults(fn=_cmd_validate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zeda`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.fn(args)
    except ZedaError as exc:
        print(f"zeda: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
