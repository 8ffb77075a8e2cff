"""Split LoRA vs PEFT's merged LoRA on fused experts at Qwen3-30B-A3B expert shapes (CPU).

Each variant runs in its own fresh process (so peak memory is its own), alternately, in one
invocation: a 2-layer Qwen3-MoE with the real expert shapes (128 experts, hidden 2048, expert
width 768, top-8, 64 zero experts injected; attention of the real model; vocabulary 256, so the
experts dominate), bf16, zeda's experts backend, LoRA r8 on both fused expert weights and the
routers trained in full, in training mode. One step = the student forward on ``tokens`` tokens,
a loss on its logits and the router logits, backward; the first step warms up, the next
``--steps`` are timed.

- ``split``: ``lora.split=true`` (zeda's default): each selected expert computes
  ``x·W[e]ᵀ + s·(x·A[e]ᵀ)·B[e]ᵀ``, nothing of size ``(E, out, in)`` is formed;
- ``merged``: ``lora.split=false``: PEFT's ``target_parameters`` forward, ``W + s·B·A`` per
  layer, kept for backward.

Reported per variant: peak resident set above the resident set after the model was built
(VmHWM, reset before the first step), and tokens per CPU-second (``time.process_time`` of one
thread, so the figure is the same on a loaded machine), median over the timed steps and the
repeats. Gradients of the two variants are compared in the same run (max relative difference).

    python evals/distill_bench/split_lora.py --tokens 1024 --steps 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def worker(variant: str, tokens: int, steps: int, grads_out: str | None) -> dict:
    """One variant in this process: peak memory and CPU time of ``steps`` training steps."""
    import torch

    import zeda
    from zeda.config import RunConfig, apply_overrides
    from zeda.distillation.balance import RouterCapture
    from zeda.distillation.student import build_student
    from zeda.tiny import tiny_model

    torch.set_num_threads(1)
    model = tiny_model(
        "qwen3_moe",
        num_experts=128,
        num_experts_per_tok=8,
        hidden_size=2048,
        moe_intermediate_size=768,
        intermediate_size=6144,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=256,
        max_position_embeddings=max(4096, tokens),
        norm_topk_prob=True,
    ).to(torch.bfloat16)
    zeda.inject_zero_experts(model, experts_implementation="zeda")  # Z = 64
    cfg = apply_overrides(RunConfig(), ["lora.r=8", "lora.alpha=16", f"lora.split={variant == 'split'}"])
    student = build_student(model, cfg).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter (LoRA B starts at 0)
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    ids = torch.randint(0, 256, (1, tokens), generator=g)
    base = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    times = []
    for i in range(steps + 1):
        student.zero_grad(set_to_none=True)
        t0 = time.process_time()
        with RouterCapture(student) as cap:
            logits = student(input_ids=ids).logits
        loss = logits.float().logsumexp(-1).mean()
        loss = loss + sum(r.logits.float().logsumexp(-1).mean() for r in cap.records)
        loss.backward()
        if i:
            times.append(time.process_time() - t0)
    peak = (_kib("VmHWM") - base) / 2**20
    if grads_out:
        torch.save(
            {n: p.grad.float() for n, p in student.named_parameters() if p.grad is not None}, grads_out
        )
    return {
        "variant": variant,
        "tokens": tokens,
        "peak_gib": peak,
        "cpu_s_per_step": statistics.median(times),
        "tokens_per_cpu_s": tokens / statistics.median(times),
        "loss": float(loss),
    }


def _run(variant: str, tokens: int, steps: int, grads: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--tokens", str(tokens), "--steps", str(steps)]
    if grads is not None:
        cmd += ["--grads-out", str(grads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per variant, alternating")
    p.add_argument("--out", default=str(HERE / "results_split_lora"), help="writes OUT.json and OUT.md")
    p.add_argument("--worker", choices=["split", "merged"], help=argparse.SUPPRESS)
    p.add_argument("--grads-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.steps, args.grads_out)))
        return 0

    import tempfile

    import torch

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for variant in ("split", "merged"):
                grads = Path(tmp) / f"{variant}.pt" if r == 0 else None
                row = _run(variant, args.tokens, args.steps, grads)
                rows.append({**row, "repeat": r})
                print(json.dumps(row), flush=True)
        a, b = torch.load(Path(tmp) / "split.pt"), torch.load(Path(tmp) / "merged.pt")
        rel = max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)) for n in b)
    summary = {}
    for variant in ("split", "merged"):
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {
            "peak_gib": statistics.median(r["peak_gib"] for r in mine),
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in mine),
        }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    result = {
        "command": "python evals/distill_bench/split_lora.py " + " ".join(sys.argv[1:]),
        "commit": commit.stdout.strip(),
        "torch": torch.__version__,
        "rows": rows,
        "summary": summary,
        "max_rel_grad_difference": rel,
    }
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    s, m = summary["split"], summary["merged"]
    lines = [
        "# Split LoRA vs PEFT's merged LoRA at Qwen3-30B-A3B expert shapes (CPU, training step)",
        "",
        f"Command: `{result['command']}` (zeda at {result['commit']}, torch {result['torch']}).",
        "2 MoE layers, 128 experts (+64 zero), hidden 2048, expert width 768, top-8, bf16, LoRA r8 on",
        f"both fused expert weights + routers; {args.tokens} tokens per step; forward + backward; each",
        f"variant in its own fresh process(es) ({args.repeats} each, alternating); {args.steps} timed step(s)",
        "each after a warm-up; 1 thread, tokens per CPU-second (process time, robust to a loaded machine).",
        "",
        "| variant | peak GiB above the built model | tokens / CPU-s |",
        "|---|---|---|",
        f"| split (lora.split=true) | {s['peak_gib']:.2f} | {s['tokens_per_cpu_s']:.1f} |",
        f"| merged (PEFT, lora.split=false) | {m['peak_gib']:.2f} | {m['tokens_per_cpu_s']:.1f} |",
        "",
        f"Split / merged: peak memory {s['peak_gib'] / m['peak_gib']:.2f}x, tokens per CPU-second "
        f"{s['tokens_per_cpu_s'] / m['tokens_per_cpu_s']:.2f}x. Largest relative difference of any "
        f"trained tensor's gradient between the two (first repeat): {rel:.1e} (bf16).",
    ]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = s["peak_gib"] < m["peak_gib"] and s["tokens_per_cpu_s"] >= m["tokens_per_cpu_s"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
