"""The accuracy/FLOPs trade-off table of ``evals/tradeoff`` on the sigmoid reference model.

Runs ``evals/tradeoff/run_tradeoff.py`` unchanged, pointed at ``evals/reference_sigmoid/model``
and ``recipes/reference_sigmoid/quickstart.yaml`` (same held-out test text, same baselines
calibrated to zeda's measured share, same metrics), with its own run and output folders, then
writes ``evals/reference_sigmoid/results.md``: the table, the exact command and its wall time.

    python evals/reference_sigmoid/run_tradeoff.py --targets 0.5 --steps 300

The committed table trained each target in its own process with its own step count
(`evals/reference_sigmoid/results.md` lists those commands).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["0.25", "0.5", "0.75"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="runs/tradeoff_sigmoid")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. lora.r=32")
    args = ap.parse_args()
    out = HERE / "tradeoff"
    if not (HERE / "model" / "config.json").is_file():
        raise SystemExit(
            "run_tradeoff: evals/reference_sigmoid/model missing; run python -m evals.zoo.train reference_sigmoid --finalize first"
        )
    cmd = [
        sys.executable,
        "evals/tradeoff/run_tradeoff.py",
        "--model",
        "evals/reference_sigmoid/model",
        "--recipe",
        "recipes/reference_sigmoid/quickstart.yaml",
        "--runs",
        args.runs,
        "--out",
        str(out.relative_to(ROOT)),
        "--targets",
        *args.targets,
        "--steps",
        str(args.steps),
        "--eval-tokens",
        str(args.eval_tokens),
        "--threads",
        str(args.threads),
        *args.overrides,
    ]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - t0
    table = (out / "results.md").read_text().rstrip()  # the table and each row's own command
    result = json.loads((out / "results.json").read_text())
    mine = "python evals/reference_sigmoid/run_tradeoff.py " + shlex.join(
        ["--targets", *args.targets, "--steps", str(args.steps), "--eval-tokens", str(args.eval_tokens)]
        + ["--threads", str(args.threads), *args.overrides]
    )
    inner = shlex.join(["python", *cmd[1:]])
    md = f"""# Trade-off on the sigmoid reference model (glm4_moe, `evals/reference_sigmoid/model`)

zeda (recipe `recipes/reference_sigmoid/quickstart.yaml` with the overrides below, one process per
run) against the training-free baselines of `evals/tradeoff/run_tradeoff.py`, calibrated on
validation text to zeda's *measured* skipped share and evaluated on {result["original"]["tokens"]:,}
held-out test tokens (`evals/reference/data/test.jsonl`, the same text as the first reference
model's table in `evals/tradeoff/results.md`). ppl ratio and KL are against the original model.

{table}

Command (wall time {wall / 60:.1f} min on a shared 2-core CPU machine, `nice -n 19`, {args.threads} thread(s)):

    {mine}

which runs:

    {inner}
"""
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
