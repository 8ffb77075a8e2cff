"""Measure the peak memory of real zeda training steps on CPU, one point per fresh process.

Each point builds a real-shape model scaled down in depth (true hidden size, expert width and
vocabulary; 1-2 decoder layers), runs `zeda.distill` for two optimisation steps (injection, PEFT
LoRA on the experts, routers in full, teacher forward in `teacher_mode`, forward-KL loss at the
full vocabulary, balance loss, backward, AdamW step, checkpoint) and records the high-water mark
of its resident set from just after the model is built (the larger of the kernel's VmHWM, reset
through ``/proc/self/clear_refs``, and a 2 ms polling thread: one early run read a VmHWM 0.9 GiB
below a rerun of the same point, see README.md). The process's resident set after all
imports (torch, transformers, PEFT, zeda, the tokenizer) is the baseline that is subtracted:
the predictor models tensors, not the interpreter.

The second step is the steady state: AdamW's moments already exist when its backward runs.
oneDNN's primitive cache is disabled (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``): on CPU it keeps
buffers for every distinct per-expert GEMM shape, which a GPU does not (see README.md). glibc's
mmap and trim thresholds are fixed (``ZEDA_MEASURE_MALLOC=default`` keeps glibc's dynamic ones):
freed tensors then leave the resident set, which follows the live tensors that the plan models.
The losses run at a GPU's chunk size (`zeda.distillation.losses.CHUNK_ELEMENTS`), as planned.

LoRA is split (zeda's default, no merged expert copy) unless ``--merged`` (PEFT's merged
forward, ``lora.split=false``, the loop before split LoRA); ``--gradient-checkpointing``
recomputes each decoder layer in backward.

Usage (one point; `run_validation.py` runs every point, each in its own process)::

    python evals/plan/measure.py --model-config qwen3-30b-a3b --layers 2 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak resident set) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


class _Sampler:
    """Polls the resident set every 2 ms in a thread (torch kernels release the GIL): a second
    reading of the peak next to the kernel's VmHWM."""

    def __init__(self) -> None:
        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib("VmRSS"))
            time.sleep(0.002)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _fixed_malloc_thresholds() -> None:
    """glibc: every block of 64 KiB or more is its own mapping, unmapped when freed.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed,
    after which tensors below it come from the heap, where a freed block stays resident until
    everything above it in the heap is freed too. The resident set then counts dead tensors, by
    an amount that depends on the order of frees (which layer's activations, which loss chunk),
    not on what is alive, which is what `zeda plan` models (and what a GPU's caching allocator
    reuses). Fixed thresholds make the resident set follow the live tensors.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "zeda"], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-config", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument(
        "--experts", type=int, default=None, help="routed experts per layer (default: the config's)"
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--full-experts", action="store_true")
    p.add_argument("--merged", action="store_true", help="PEFT's merged LoRA forward (lora.split=false)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing=true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args(argv)

    # oneDNN (CPU bf16 GEMMs) caches a primitive with its buffers for every distinct GEMM shape;
    # per-expert row counts change with the routing at every step, so on CPU that cache grows by
    # hundreds of MiB over a few steps (0.26 GiB after 6 steps of one 32-expert layer). A GPU has
    # no such cache and `zeda plan` does not model it: it is disabled here, before torch loads.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    if os.environ.get("ZEDA_MEASURE_MALLOC", "fixed") == "fixed":
        _fixed_malloc_thresholds()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zeda
    from zeda.config import RunConfig
    from zeda.evaluation.flops import load_config
    from zeda.planning import scaled_config

    torch.set_num_threads(args.threads)
    # zeda's losses take smaller chunks on CPU (glibc's mmap threshold, see
    # `zeda.distillation.losses.CPU_CHUNK_ELEMENTS`); the plan models a GPU's chunks, and so
    # does this measurement.
    from zeda.distillation import losses

    losses.CPU_CHUNK_ELEMENTS = losses.CHUNK_ELEMENTS
    config = scaled_config(load_config(args.model_config), args.layers, args.experts)
    if config.vocab_size >= 151_669:
        tok = AutoTokenizer.from_pretrained(REPO / "tests/assets/qwen3_tokenizer")
    else:
        from zeda.tiny import tiny_tokenizer

        tok = tiny_tokenizer(256)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    baseline_kib = _status_kib("VmRSS")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    build_s = time.perf_counter() - t0
    print(f"built in {build_s:.1f}s", file=sys.stderr, flush=True)
    model_kib = _status_kib("VmRSS")

    with tempfile.TemporaryDirectory() as tmp:
        # Enough text for 2 steps of batch x seq_len tokens, without tokenising the whole corpus.
        need_chars = 12 * args.batch_size * args.seq_len * 2 + 20000
        texts, n = [], 0
        for line in (REPO / "evals/reference/data/train_sample.jsonl").open():
            texts.append(line)
            n += len(line)
            if n > need_chars:
                break
        train = Path(tmp) / "train.jsonl"
        train.write_text("".join(texts))
        cfg = RunConfig()
        overrides = [
            f"model.dtype={args.dtype}",
            f"data.train_file={train}",
            f"data.seq_len={args.seq_len}",
            f"train.batch_size={args.batch_size}",
            "train.grad_accum=1",
            "train.save_every=0",
            "train.log_every=1",
            "train.eval_every=0",  # the training step alone: no validation forwards or rule calibration
            "train.verdict=false",
            f"train.output_dir={Path(tmp) / 'run'}",
            "stage1.mode=text",
            "stage1.kd=forward_kl",
            "stage1.steps=2",
            "stage2.enabled=false",
            f"lora.r={args.lora_r}",
            f"lora.alpha={2 * args.lora_r}",
        ]
        if args.full_experts:
            overrides += ["lora.enabled=false", "lora.full_experts=true"]
        overrides += [
            f"lora.split={str(not args.merged).lower()}",
            f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        ]
        cfg = zeda.config.apply_overrides(cfg, overrides)
        _reset_peak()
        t0 = time.perf_counter()
        with _Sampler() as sampler:
            _, result = zeda.distill(model, cfg, tok)
        step_s = time.perf_counter() - t0
        hwm_kib = _status_kib("VmHWM")
        peak_kib = max(hwm_kib, sampler.peak_kib)

    row = {
        "model_config": args.model_config,
        "layers": args.layers,
        "experts": zeda.get_spec(config.model_type).num_experts(config),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "lora_r": args.lora_r,
        "full_experts": args.full_experts,
        "split_lora": not args.merged and not args.full_experts,
        "gradient_checkpointing": args.gradient_checkpointing,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "baseline_rss_gib": baseline_kib / 2**20,
        "model_rss_gib": (model_kib - baseline_kib) / 2**20,
        "measured_peak_gib": (peak_kib - baseline_kib) / 2**20,
        "hwm_peak_gib": (hwm_kib - baseline_kib) / 2**20,
        "sampled_peak_gib": (sampler.peak_kib - baseline_kib) / 2**20,
        "build_s": round(build_s, 1),
        "distill_s": round(step_s, 1),
        "final_loss": result.last.get("loss"),
        "torch": torch.__version__,
        "commit": _commit(),
        "onednn_primitive_cache_capacity": os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"],
        "malloc": os.environ.get("ZEDA_MEASURE_MALLOC", "fixed"),
        "loss_chunk_elements": losses.CPU_CHUNK_ELEMENTS,
    }
    text = json.dumps(row)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return row


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
