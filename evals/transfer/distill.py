"""Distill one model at one target share as a user would: the minimal recipe, the router-kind default.

The run is ``zeda distill`` of a recipe that names only the model, the data and the target share
(``recipes/minimal.yaml``'s keys), so every other setting is the default of the model's router
kind (``zeda/defaults``), plus the variant and any ``key=value`` overrides given here. It trains
with validation on (best checkpoint at the target share, the verdict against every
training-free rule on validation text) and exports the chosen checkpoint. Test text is never
read here: score a finished run once with ``python -m evals.transfer.score RUN``.

    python -m evals.transfer.distill --model evals/reference/model --data evals/reference/data --share 0.5
    python -m evals.transfer.distill --member mixtral --share 0.5 --variant full_experts --threads 1
    python -m evals.transfer.distill --member mixtral --share 0.75 stage1.steps=800 balance.alpha=0.05
    python -m evals.transfer.distill --member reference --share 0.5 --variant lora --tag lr1e-3 stage1.lr=1e-3

``--data DIR`` holds ``validation.jsonl`` and a train file (``train.jsonl``, else
``train_sample.jsonl``); ``--member NAME`` takes the model and data of a zoo member
(``evals/zoo/members.py``). The run directory (default ``runs/transfer/<name>/share_<s>[_<variant>][_<tag>]``;
``--tag`` keeps candidate settings of one share and variant apart, e.g. for ``evals/transfer/select.py``)
is resumable: rerunning the same command continues from its checkpoint, and a finished run is
left as it is. It writes ``transfer.json`` there: the command, the CPU time of all threads (summed
over the invocations of a resumed run), why training stopped, the best checkpoint and the
validation verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = {
    "lora": ["lora.enabled=true", "lora.full_experts=false"],
    "full_experts": ["lora.enabled=false", "lora.full_experts=true"],
}


def _train_file(data: Path) -> Path:
    for name in ("train.jsonl", "train_sample.jsonl"):
        if (data / name).is_file():
            return data / name
    raise SystemExit(f"{data} has no train.jsonl or train_sample.jsonl")


def resolve_inputs(args: argparse.Namespace) -> tuple[str, Path, Path, Path, str]:
    """``(name, model dir, train file, validation file, test file)`` from ``--member`` or ``--model/--data``."""
    if args.member:
        try:
            from evals.zoo.members import get_member
        except ImportError as exc:  # the zoo is another agent's package
            raise SystemExit(
                f"--member needs evals/zoo/members.py ({exc}); pass --model and --data"
            ) from None
        m = get_member(args.member)
        return (
            m.name,
            m.model_dir,
            m.train_path,
            m.data_dir / "validation.jsonl",
            str(m.data_dir / "test.jsonl"),
        )
    if not (args.model and args.data):
        raise SystemExit("pass --member NAME, or --model DIR and --data DIR")
    data = Path(args.data)
    name = args.name or Path(args.model).resolve().name
    if name == "model":  # e.g. evals/reference/model: the folder above names it
        name = Path(args.model).resolve().parent.name
    return name, Path(args.model), _train_file(data), data / "validation.jsonl", str(data / "test.jsonl")


def minimal_recipe(model: Path, train: Path, validation: Path, share: float, out: Path) -> str:
    """The recipe a user writes: model, data and target share (and where the run goes)."""
    return (
        "# written by evals/transfer/distill.py: only what a user names; the rest is the router kind's default\n"
        f"model: {{name_or_path: {json.dumps(str(model))}}}\n"
        f"data: {{train_file: {json.dumps(str(train))}, eval_file: {json.dumps(str(validation))}}}\n"
        f"balance: {{target_zero_share: {share}}}\n"
        f"train: {{output_dir: {json.dumps(str(out))}}}\n"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--member", help="a zoo member (evals/zoo/members.py)")
    ap.add_argument("--model", help="model directory (instead of --member)")
    ap.add_argument("--data", help="folder with validation.jsonl and train.jsonl (instead of --member)")
    ap.add_argument("--name", help="run name (default: the member or model folder)")
    ap.add_argument("--share", type=float, required=True, help="balance.target_zero_share, in (0, 1)")
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="default: the router kind's default variant")
    ap.add_argument("--runs", default=str(ROOT / "runs/transfer"), help="parent of the run directories")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--tag", help="suffix of the run folder, naming a candidate's overrides (e.g. lr1e-3)")
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. stage1.steps=800")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if args.tag is not None and not args.tag.replace("-", "").replace(".", "").replace("_", "").isalnum():
        ap.error(f"--tag {args.tag!r}: use letters, digits, '.', '-' and '_' only (it names a folder)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning workers stall an oversubscribed CPU
    import torch

    torch.set_num_threads(args.threads)
    from zeda.config import resolve_recipe
    from zeda.pipeline import run

    name, model, train, validation, test = resolve_inputs(args)
    tag = (
        f"share_{args.share:g}"
        + (f"_{args.variant}" if args.variant else "")
        + (f"_{args.tag}" if args.tag else "")
    )
    out = Path(args.runs) / name / tag
    recipe = Path(args.runs) / name / f"{tag}.recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(minimal_recipe(model, train, validation, args.share, out))
    overrides = [*(VARIANTS[args.variant] if args.variant else []), *args.overrides]
    record_path = out / "transfer.json"
    if record_path.is_file() and json.loads(record_path.read_text()).get("finished"):
        print(f"{out} is finished; its verdict is in {record_path} (remove the folder to train again)")
        return json.loads(record_path.read_text())
    resume = (out / "checkpoint" / "state.json").is_file() or (
        out / ".checkpoint.old" / "state.json"
    ).is_file()
    cfg, defaults = resolve_recipe(recipe, [*overrides, f"train.resume={str(resume).lower()}"])
    if defaults is not None:
        print("default: " + defaults.describe().replace("\n", "\n  "))
    # Every invocation appends its own time (also when stopped by an error or Ctrl-C), so a
    # resumed run's total is the sum.
    times = recipe.with_name(f"{tag}.times.jsonl")
    t0, c0 = time.perf_counter(), time.process_time()
    done = False
    try:
        result = run(cfg, evaluate=False)
        done = True
    finally:
        with times.open("a") as f:
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            f.write(
                json.dumps({"cpu_seconds": round(cpu), "wall_seconds": round(wall), "finished": done}) + "\n"
            )
    spent = [json.loads(line) for line in times.read_text().splitlines() if line.strip()]
    d = result.distill
    record = {
        "finished": True,
        "name": name,
        "model": str(model),
        "share": args.share,
        "variant": args.variant or (defaults.variant if defaults else None),
        "tag": args.tag,
        "overrides": overrides,
        "command": "python -m evals.transfer.distill "
        + shlex.join([a for a in (argv if argv is not None else sys.argv[1:])]),
        "test_file": test,
        # All threads, every invocation of this run (the "CPU-minutes" budget of issue 25, goal 3).
        "cpu_seconds": sum(t["cpu_seconds"] for t in spent),
        "wall_seconds": sum(t["wall_seconds"] for t in spent),
        "invocations": len(spent),
        "steps": {"stage1": d.stage1_steps, "stage2": d.stage2_steps},
        "stop_reason": d.stop_reason,
        "best": d.best,
        "verdict": d.verdict,
        "export": result.export_dir,
    }
    record_path.write_text(json.dumps(record, indent=1))
    print(d.summary())
    return record


if __name__ == "__main__":
    main()
