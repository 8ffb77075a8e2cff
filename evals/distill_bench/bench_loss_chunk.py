"""Distillation loss and step time on CPU by loss-chunk size (float32 elements per chunk).

zeda's losses (`zeda.distillation.losses`) work through the logits a chunk of rows at a time.
On CPU, glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with a fresh
``mmap``, which the kernel page-faults and zeroes on first touch, on every allocation. A chunk of
``2**24`` float32 elements (64 MiB) is above it, so each of a chunk's temporaries is faulted in
again; ``2**22`` (16 MiB) stays below it and reuses heap memory.

Two measurements, each setting in its own subprocess (a fresh allocator) and run side by side:

- ``loss``: forward KL, forward and backward, on random ``(8, 256, V)`` float32 logits at each
  zoo vocabulary;
- ``step``: a step of zeda's own stage-1 loop on zoo members (the router kind's default, LoRA
  on the experts): teacher pass, student forward, forward KL + balance loss, backward, update.

    python evals/distill_bench/bench_loss_chunk.py [--threads 2] [--reps 5] \\
        [--out evals/distill_bench/results_loss_chunk.md]

Prints a table of median times with ratios to the ``2**24`` budget.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

BUDGETS = (24, 22, 21)
VOCABS = (4096, 16384, 151936)
MEMBERS = ("mixtral", "olmoe", "deepseek_v3")
ROWS = (8, 256)


def _loadavg() -> str:
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.is_file() else "?"


def emit(head: str, lines: list[str], out: str | None) -> None:
    """Print the results file (a header paragraph, then the table) and write it to ``out`` if given."""
    text = head + "\n".join(lines) + "\n"
    print()
    print(text)
    if out:
        Path(out).write_text(text)


def loss_times(vocab: int, log2_elements: int, reps: int) -> list[float]:
    """Seconds per forward + backward of forward KL on ``(8, 256, vocab)`` logits."""
    import torch

    from zeda.distillation.losses import forward_kl

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(*ROWS, vocab, generator=g) * 3).requires_grad_()
    t = torch.randn(*ROWS, vocab, generator=g) * 3
    mask = torch.ones(ROWS, dtype=torch.bool)
    mask[:, -1] = False
    rows = max(1, (1 << log2_elements) // vocab)
    times = []
    for _ in range(reps + 1):
        s.grad = None
        t0 = time.perf_counter()
        forward_kl(s, t, mask, chunk_rows=rows).backward()
        times.append(time.perf_counter() - t0)
    return times[1:]  # the first pays one-off allocations


def step_times(member: str, log2_elements: int, reps: int) -> list[float]:
    """Seconds per step of zeda's own stage-1 loop on a zoo member (its default, LoRA variant).

    The run is what `evals/transfer/distill.py` starts (the recipe a user writes, 8 x 256 tokens
    of the member's training text), shortened to ``reps + 1`` steps, without validation; the step
    times are the loop's own ``tokens_per_s`` (logged every step).
    """
    import tempfile

    from evals.transfer.distill import VARIANTS, minimal_recipe
    from evals.zoo.members import get_member
    from zeda.config import load_recipe
    from zeda.distillation import losses
    from zeda.pipeline import run

    losses.CPU_CHUNK_ELEMENTS = 1 << log2_elements  # the default this process runs at
    m = get_member(member)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(
            minimal_recipe(m.model_dir, m.train_path, m.data_dir / "validation.jsonl", 0.5, out)
        )
        overrides = [*VARIANTS["lora"], f"stage1.steps={reps + 1}", "train.log_every=1"]
        overrides += ["train.eval_every=0", "train.verdict=false", f"train.save_every={reps + 1}"]
        run(load_recipe(recipe, overrides), evaluate=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = ROWS[0] * ROWS[1]
    times = [tokens / r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return times[1:]  # the first pays one-off allocations


def _child(kind: str, what: str, log2_elements: int, reps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if kind == "loss":
        times = loss_times(int(what), log2_elements, reps)
    else:
        times = step_times(what, log2_elements, reps)
    return {
        "median_s": statistics.median_high(times),
        "times_s": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--vocabs", type=int, nargs="*", default=list(VOCABS), help="loss cases (vocabularies)")
    ap.add_argument("--members", nargs="*", default=list(MEMBERS), help="step cases (zoo members)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "WHAT", "LOG2"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, what, log2 = args.child
        print(json.dumps(_child(kind, what, int(log2), args.reps, args.threads)))
        return
    load_before = _loadavg()
    cases = [("loss", str(v)) for v in args.vocabs] + [("step", m) for m in args.members]
    lines = [
        f"| what | {' | '.join(f'2**{b} elements ({4 << b >> 20} MiB): s' for b in BUDGETS)} | "
        f"{' | '.join(f'2**{b} / 2**{BUDGETS[0]}' for b in BUDGETS[1:])} | peak RSS MiB ({', '.join(f'2**{b}' for b in BUDGETS)}) |",
        "|---|" + "---|" * (2 * len(BUDGETS) - 1) + "---|",
    ]
    for kind, what in cases:
        res = {}
        for b in BUDGETS:
            cmd = [sys.executable, __file__, "--child", kind, what, str(b)]
            cmd += ["--reps", str(args.reps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            res[b] = json.loads(out.stdout.strip().splitlines()[-1])
        med = {b: res[b]["median_s"] for b in BUDGETS}
        rss = {b: res[b]["peak_rss_mib"] for b in BUDGETS}
        label = f"forward KL fwd+bwd, V = {int(what):,}" if kind == "loss" else f"step, {what}"
        cells = [f"{med[b]:.3f}" for b in BUDGETS] + [f"{med[b] / med[BUDGETS[0]]:.2f}x" for b in BUDGETS[1:]]
        lines.append(f"| {label} | {' | '.join(cells)} | {', '.join(f'{rss[b]:.0f}' for b in BUDGETS)} |")
        print(lines[-1], flush=True)
    load_after = _loadavg()
    head = (
        f"Command (repo root): `python evals/distill_bench/bench_loss_chunk.py --threads {args.threads} "
        f"--reps {args.reps} --vocabs {' '.join(map(str, args.vocabs))} --members {' '.join(args.members)}{' --out ' + args.out if args.out else ''}`\n\n{ROWS[0]} x {ROWS[1]} tokens, float32, {args.threads} thread(s), median of "
        f"{args.reps} timed repetitions after one warm-up, each budget in a fresh process. Load average "
        f"(1, 5, 15 min) before: {load_before}; after: {load_after}. A speed "
        "benchmark: no setting or checkpoint is chosen from it and no test tokens are read (random logits, the "
        "members' training text).\n\n"
    )
    emit(head, lines, args.out)


if __name__ == "__main__":
    main()
