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
import signal
import sys
import threading
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


class InvocationClock:
    """Appends one invocation's CPU time (all threads) and wall time to a run's times file.

    Every invocation of a resumed run adds its own line, so the run's total is the sum. The line is
    written when the block ends, also by an error, Ctrl-C or SIGTERM (turned into ``SystemExit``
    while the clock runs). A SIGKILL cannot be caught, so a heartbeat file beside the times file
    holds the time spent so far; the next invocation appends it, marked ``"killed": true``.

    Args:
        path: the times file (JSON lines of ``cpu_seconds``, ``wall_seconds``, ``finished``).
        every: seconds between heartbeats.
    """

    def __init__(self, path: Path, every: float = 30.0) -> None:
        self.path, self.every = Path(path), every
        self.pending = self.path.with_name(self.path.name + ".running")
        self._stop = threading.Event()

    def _line(self, finished: bool) -> dict:
        cpu, wall = time.process_time() - self._c0, time.perf_counter() - self._t0
        return {"cpu_seconds": round(cpu), "wall_seconds": round(wall), "finished": finished}

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            tmp = self.pending.with_name(self.pending.name + ".tmp")
            tmp.write_text(json.dumps({**self._line(False), "killed": True}))
            os.replace(tmp, self.pending)

    def __enter__(self) -> InvocationClock:
        if self.pending.is_file():  # an earlier invocation was killed before it could write its line
            with self.path.open("a") as f:
                f.write(self.pending.read_text().strip() + "\n")
            self.pending.unlink()
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        self._old_term = None
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _exit_on_signal)
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        with self.path.open("a") as f:
            f.write(json.dumps(self._line(exc_type is None)) + "\n")
        self.pending.unlink(missing_ok=True)
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


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
    times = recipe.with_name(f"{tag}.times.jsonl")
    with InvocationClock(times):
        result = run(cfg, evaluate=False)
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
