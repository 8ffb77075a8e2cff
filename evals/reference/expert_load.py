"""Per-layer expert load of the reference model on the reference test split.

    python evals/reference/expert_load.py --tokens 100000   # -> evals/reference/expert_load.json

Counts the top-k expert assignments of every token (256-token blocks from the start of the
tokenised test split, the blocks ``python -m evals.zoo.train reference --finalize`` evaluates)
and reports, per layer, the load entropy, max/mean and min/mean load, and how many experts
receive less than 1% and 10% of the mean load (effectively unused experts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent


def test_tokens(tok) -> torch.Tensor:
    """Test split tokens (documents joined by EOS), from the cache or ``data/test.jsonl``."""
    cached = HERE.parent / "zoo" / "cache" / "reference" / "tokens_test.pt"
    if cached.exists():
        return torch.load(cached)
    ids: list[int] = []
    with (HERE / "data" / "test.jsonl").open(encoding="utf-8") as f:
        for line in f:
            ids.extend(tok(json.loads(line)["text"])["input_ids"])
            ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


@torch.no_grad()
def expert_load(model, data: torch.Tensor, seq: int, max_tokens: int, batch: int = 8) -> list[dict]:
    """Per-layer load statistics of the top-k routing on consecutive ``seq``-token blocks."""
    cfg = model.config
    n_blocks = min(max_tokens // seq, data.numel() // seq)
    counts = [torch.zeros(cfg.num_experts, dtype=torch.float64) for _ in range(cfg.num_hidden_layers)]
    for i in tqdm(range(0, n_blocks, batch), desc="expert load"):
        ids = torch.stack([data[j * seq : (j + 1) * seq] for j in range(i, min(i + batch, n_blocks))]).long()
        out = model(ids, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            idx = logits.topk(cfg.num_experts_per_tok, -1).indices.reshape(-1)
            counts[layer] += torch.bincount(idx, minlength=cfg.num_experts).double()
    stats = []
    for layer, c in enumerate(counts):
        p = c / c.sum()
        stats.append(
            {
                "layer": layer,
                "entropy_nats": float(-(p * p.clamp_min(1e-12).log()).sum()),
                "max_entropy_nats": math.log(cfg.num_experts),
                "max_over_mean": float(c.max() / c.mean()),
                "min_over_mean": float(c.min() / c.mean()),
                "experts_below_1pct_of_mean": int((c < 0.01 * c.mean()).sum()),
                "experts_below_10pct_of_mean": int((c < 0.1 * c.mean()).sum()),
                "top_expert_share": float(p.max()),
            }
        )
    return stats


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE / "model"))
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "expert_load.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    data = test_tokens(tok)
    stats = expert_load(model, data, args.seq_len, args.tokens)
    n_tokens = min(args.tokens // args.seq_len, data.numel() // args.seq_len) * args.seq_len
    record = {
        "command": f"python evals/reference/expert_load.py --tokens {args.tokens}",
        "tokens": n_tokens,
        "layers": stats,
    }
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, args.out)
    for s in stats:
        print(
            f"layer {s['layer']}: entropy {s['entropy_nats']:.3f}/{s['max_entropy_nats']:.3f} "
            f"max/mean {s['max_over_mean']:.2f} <1%: {s['experts_below_1pct_of_mean']} "
            f"<10%: {s['experts_below_10pct_of_mean']}"
        )


if __name__ == "__main__":
    main()
