"""Time zeda's two CPU strategies on one experts layer: the kept-row loop vs compaction + grouped GEMM.

One Qwen3-30B-A3B experts layer (128 experts, hidden 2048, expert FFN 768, top-8; random
weights), bf16 by default. For each token count and zero share the two strategies run
interleaved; the medians are printed. This is the measurement behind the strategy choice in
`zeda.zero.experts.zeda_experts_forward` (see evals/speed/README.md).

    python evals/speed/bench_strategies.py --tokens 1,2,4,8,16,64,512 --shares 0.5 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import zeda.zero.experts as ze

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import build_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,2,4,8,16,64,512")
    ap.add_argument("--shares", default="0,0.5", help="share of each token's k slots sent to zero experts")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = build_config(args.config, 1, 1024, False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    experts = model.model.layers[0].mlp.experts
    e, k, h = experts.num_experts, cfg.num_experts_per_tok, cfg.hidden_size
    torch.manual_seed(0)
    print("| tokens | zero share | kept-row loop ms | compaction + grouped ms |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for t in [int(x) for x in args.tokens.split(",")]:
            for share in [float(s) for s in args.shares.split(",")]:
                x = torch.randn(t, h, dtype=dtype)
                idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
                idx[:, k - round(share * k) :] = e  # sentinel: zero slots
                w = torch.rand(t, k, dtype=dtype)
                fns = {"loop": ze.zeda_loop_forward, "grouped": ze.zeda_grouped_forward}
                for f in fns.values():
                    f(experts, x, idx, w)
                times: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, f in fns.items():
                        t0 = time.perf_counter()
                        f(experts, x, idx, w)
                        times[name].append(time.perf_counter() - t0)
                loop, grouped = (statistics.median(times[n]) * 1000 for n in ("loop", "grouped"))
                print(f"| {t} | {share:.0%} | {loop:.2f} | {grouped:.2f} |", flush=True)


if __name__ == "__main__":
    main()
