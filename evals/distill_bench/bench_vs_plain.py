"""zeda's stage-1 step vs a minimal plain loop, side by side in one process (issue 15, goal 3).

Both train the same student on the same batches with the same loss:

- ``zeda``: the path users run. The student is built by `zeda.build_student`, prepared by
  accelerate, and trained by zeda's `Trainer.run` on the real stage-1 text stage
  (`zeda.distillation.loop._stage1`: packed text, forward KL, group balance loss, cosine
  schedule, gradient clipping, the non-finite guard, a checkpoint at the end of each run).
- ``plain``: `plain_loop.plain_step` (plain PyTorch + PEFT): a separate frozen copy of the
  original model as teacher, ``F.kl_div(..., log_target=True)`` forward KL plus the same balance
  loss, backward, AdamW.

The model is built in-process from a config unless ``--model`` names a checkpoint (default:
Qwen3-MoE, vocab 32,000, hidden 256, 5 layers, 32 experts top-4, expert FFN 128, tied
embeddings: 24.9M parameters; zero experts as the recipe defaults inject). Batch 8 x 128, LoRA
r32 / alpha 64 on the expert FFNs, routers trained in full, ``--threads`` intra-op threads.
Token ids come from the reference corpus and tokenizer (ids < 8,192; the logits are 32k wide).

Each repeat runs zeda then plain (A, B, A, B, ...), each for ``--warmup`` + ``--steps`` steps
from the same initial trainable weights; warm-up steps are excluded. A zeda step is timed
between consecutive batch requests of `Trainer.run` (so everything it does per step counts).
Then one profiled repeat per loop times the parts with the same boundaries: teacher forward,
student forward, loss (balance + KD), backward, optimiser (zeda: non-finite checks, clipping,
AdamW, scheduler). Writes ``results_vs_plain.{json,md}`` next to this file.

    python evals/distill_bench/bench_vs_plain.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

PARTS = ("teacher forward", "student forward", "loss", "backward", "optimiser")


def _model_factory(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    if args.model:
        return lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = Qwen3MoeConfig(
        vocab_size=32_000, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=1024,
        tie_word_embeddings=True,
    )  # fmt: skip

    def make():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    return make


class Timer:
    """``timer(name)`` adds the wall (process CPU) time of its block to ``totals[name]`` (``cpu``)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0
            self.cpu[name] += time.process_time() - c0


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, snap) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in snap:
                p.copy_(snap[n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the in-process config)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repeat and loop")
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "results_vs_plain"))
    args = ap.parse_args()

    import logging

    import plain_loop
    import torch
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    from zeda.config import RunConfig, apply_overrides
    from zeda.distillation.loop import _stage1
    from zeda.distillation.run_dir import RunDir
    from zeda.distillation.student import build_student
    from zeda.distillation.trainer import Trainer
    from zeda.io import load_tokenizer
    from zeda.zero.routing import zero_routers

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    logging.getLogger("zeda").setLevel(logging.WARNING)
    uptime_before = Path("/proc/loadavg").read_text().split()[:3]

    tmp = Path(tempfile.mkdtemp(prefix="zeda_bench_"))
    overrides = [
        "lora.r=32", "lora.alpha=64", "train.batch_size=8", "data.seq_len=128", "stage1.lr=2e-3",
        "train.save_every=0", "train.log_every=1000", f"train.output_dir={tmp / 'run'}",
        f"data.train_file={REPO / 'evals/reference/data/train_sample.jsonl'}",
    ]  # fmt: skip
    cfg = apply_overrides(RunConfig(), overrides)
    make = _model_factory(args)
    tokenizer = load_tokenizer(str(REPO / "evals/reference/model"))

    # zeda: student and trainer exactly as zeda.distill builds them.
    z_student = build_student(make(), cfg)
    accelerator = Accelerator()
    run = RunDir(tmp / "run", tmp / "run")
    run.start(True)
    trainer = Trainer(z_student, accelerator.prepare(z_student), cfg, accelerator, run, tokenizer)
    stage = _stage1(trainer)
    z_init = _snapshot(z_student)

    # plain: a frozen original teacher and the same student, built the same way.
    teacher = make().eval().requires_grad_(False)
    p_student = build_student(make(), cfg)
    p_student.train()
    tap = plain_loop.RouterTap(p_student)
    p_init = _snapshot(p_student)
    router = next(r for r in zero_routers(p_student) if r.num_zero_experts > 0)
    e, z = router.num_experts, router.num_zero_experts
    alpha, w = cfg.balance.alpha, cfg.balance.resolve_w(e, z)
    n_params = sum(p.numel() for p in teacher.parameters())
    n_train = sum(p.numel() for p in p_student.parameters() if p.requires_grad)
    per_run = args.warmup + args.steps
    tokens = cfg.train.batch_size * cfg.data.seq_len

    def zeda_repeat() -> list[tuple[float, float]]:
        _restore(z_student, z_init)
        stamps: list[tuple[float, float]] = []

        def batch(step: int, micro: int):
            stamps.append((time.perf_counter(), time.process_time()))
            return stage.batch(step, micro)

        # One extra step: a step's time is the gap to the next batch request.
        trainer.run(dataclasses.replace(stage, steps=per_run + 1, batch=batch), None)
        gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:], strict=False)]
        return gaps[args.warmup :]

    def plain_repeat() -> list[tuple[float, float]]:
        _restore(p_student, p_init)
        opt = plain_loop.make_optimizer(p_student, cfg.stage1.lr)
        times = []
        for i in range(per_run):
            b = stage.batch(i, 0)
            t0, c0 = time.perf_counter(), time.process_time()
            plain_loop.plain_step(teacher, p_student, tap, opt, b.input_ids, b.loss_mask, alpha, w)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        return times[args.warmup :]

    def med(pairs: list[tuple[float, float]], i: int) -> float:
        return statistics.median(p[i] for p in pairs)

    ratios, cpu_ratios, z_all, p_all = [], [], [], []
    for rep in range(args.repeats):
        zt, pt = zeda_repeat(), plain_repeat()
        z_all += zt
        p_all += pt
        ratios.append(med(pt, 0) / med(zt, 0))
        cpu_ratios.append(med(pt, 1) / med(zt, 1))
        print(
            f"repeat {rep}: zeda {tokens / med(zt, 0):.0f} tok/s, plain {tokens / med(pt, 0):.0f} tok/s, "
            f"ratio {ratios[-1]:.3f} (CPU-time ratio {cpu_ratios[-1]:.3f})",
            flush=True,
        )

    # Profiled steps, zeda and plain alternating step by step: the same loop bodies with timed
    # parts (zeda: `Trainer.run`'s body; plain: `plain_step`).
    def untimed(name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    _restore(z_student, z_init)
    _restore(p_student, p_init)
    optimizer, scheduler, _ = trainer._optimizer(stage, None)
    p_opt = plain_loop.make_optimizer(p_student, cfg.stage1.lr)
    trainer.model.train()
    z_rows, p_rows = [], []
    for i in range(args.warmup + args.profile_steps):
        b = stage.batch(i, 0)
        zt, pt = Timer(), Timer()
        timer = zt if i >= args.warmup else untimed
        trainer.section_timer = timer
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.tracker.start_step()
        with accelerator.accumulate(trainer.model):
            loss, _parts = trainer.step(stage, b)
            loss_ok = bool(torch.isfinite(loss.detach()))
            with timer("backward"):
                accelerator.backward(loss)
        with timer("optimiser"):
            trainer._apply_update(stage, i, optimizer, scheduler, loss_ok)
        zt.totals["step (profiled)"] = time.perf_counter() - t0
        zt.cpu["step (profiled)"] = time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        kw = {"timer": pt} if i >= args.warmup else {}
        plain_loop.plain_step(teacher, p_student, tap, p_opt, b.input_ids, b.loss_mask, alpha, w, **kw)
        pt.totals["step (profiled)"] = time.perf_counter() - t0
        pt.cpu["step (profiled)"] = time.process_time() - c0
        if i >= args.warmup:
            z_rows.append(zt)
            p_rows.append(pt)
    trainer.section_timer = Trainer.section_timer
    uptime_after = Path("/proc/loadavg").read_text().split()[:3]

    n = args.profile_steps
    names = (*PARTS, "step (profiled)")
    # Each loop's fastest profiled step (other load only slows a step), so its parts add up.
    z_best = min(z_rows, key=lambda r: r.totals["step (profiled)"])
    p_best = min(p_rows, key=lambda r: r.totals["step (profiled)"])
    profile = {"zeda": {k: z_best.totals[k] for k in names}, "plain": {k: p_best.totals[k] for k in names}}
    profile_cpu = {"zeda": {k: z_best.cpu[k] for k in names}, "plain": {k: p_best.cpu[k] for k in names}}
    z_tps, p_tps = tokens / med(z_all, 0), tokens / med(p_all, 0)
    cmd = "python evals/distill_bench/bench_vs_plain.py" + "".join(
        f" --{k.replace('_', '-')} {os.path.relpath(v, REPO) if k == 'out' else v}"
        for k, v in vars(args).items()
        if v is not None and v != ap.get_default(k)
    )
    result = {
        "command": cmd,
        "model": args.model or "in-process Qwen3-MoE config (see docstring)",
        "parameters": n_params,
        "trainable_parameters": n_train,
        "experts": {"real": e, "zero": z},
        "batch": [cfg.train.batch_size, cfg.data.seq_len],
        "threads": args.threads,
        "zeda_tokens_per_s": z_tps,
        "plain_tokens_per_s": p_tps,
        "ratio_of_medians": z_tps / p_tps,
        "ratio_per_repeat": ratios,
        "median_ratio": statistics.median(ratios),
        "fastest_step_ratio": min(t for t, _ in p_all) / min(t for t, _ in z_all),
        "cpu_time_ratio_per_repeat": cpu_ratios,
        "median_cpu_time_ratio": statistics.median(cpu_ratios),
        "step_seconds_wall_cpu": {"zeda": z_all, "plain": p_all},
        "profile_seconds_per_step": profile,
        "profile_cpu_seconds_per_step": profile_cpu,
        "loadavg_before": uptime_before,
        "loadavg_after": uptime_after,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# zeda stage-1 step vs a minimal plain loop (issue 15, goal 3)",
        "",
        f"Command (repo root): `{cmd}`",
        "",
        f"Model: {result['model']}, {n_params / 1e6:.1f}M parameters, E={e} real + Z={z} zero experts; "
        f"{n_train / 1e6:.2f}M trainable (LoRA r32 on the expert FFNs + routers); batch "
        f"{cfg.train.batch_size}x{cfg.data.seq_len}; {args.threads} threads; torch {torch.__version__}; "
        f"load average before/after: {' '.join(uptime_before)} / {' '.join(uptime_after)} "
        f"({os.cpu_count()} CPUs).",
        "",
        "| | tokens/s (median step) | steps timed |",
        "|---|---|---|",
        f"| zeda (`Trainer.run`, stage 1) | {z_tps:.0f} | {len(z_all)} |",
        f"| plain loop (`plain_loop.py`) | {p_tps:.0f} | {len(p_all)} |",
        "",
        f"**zeda / plain: median of per-repeat ratios {result['median_ratio']:.3f}** "
        f"(per repeat: {', '.join(f'{r:.3f}' for r in ratios)}; ratio of overall medians "
        f"{result['ratio_of_medians']:.3f}; ratio of the fastest steps, which other load can only slow, "
        f"{result['fastest_step_ratio']:.3f}). The same ratio from process CPU time per step "
        f"(plain / zeda): {result['median_cpu_time_ratio']:.3f} (less sensitive to other load at 1 thread).",
        "",
        f"Per-part profile (seconds; each loop's fastest of {n} profiled steps after {args.warmup} "
        "warm-up, zeda and plain alternating step by step; CPU = process CPU time, ~2x wall when both "
        "threads are busy):",
        "",
        "| part | zeda wall | plain wall | zeda CPU | plain CPU |",
        "|---|---|---|---|---|",
    ]
    for k in names:
        lines.append(
            f"| {k} | {profile['zeda'][k]:.3f} | {profile['plain'][k]:.3f} "
            f"| {profile_cpu['zeda'][k]:.3f} | {profile_cpu['plain'][k]:.3f} |"
        )
    lines += [
        "",
        "zeda's loss forms the KD gradient in its forward (chunked), so its backward starts at the "
        "logits; the plain loop's F.kl_div/log_softmax gradients are computed inside its backward. "
        "zeda's optimiser part includes the non-finite checks, gradient clipping (train.max_grad_norm=1) "
        "and the scheduler step.",
    ]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
