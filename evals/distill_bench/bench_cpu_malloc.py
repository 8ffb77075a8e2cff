"""Step time of zeda's CPU distillation with and without reusing freed host memory.

`zeda.run` trains on CPU inside `zeda.cpu_memory.reuse_freed_memory`: glibc serves every block
from its heap and keeps it, instead of mapping each large block afresh and faulting it in again
after every free. This benchmark runs steps of zeda's own stage-1 loop (what
`evals/transfer/distill.py` starts: the router kind's default, LoRA on the experts, 8 x 256 tokens
of the member's training text) with the setting on and off (``zeda.cpu_memory.ENABLED``), each
run in a fresh process, the two alternating ``--rounds`` times so that both see the same machine.

    python evals/distill_bench/bench_cpu_malloc.py [--members mixtral olmoe deepseek_v3] \\
        [--threads 2] [--reps 4] [--rounds 2] [--out evals/distill_bench/results_cpu_malloc.md]

Prints the median step time of each setting (over every timed step of its rounds), their ratio,
the page faults of each process and its peak resident set.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from evals.distill_bench.bench_loss_chunk import ROWS, _loadavg, emit, step_times  # noqa: E402

MEMBERS = ("mixtral", "olmoe", "deepseek_v3")


def _child(member: str, reuse: bool, reps: int, threads: int) -> dict:
    import torch

    from zeda import cpu_memory
    from zeda.distillation import losses

    torch.set_num_threads(threads)
    cpu_memory.ENABLED = reuse
    times = step_times(member, (losses.CPU_CHUNK_ELEMENTS).bit_length() - 1, reps)
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {"times_s": times, "minor_faults": use.ru_minflt, "peak_rss_mib": use.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", nargs="*", default=list(MEMBERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4, help="timed steps per process (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per setting, alternating")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--child", nargs=2, metavar=("MEMBER", "REUSE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        member, reuse = args.child
        print(json.dumps(_child(member, reuse == "1", args.reps, args.threads)))
        return
    load_before = _loadavg()
    lines = [
        "| member | glibc default: s / step | reused: s / step | reused / default | page faults per process "
        "(default, reused) | peak RSS MiB (default, reused) |",
        "|---|---|---|---|---|---|",
    ]
    for member in args.members:
        res: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.rounds):
            for reuse in (False, True):
                cmd = [sys.executable, __file__, "--child", member, "1" if reuse else "0"]
                cmd += ["--reps", str(args.reps), "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
                res[reuse].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {k: statistics.median_high([t for r in v for t in r["times_s"]]) for k, v in res.items()}
        faults = {k: statistics.median_high([r["minor_faults"] for r in v]) for k, v in res.items()}
        rss = {k: max(r["peak_rss_mib"] for r in v) for k, v in res.items()}
        lines.append(
            f"| `{member}` | {med[False]:.2f} | {med[True]:.2f} | {med[True] / med[False]:.2f}x | "
            f"{faults[False]:,}, {faults[True]:,} | {rss[False]:.0f}, {rss[True]:.0f} |"
        )
        print(lines[-1], flush=True)
    head = (
        f"Command (repo root): `python evals/distill_bench/bench_cpu_malloc.py --members {' '.join(args.members)} "
        f"--threads {args.threads} --reps {args.reps} --rounds {args.rounds}"
        f"{' --out ' + args.out if args.out else ''}`\n\n"
        f"{ROWS[0]} x {ROWS[1]} tokens a step, float32, {args.threads} thread(s); each setting in "
        f"{args.rounds} fresh processes, alternating, {args.reps} timed steps each after one warm-up; "
        f"medians over all timed steps. Load average (1, 5, 15 min) before: {load_before}; after: "
        f"{_loadavg()}. A speed benchmark: no setting or checkpoint is chosen from it and no test tokens "
        "are read (the members' training text).\n\n"
    )
    emit(head, lines, args.out)


if __name__ == "__main__":
    main()
