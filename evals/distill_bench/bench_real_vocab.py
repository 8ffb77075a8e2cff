"""Distillation step time and peak memory at the real Qwen3 vocabulary (151,936), before and after
the chunked KD losses, side by side in one run.

Both variants run the same zeda step (`zeda.distill`, stage 1 text mode, forward KL, LoRA +
routers, the group balance loss) on the same Qwen3-30B-A3B-shaped model: real vocabulary, real
E = 128 routed experts, top-8, Z = 64 zero experts, hidden size ``--hidden``, one layer. Only the
KD loss differs:

- ``before``: the unchunked formulation of ``git show a111ffd:zeda/losses.py`` (``forward_kl``):
  masked select of both (B, T, V) logits, two full float32 log-softmaxes and an exp;
- ``after``: zeda's current `zeda.distillation.losses.distill_loss` (token chunks of 64 MiB).

Each variant runs in a fresh subprocess; its peak RSS (VmHWM, reset after the model is built and
one warm-up step has run) and the mean wall time of the timed steps are reported, with the ratios.

    python evals/distill_bench/bench_real_vocab.py --out evals/distill_bench/results_real_vocab.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VOCAB = 151_936


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _unchunked_forward_kl(student_logits, teacher_logits, mask, temperature=1.0):
    """``a111ffd:zeda/losses.py`` forward_kl (with its _select and _weighted_mean), verbatim in effect."""
    import torch.nn.functional as F

    keep = mask.reshape(-1) > 0
    weights = mask.reshape(-1)[keep].float()
    s = student_logits.reshape(-1, student_logits.shape[-1])[keep]
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep]
    log_ps = F.log_softmax(s.float() / temperature, dim=-1)
    log_pt = F.log_softmax(t.detach().float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return (kl * weights).sum() / weights.sum().clamp_min(1e-8)


def worker(variant: str, args: argparse.Namespace) -> dict:
    """One variant in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import zeda
    import zeda.distillation.loop as loop
    from zeda.config import RunConfig, apply_overrides
    from zeda.distillation.losses import distill_loss
    from zeda.distillation.student import build_student
    from zeda.tiny import tiny_tokenizer

    torch.set_num_threads(args.threads)
    cfg = json.loads((REPO / "zeda/configs/qwen3-30b-a3b.json").read_text())
    cfg.pop("_source")
    cfg.update(
        hidden_size=args.hidden, num_hidden_layers=1, max_window_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=args.hidden // 4, intermediate_size=3 * args.hidden,
        moe_intermediate_size=args.hidden // 4, max_position_embeddings=4 * args.seq,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen3MoeConfig(**cfg), dtype=torch.float32, attn_implementation="eager"
    )
    zeda.inject_zero_experts(model, num_zero_experts=64)

    tmp = Path(tempfile.mkdtemp())
    # Token ids across the whole real vocabulary, packed into blocks (the text content is irrelevant
    # to memory and time; the tokenizer only has to exist).
    g = torch.Generator().manual_seed(0)
    text = [" ".join(f"w{int(i)}" for i in torch.randint(0, 50, (600,), generator=g)) for _ in range(8)]
    (tmp / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    tok = tiny_tokenizer()
    steps = args.steps + 1
    run_cfg = apply_overrides(
        RunConfig(),
        [
            f"data.train_file={tmp / 'train.jsonl'}", f"data.eval_file={tmp / 'train.jsonl'}",
            f"data.seq_len={args.seq}", "data.chat_template=false", f"stage1.steps={steps}",
            "stage1.kd=forward_kl", f"train.batch_size={args.batch}", "train.log_every=1",
            "train.save_every=0", f"train.output_dir={tmp / 'run'}", "train.warmup_ratio=0",
        ],
    )  # fmt: skip
    if variant == "before":

        def old_distill_loss(kind, s_logits, t_logits, labels, mask, temperature):
            assert kind == "forward_kl"
            return _unchunked_forward_kl(s_logits, t_logits, mask, temperature)

        loop.distill_loss = old_distill_loss  # the benchmark's "before": the stage-1 KD term only
    else:
        assert loop.distill_loss is distill_loss
    student = build_student(model, run_cfg)

    # Step times and the peak after the warm-up step, from the trainer's own per-step logging.
    marks: list[float] = []
    import zeda.distillation.trainer as trainer

    real_log = trainer.Trainer._log

    def timed_log(self, row, bar):
        marks.append(time.perf_counter())
        if len(marks) == 1:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            marks.append(_status("VmRSS"))
        real_log(self, row, bar)

    trainer.Trainer._log = timed_log
    start_rss = _status("VmRSS")
    zeda.distill(student, run_cfg, tok)
    peak = _status("VmHWM")
    t_first, base_rss, *t_rest = marks
    times = [b - a for a, b in zip([t_first, *t_rest[:-1]], t_rest, strict=True)]
    return {
        "variant": variant,
        "peak_rss_mib": peak / 2**20,
        "peak_over_steady_mib": (peak - base_rss) / 2**20,
        "rss_before_distill_mib": start_rss / 2**20,
        "step_s": sum(times) / len(times),
        "timed_steps": len(times),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=["before", "after"], help="(internal) run one variant here")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write a markdown results file here")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(worker(args.variant, args)))
        return
    fwd = [a for a in sys.argv[1:] if not a.startswith("--out")]
    if "--out" in sys.argv:
        i = sys.argv.index("--out")
        fwd = sys.argv[1:i] + sys.argv[i + 2 :]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    res = {}
    for variant in ("before", "after"):
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, *fwd],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    b, a = res["before"], res["after"]
    full = args.batch * args.seq * VOCAB * 4 / 2**20
    lines = [
        f"shape: batch {args.batch} x seq {args.seq} x vocab {VOCAB} (one fp32 (B,T,V) copy = {full:.0f} MiB), "
        f"hidden {args.hidden}, 1 layer, E=128 + Z=64, k=8, {args.threads} thread(s)",
        "",
        "| | before (unchunked) | after (chunked) | after / before |",
        "|---|---|---|---|",
        f"| peak RSS (MiB) | {b['peak_rss_mib']:.0f} | {a['peak_rss_mib']:.0f} | {a['peak_rss_mib'] / b['peak_rss_mib']:.2f} |",
        f"| peak over steady state (MiB) | {b['peak_over_steady_mib']:.0f} | {a['peak_over_steady_mib']:.0f} | "
        f"{a['peak_over_steady_mib'] / b['peak_over_steady_mib']:.2f} |",
        f"| step time (s, mean of {a['timed_steps']}) | {b['step_s']:.2f} | {a['step_s']:.2f} | {a['step_s'] / b['step_s']:.2f} |",
    ]  # fmt: skip
    print("\n".join(lines))
    if args.out:
        cmd = "python " + " ".join([str(Path(__file__).relative_to(REPO)), *sys.argv[1:]])
        args.out.write_text(
            "# Distillation at the real Qwen3 vocabulary: before vs after the chunked KD losses\n\n"
            f"Command (repo root): `{cmd}`\n\n" + "\n".join(lines) + "\n\n"
            "Peak RSS is VmHWM of a fresh process per variant, reset after the first (warm-up) step; "
            "'peak over steady state' subtracts the RSS at that reset (model, optimiser state and "
            "data already resident). Step times were taken on a shared, heavily loaded 2-core "
            "machine (load average > 10 during the run): they are contended and only indicative; "
            "memory is not affected by contention.\n\n"
            "```json\n" + json.dumps(res, indent=1) + "\n```\n"
        )


if __name__ == "__main__":
    main()
