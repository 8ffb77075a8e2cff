"""The ``zeda`` command line: a thin layer over the Python API.

zeda run RECIPE.yaml [key=value ...] [--json]
zeda distill RECIPE.yaml [key=value ...] [--json]
zeda inject --model DIR --out DIR [--num-zero-experts N] [--seed S] [--overwrite]
zeda eval --model DIR --tasks T1,T2 --out DIR [--limit N] [--recipe R] [--teacher DIR] [--overwrite]
zeda export --model DIR --out DIR [--format zeda|zeda-reference] [--overwrite]
zeda calibrate --model DIR --target-share S --data FILE --out DIR [--heldout FILE] [--per-layer] [--overwrite]
zeda flops --model-config NAME_OR_PATH [--zero-share S] [--num-zero-experts Z] [--json]
zeda plan RECIPE.yaml [key=value ...] [--gpus N] [--gpu-memory GB] [--json]
zeda ls
zeda validate RECIPE.yaml [...]

Every verb calls the same public functions as the Python API (`zeda.run`, `zeda.evaluate`,
`zeda.export`, ...); this module only parses flags, checks output paths and prints. A bad input
exits with status 2 and one line on stderr, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zeda.errors import ZedaError


def _check_output(
    out: str | Path,
    inputs: Sequence[str | Path],
    overwrite: bool,
    size: tuple[int, int] = (2**20, 2**20),
    what: str = "the output",
) -> Path:
    """Refuse an output directory that exists (without ``--overwrite``), is or holds an input, is
    not writable, or lacks the space (or ``ulimit -f``) for what will be written there.

    Args:
        out: The output directory a command will write (and, with ``overwrite``, replace).
        inputs: Every path the command reads.
        overwrite: Whether ``--overwrite`` was passed.
        size: ``(total, largest file)`` bytes the command will write.
        what: What is written, for the message.

    Returns:
        ``out`` as a `Path`.

    Raises:
        ZedaError: One line naming the conflict.
    """
    from zeda.fs import check_space, check_writable

    out = Path(out)
    target = out.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if target == src or target in src.parents:
            raise ZedaError(f"output directory {out} is or contains the input {inp}; choose another --out")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ZedaError(f"output directory {out} already exists; pass --overwrite to replace it")
    parent = out.absolute().parent
    check_writable(parent, "choose another --out")
    check_space(parent, size[0], size[1], what)
    return out


#: What ``zeda eval`` writes at most: results.json, report.md and two figures.
_EVAL_BYTES = (2**20, 2**20)


def _print_paths(**paths: Any) -> None:
    width = max(len(k) for k in paths)
    for key, value in paths.items():
        if value is not None:
            print(f"{key:<{width}}  {value}")


def _cmd_run(args: argparse.Namespace) -> int:
    from zeda.pipeline import run

    result = run(args.recipe, args.overrides, evaluate=args.command == "run")
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        print(result.summary())
    return 0


def _cmd_inject(args: argparse.Namespace) -> int:
    from zeda.io import atomic_save, check_finite, check_source, load, load_tokenizer, weights_bytes
    from zeda.zero.inject import inject_zero_experts

    out = _check_output(
        args.out, [args.model], args.overwrite, weights_bytes(args.model), "the injected model"
    )
    check_source(args.model)
    tokenizer = load_tokenizer(args.model)
    model = load(args.model, dtype=args.dtype)
    report = inject_zero_experts(model, num_zero_experts=args.num_zero_experts, seed=args.seed)
    check_finite(model, f"{args.model} after injection")
    atomic_save(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(json.dumps(report.to_dict(), indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from zeda.config import RunConfig, load_recipe
    from zeda.evaluation.run_eval import evaluate
    from zeda.io import check_source, load, load_tokenizer

    inputs = [args.model, *([args.teacher] if args.teacher else []), *([args.recipe] if args.recipe else [])]
    out = _check_output(args.out, inputs, args.overwrite, _EVAL_BYTES, "the evaluation")
    check_source(args.model)
    if args.teacher:
        check_source(args.teacher)
    cfg = load_recipe(args.recipe) if args.recipe else RunConfig()
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    tokenizer = load_tokenizer(args.model)
    model = load(args.model)
    teacher = load(args.teacher) if args.teacher else None
    result = evaluate(
        model,
        cfg,
        tokenizer,
        teacher=teacher,
        tasks=tasks,
        limit=args.limit if args.limit is not None else cfg.eval.limit,
        model_name=str(args.model),
    )
    result.save(out, overwrite=args.overwrite)
    print(result.summary_table())
    print()
    _print_paths(report=out / "report.md", results=out / "results.json")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from zeda.io import check_source, export, load, load_tokenizer, weights_bytes

    src = Path(args.model)
    check_source(src, run_ok=True)
    is_run = (src / "recipe.yaml").is_file()
    if is_run:  # every input of the run is an input of its export: never an output
        from zeda.distillation.checkpoint import check_checkpoint, find_checkpoint
        from zeda.distillation.inputs import recorded_inputs, run_config

        ckpt = find_checkpoint(src)
        if ckpt is not None:  # a damaged one is refused before the model is loaded
            check_checkpoint(ckpt, optimizer=False)
        inputs = [src, *recorded_inputs(src)]
        size = weights_bytes(run_config(src).model.name_or_path)
    else:
        inputs, size = [src], weights_bytes(src)
    out = _check_output(args.out, inputs, args.overwrite, (size[0] + 2**20, size[1] + 2**20), "the export")
    if is_run:  # a run directory: rebuild its student
        from zeda.distillation.student import load_run

        model, tokenizer, cfg, metrics = load_run(src)
        base = cfg.model.name_or_path
    else:
        tokenizer = load_tokenizer(src)
        model = load(src)
        metrics_file = src / "zeda_metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
        base = None
    export(
        model,
        out,
        tokenizer=tokenizer,
        card_metrics=metrics,
        overwrite=args.overwrite,
        inplace=True,
        base_model=base,
        format=args.format,
    )
    _print_paths(export=out)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from zeda.pipeline import calibrate_export

    if not 0.0 < args.target_share < 1.0:  # before the model is loaded
        raise ZedaError(f"--target-share {args.target_share} must be between 0 and 1 (exclusive)")
    from zeda.io import check_source, weights_bytes

    check_source(args.model)
    inputs = [args.model, args.data, *([args.heldout] if args.heldout else [])]
    size = weights_bytes(args.model)
    out = _check_output(
        args.out, inputs, args.overwrite, (size[0] + 2**20, size[1] + 2**20), "the calibrated export"
    )
    result = calibrate_export(
        args.model,
        target_share=args.target_share,
        data=args.data,
        out_dir=out,
        heldout=args.heldout,
        overwrite=args.overwrite,
        per_layer=args.per_layer,
        seq_len=args.seq_len,
    )
    print(result.summary())
    print()
    _print_paths(export=out)
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


def _cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan's table (or JSON); exit 0 if it fits (or no GPU size given), 1 if not."""
    from zeda.planning import plan

    result = plan(
        args.recipe,
        args.gpus,
        args.gpu_memory,
        model_config=args.model_config,
        overrides=args.overrides,
        loss_chunk_tokens=args.loss_chunk_tokens,
        gradient_checkpointing=True if args.gradient_checkpointing else None,
        split_lora=False if args.merged_lora else None,
        overhead_gib=args.overhead,
    )
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.table())
    return 0 if result.fits is not False else 1


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
    """Validate each recipe and show the router-kind default it receives; one that names its GPUs
    (``hardware``) must also fit them by `zeda plan`."""
    from zeda.config import explain_recipe
    from zeda.planning import check_recipe_fits

    for path in args.recipes:
        cfg, defaults = explain_recipe(path)
        fit = check_recipe_fits(cfg, str(path))
        note = ""
        if fit is not None:
            note = f"  (plan: {fit.total / 2**30:.1f} GiB per GPU, {fit.gpu_fraction:.0%} of {fit.gpus} x {fit.gpu_memory_gib:g} GiB)"
        print(f"ok  {path}{note}")
        if defaults is not None:  # what the recipe receives from its router kind's default
            print("    default: " + defaults.describe().replace("\n", "\n    "))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``zeda`` command."""
    p = argparse.ArgumentParser(
        prog="zeda", description="Zero-output experts for trained MoE language models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    for name, help_ in (
        ("run", "inject, distill, evaluate and export as a recipe says"),
        ("distill", "inject, distill and export (no evaluation)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="recipe YAML")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.output_dir=runs/x")
        s.add_argument("--json", action="store_true", help="print the whole result as JSON")
        s.set_defaults(fn=_cmd_run)

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
    s.add_argument(
        "--teacher", default=None, help="the original model (required for an export: its LoRA is merged)"
    )
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("export", help="merge LoRA, write a standard checkpoint, reload and verify")
    s.add_argument("--model", required=True, help="a run directory (with checkpoint/) or a model directory")
    s.add_argument("--out", required=True)
    s.add_argument(
        "--format",
        default="zeda",
        choices=("zeda", "zeda-reference"),
        help="zeda (default) or zeda-reference (the ZEDA authors' *PlusPlus format)",
    )
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser(
        "calibrate", help="solve the zero-logit bias for a target skipped share and export at that budget"
    )
    s.add_argument("--model", required=True, help="an injected or exported zeda model directory")
    s.add_argument(
        "--target-share", type=float, required=True, help="share of routed slots to skip, in (0, 1)"
    )
    s.add_argument("--data", required=True, help="calibration text (JSONL with a 'text' field)")
    s.add_argument("--out", required=True, help="output directory of the calibrated export")
    s.add_argument("--heldout", default=None, help="held-out text (default: the last 20%% of --data)")
    s.add_argument("--per-layer", action="store_true", help="solve one bias per MoE layer")
    s.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block (default 256)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_calibrate)

    s = sub.add_parser("flops", help="parameters and per-token FLOPs from a config")
    s.add_argument("--model-config", required=True, help="built-in name (zeda ls), config.json or model dir")
    s.add_argument("--zero-share", type=float, default=0.0)
    s.add_argument("--num-zero-experts", type=int, default=None)
    s.add_argument("--context-len", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=_cmd_flops)

    s = sub.add_parser("plan", help="predict peak memory per GPU of a recipe and whether it fits")
    s.add_argument("recipe", help="recipe YAML")
    s.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    s.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPUs (FSDP full shard when > 1); default: the recipe's hardware.gpus, else 1",
    )
    s.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        help="memory of one GPU in GiB; default: the recipe's hardware.gpu_memory_gib",
    )
    s.add_argument("--model-config", default=None, help="built-in name, config.json or model dir")
    s.add_argument("--loss-chunk-tokens", type=int, default=None, help="tokens per KD-loss chunk")
    s.add_argument(
        "--gradient-checkpointing", action="store_true", help="as train.gradient_checkpointing=true"
    )
    s.add_argument(
        "--merged-lora", action="store_true", help="assume PEFT's merged LoRA (as lora.split=false)"
    )
    s.add_argument("--overhead", type=float, default=1.0, help="fixed runtime overhead in GiB")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=_cmd_plan)

    s = sub.add_parser("ls", help="supported families and built-in configs")
    s.set_defaults(fn=_cmd_ls)

    s = sub.add_parser(
        "validate", help="check recipes (unknown keys, types, ranges; fit on the GPUs they name)"
    )
    s.add_argument("recipes", nargs="+")
    s.set_defaults(fn=_cmd_validate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zeda`` console script.

    Returns:
        0 on success, 2 on a bad input (one ``zeda: error:`` line on stderr).
    """
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
