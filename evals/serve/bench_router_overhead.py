"""Per-layer routing cost of the zeda_vllm plugin against vLLM's own CPU router (microbenchmark).

Run with the vLLM environment's python (it imports vLLM's CPU router)::

    .venv-vllm/bin/python evals/serve/bench_router_overhead.py --out evals/serve/router_overhead

Qwen3-30B-A3B routing shapes (E = 128 real experts, Z = 64 zero experts, top-8), T tokens per
forward (decode batch 1/8/64 and a 512-token prefill), bf16 router logits as vLLM's gate returns
them, one torch thread. For each T the variants are timed interleaved, ``--rounds`` rounds of
``--iters`` calls each, keeping each variant's fastest round (the machine is shared):

- ``stock``: vLLM's CPU router (``cpu_router._softmax_topk``) on the E real logits: what the
  original model pays.
- ``forced0 (before)``: the plugin at a forced 0% share before this change: zeda's math in
  teacher mode (``zeda_routing.route(..., zero_experts_enabled=False, forced_share=0)``) plus
  ``compact_slots``. Now a forced 0% leaves the block stock (the first row's cost), so it is
  listed only to show what was removed.
- ``forced50``: the plugin's forced path now: the stock router, then ``zeda_routing.drop_slots``
  and ``compact_slots``.
- ``natural``: the plugin's natural routing over E + Z (``zeda_routing.route``) plus
  ``compact_slots`` (what a distilled export pays per MoE layer).

It measures routing only (no gate GEMM, no experts): the overhead the plugin can add per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk

from zeda_routing import DROPPED, RouterParams, drop_slots, route
from zeda_vllm.routing import compact_slots

E, Z, K = 128, 64, 8
TOKENS = (1, 8, 64, 512)


def _variants(logits: torch.Tensor) -> dict[str, Callable[[], object]]:
    real = logits[:, :E].contiguous()  # the stock gate's output: E columns
    params = RouterParams(num_experts=E, top_k=K)

    def stock() -> object:
        return _softmax_topk(real, K, True)

    def forced0_before() -> object:
        w, i = route(logits, "softmax", params, zero_experts_enabled=False, forced_share=0.0)
        return compact_slots(w, i)

    def forced50() -> object:
        w, i = _softmax_topk(real, K, True)
        w, i = drop_slots(w.float(), i, E, dropped_id=DROPPED, zero_routing=False, forced_share=0.5)
        return compact_slots(w, i)

    def natural() -> object:
        return compact_slots(*route(logits, "softmax", params))

    return {"stock": stock, "forced0 (before)": forced0_before, "forced50": forced50, "natural": natural}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="evals/serve/router_overhead", help="writes OUT.json and OUT.md")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in TOKENS:
        logits = (torch.randn(t, E + Z, generator=g) * 2).to(torch.bfloat16)
        variants = _variants(logits)
        best = dict.fromkeys(variants, float("inf"))
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / args.iters)
        for name, sec in best.items():
            rows.append(
                {"tokens": t, "variant": name, "us_per_call": sec * 1e6, "vs_stock": sec / best["stock"]}
            )
    meta = {
        "command": "python evals/serve/bench_router_overhead.py --out " + args.out,
        "torch": torch.__version__,
        "threads": 1,
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "iters": args.iters,
        "shape": {"E": E, "Z": Z, "k": K, "logits_dtype": "bfloat16"},
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Routing cost per MoE layer: zeda_vllm plugin vs vLLM's CPU router",
        "",
        f"Command: `.venv-vllm/bin/python evals/serve/bench_router_overhead.py --out {args.out}`; "
        f"E={E}, Z={Z}, k={K}, bf16 logits, 1 torch thread, fastest of {args.rounds} rounds x {args.iters} calls; "
        f"load average before/after: {meta['load_before']:.2f} / {meta['load_after']:.2f} (2 cores).",
        "",
        "| tokens | variant | µs per call | vs stock |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['tokens']} | {r['variant']} | {r['us_per_call']:.1f} | {r['vs_stock']:.2f}x |" for r in rows
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
