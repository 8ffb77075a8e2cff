"""Step time and peak memory: zeda distillation step vs plain LoRA SFT vs a two-copy teacher+student.

Each setting runs in its own subprocess (so peak RSS is its own), on the same model and batch:

- ``zeda``: teacher logits from the *same* weights in `zeda.teacher_mode` (no grad), student
  forward/backward with LoRA on experts + routers in full, forward-KL + group balance loss;
- ``lora_sft``: the same student, forward/backward with token NLL only (no teacher pass);
- ``two_copy``: a separate frozen copy of the original model as teacher (the usual KD set-up)
  plus the same student and loss as ``zeda``.

    python evals/distill_bench/bench_step.py [--model evals/reference/model] [--steps 6] [--batch 8 --seq 256]

Prints a table with ratios to ``lora_sft`` and writes ``evals/distill_bench/results.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(mode: str, model_dir: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import copy

    import torch

    import zeda
    from zeda.config import RunConfig
    from zeda.distillation.balance import BalanceTracker, RouterCapture
    from zeda.distillation.losses import forward_kl, token_nll
    from zeda.distillation.student import build_student

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base_rss = _rss_mb()
    model = zeda.load(model_dir)
    teacher = None
    if mode == "two_copy":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    cfg = RunConfig()
    student = build_student(model, cfg)
    student.train()
    tracker = BalanceTracker(cfg.balance.alpha, 2.0, global_batch=False)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    vocab = student.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, -1] = 0
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if mode == "zeda":
            with torch.no_grad(), zeda.teacher_mode(student):
                t_logits = student(input_ids=ids).logits
        elif mode == "two_copy":
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
        tracker.start_step()
        with RouterCapture(student) as cap:
            s_logits = student(input_ids=ids).logits
        bal = tracker.loss(cap.records, None)
        if mode == "lora_sft":
            loss = token_nll(s_logits, labels, mask)
        else:
            loss = forward_kl(s_logits, t_logits, mask) + bal
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    steady = sorted(times[1:])  # the first step pays one-off allocations
    return {
        "mode": mode,
        "step_seconds_median": steady[len(steady) // 2],
        "peak_rss_mb": _rss_mb(),
        "rss_before_load_mb": base_rss,
        "tokens_per_step": batch * seq,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "evals/reference/model"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results.json"))
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_one(args.mode, args.model, args.steps, args.batch, args.seq, args.threads)))
        return
    rows = []
    for mode in ("lora_sft", "zeda", "two_copy"):
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = rows[0]
    lines = [
        "| setting | step time (s) | vs LoRA SFT | peak RSS (MB) | vs LoRA SFT |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['step_seconds_median']:.3f} | {r['step_seconds_median'] / ref['step_seconds_median']:.2f}x "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x |"
        )
    cmd = "python evals/distill_bench/bench_step.py " + " ".join(
        f"--{k} {v}"
        for k, v in (
            ("steps", args.steps),
            ("batch", args.batch),
            ("seq", args.seq),
            ("threads", args.threads),
        )
    )
    Path(args.out).write_text(json.dumps({"rows": rows, "model": args.model, "command": cmd}, indent=1))
    print("\n".join(lines))
    print(f"\nCommand: {cmd}")


if __name__ == "__main__":
    main()
