"""Validate `zeda plan` against measured peak RSS of real zeda training steps on CPU.

Every point runs `evals/plan/measure.py` in a fresh process (true hidden size, expert width and
vocabulary; 1-2 layers; fewer experts where noted, to stay within a few GiB), then predicts the
same run with `zeda.planning.plan` (overhead 0: a CPU has no CUDA context) and writes
``evals/plan/results.json`` and ``evals/plan/results.md``. Measured points are cached under
``evals/plan/points/``; ``--force`` re-measures.

    python evals/plan/run_validation.py            # the committed table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: The points at the real Qwen3-30B-A3B shapes (2 layers), tabulated before/after.
REAL = "qwen3_L2_E128_T512_"

#: (name, measure.py arguments). ``--merged``: PEFT's merged LoRA forward, the loop before split LoRA.
POINTS: list[tuple[str, list[str]]] = [
    ("qwen3_L1_E32_T128", ["--layers", "1", "--experts", "32", "--seq-len", "128", "--merged"]),
    ("qwen3_L2_E32_T128", ["--layers", "2", "--experts", "32", "--seq-len", "128", "--merged"]),
    ("qwen3_L1_E8_T512", ["--layers", "1", "--experts", "8", "--seq-len", "512", "--merged"]),
    ("qwen3_L1_E32_T512", ["--layers", "1", "--experts", "32", "--seq-len", "512", "--merged"]),
    ("qwen3_L2_E64_T512", ["--layers", "2", "--experts", "64", "--seq-len", "512", "--merged"]),
    ("qwen3_L1_E32_T256_full", ["--layers", "1", "--experts", "32", "--seq-len", "256", "--full-experts"]),
    ("qwen3_L1_E128_T256", ["--layers", "1", "--seq-len", "256", "--merged"]),
    (
        "glm47flash_L1_E16_T256",
        [
            "--model-config",
            "glm-4.7-flash",
            "--layers",
            "1",
            "--experts",
            "16",
            "--seq-len",
            "256",
            "--merged",
        ],
    ),
    # Split LoRA (the default) and activation checkpointing.
    ("qwen3_L1_E32_T512_split", ["--layers", "1", "--experts", "32", "--seq-len", "512"]),
    ("qwen3_L2_E64_T512_split", ["--layers", "2", "--experts", "64", "--seq-len", "512"]),
    ("qwen3_L1_E32_T2048_split", ["--layers", "1", "--experts", "32", "--seq-len", "2048"]),
    (
        "qwen3_L2_E32_T2048_ckpt",
        ["--layers", "2", "--experts", "32", "--seq-len", "2048", "--gradient-checkpointing"],
    ),
    (
        "qwen3_L2_E32_T2048_ckpt_merged",
        ["--layers", "2", "--experts", "32", "--seq-len", "2048", "--gradient-checkpointing", "--merged"],
    ),
    (
        "glm47flash_L1_E16_T1024_split",
        ["--model-config", "glm-4.7-flash", "--layers", "1", "--experts", "16", "--seq-len", "1024"],
    ),
    # Real Qwen3-30B-A3B shapes (128 experts, vocabulary 151,936), 2 layers, 512 tokens: the loop
    # before split LoRA and checkpointing, split LoRA alone, and both.
    ("qwen3_L2_E128_T512_merged", ["--layers", "2", "--seq-len", "512", "--merged"]),
    ("qwen3_L2_E128_T512_split", ["--layers", "2", "--seq-len", "512"]),
    ("qwen3_L2_E128_T512_ckpt", ["--layers", "2", "--seq-len", "512", "--gradient-checkpointing"]),
]


def predict(row: dict) -> object:
    """`zeda.planning.plan` for the run that `measure.py` made for ``row``."""
    from zeda.config import RunConfig, apply_overrides
    from zeda.evaluation.flops import load_config
    from zeda.planning import plan, scaled_config

    config = scaled_config(load_config(row["model_config"]), row["layers"], row["experts"])
    cfg = RunConfig()
    overrides = [
        f"model.dtype={row['dtype']}",
        f"data.seq_len={row['seq_len']}",
        f"train.batch_size={row['batch_size']}",
        "train.grad_accum=1",
        "stage1.mode=text",
        "stage1.kd=forward_kl",
        "stage2.enabled=false",
        f"lora.r={row['lora_r']}",
    ]
    if row["full_experts"]:
        overrides += ["lora.enabled=false", "lora.full_experts=true"]
    overrides += [
        f"lora.split={str(row['split_lora']).lower()}",
        f"train.gradient_checkpointing={str(row['gradient_checkpointing']).lower()}",
    ]
    return plan(apply_overrides(cfg, overrides), 1, None, model_config=config, overhead_gib=0.0)


def _kind(row: dict) -> str:
    if row["full_experts"]:
        return "full experts"
    return f"LoRA r{row['lora_r']} {'split' if row['split_lora'] else 'merged'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="re-measure cached points")
    p.add_argument(
        "--only", nargs="*", default=None, help="measure only these points (all cached ones are tabulated)"
    )
    p.add_argument("--cached", action="store_true", help="only the points already measured")
    args = p.parse_args()
    points_dir = HERE / "points"
    points_dir.mkdir(exist_ok=True)
    rows = []
    for name, extra in POINTS:
        out = points_dir / f"{name}.json"
        chosen = not args.only or name in args.only
        if (args.cached or not chosen) and not out.exists():
            continue  # tabulate what is measured; measure only the chosen points
        if chosen and not args.cached and (args.force or not out.exists()):
            cmd = [sys.executable, str(HERE / "measure.py"), *extra, "--out", str(out)]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        row = json.loads(out.read_text())
        pred = predict(row)
        row.update(
            name=name,
            predicted_peak_gib=pred.total / 2**30,
            predicted_phase=pred.phase,
            predicted_components_gib={k: v / 2**30 for k, v in pred.components.items()},
        )
        row["error"] = row["predicted_peak_gib"] / row["measured_peak_gib"] - 1
        rows.append(row)
        print(
            f"{name}: measured {row['measured_peak_gib']:.3f} GiB, predicted {row['predicted_peak_gib']:.3f} "
            f"({row['error']:+.1%}, {pred.phase})",
            flush=True,
        )
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    head = [
        "# `zeda plan` validation: predicted vs measured peak memory of real zeda training steps (CPU)",
        "",
        "Command: `python evals/plan/run_validation.py` (each point: `python evals/plan/measure.py ...` in a",
        "fresh process, arguments in `POINTS` of run_validation.py; cached under `evals/plan/points/`;",
        "`--cached` tabulates the measured points only).",
        f"Tabulated at commit {commit.stdout.strip() or '(not a git checkout)'}; points measured at "
        f"{', '.join(sorted({r.get('commit', '?') for r in rows}))}; torch {rows[0]['torch'] if rows else '?'}; bf16;",
        "batch 1; LoRA r8 on the experts (merged: PEFT's forward, `lora.split=false`, the only path before",
        "split LoRA; split: zeda's default) unless `full experts`; ckpt: `train.gradient_checkpointing=true`;",
        "2 optimiser steps of `zeda.distill` (stage 1 text mode, forward KL), measured peak RSS minus the",
        "RSS after imports, with oneDNN's primitive cache off and glibc's mmap/trim thresholds fixed (so",
        "that the resident set follows the live tensors; README.md). Each point's JSON records the commit",
        "it was measured at.",
        "Shapes: true hidden size, expert width and vocabulary of the named model, 1-2 layers, E as listed.",
        "",
    ]
    lines = [
        "| point | layers | experts | tokens | LoRA / full | ckpt | measured GiB | predicted GiB | error | predicted peak phase |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['layers']} | {r['experts']} | {r['batch_size'] * r['seq_len']} | "
            f"{_kind(r)} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
            f"{r['measured_peak_gib']:.3f} | {r['predicted_peak_gib']:.3f} | {r['error']:+.1%} | {r['predicted_phase']} |"
        )
    worst = max(abs(r["error"]) for r in rows) if rows else float("nan")
    lines.append("")
    lines.append(f"Largest error: {worst:.1%} (limit 10%).")
    real = {r["name"]: r for r in rows if r["name"].startswith(REAL)}
    if real:
        lines += [
            "",
            "## Real Qwen3-30B-A3B shapes: the loop before and after (2 layers, 128 experts, 512 tokens)",
            "",
            "Hidden 2048, 128 experts (+64 zero) of width 768, top-8, vocabulary 151,936 (the vendored",
            "Qwen3 tokenizer), random bf16 weights; whole `zeda.distill` steps (teacher pass, forward KL,",
            "balance loss, backward, AdamW). Before = PEFT's merged LoRA without checkpointing (the loop",
            "until split LoRA and `train.gradient_checkpointing`); after = both. Wall time is of 2 steps on",
            "a shared, loaded 2-core machine (indicative only).",
            "",
            "| loop | measured peak GiB | planned GiB | error | merged expert weights + their gradient buffers (plan) | wall s |",
            "|---|---|---|---|---|---|",
        ]
        labels = {
            "merged": "before: merged LoRA, no checkpointing",
            "split": "split LoRA",
            "ckpt": "after: split LoRA + checkpointing",
        }
        for key, label in labels.items():
            r = real.get(f"{REAL}{key}")
            if r is None:
                continue
            comp = r["predicted_components_gib"]
            merged = comp.get("merged LoRA expert weights", 0) + comp.get("expert weight-gradient buffers", 0)
            lines.append(
                f"| {label} | {r['measured_peak_gib']:.2f} | {r['predicted_peak_gib']:.2f} | {r['error']:+.1%} | "
                f"{merged:.2f} | {r['distill_s']:.0f} |"
            )
        lines += [
            "",
            f"Commands: `python evals/plan/run_validation.py --only {REAL}merged {REAL}split {REAL}ckpt`;",
            "each point is `python evals/plan/measure.py --layers 2 --seq-len 512 [--merged |",
            "--gradient-checkpointing]`.",
        ]
    (HERE / "results.md").write_text("\n".join(head + lines) + "\n")
    print("\n".join(lines))
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
