"""Per-layer skipped share: a converted model against the best training-free rules at its share.

Reads held-out test text (`evals/reference/data/test.jsonl`), measures the share of routed top-k
slots each MoE layer skips in a converted model (`run_tradeoff.py` exports one per row to
``<runs>/target_<s>/model``), then calibrates two training-free rules on the original model to
the same overall share (on validation text) and measures theirs::

    python evals/tradeoff/per_layer.py runs/tradeoff_v6/target_0.50/model

Prints one line per model: overall share, then each layer's.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

import zeda
from zeda.distillation.data import pack_texts, read_jsonl
from zeda.evaluation.baselines import apply_policy, attach_router_policy, calibrate_rule
from zeda.zero.telemetry import RouterTelemetry

RULES = ("threshold_no_renorm", "top_p_no_renorm")


@torch.no_grad()
def shares(model, blocks: torch.Tensor) -> tuple[float, list[float]]:
    """Overall and per-layer skipped share of ``model`` on ``(N, T)`` token blocks."""
    with RouterTelemetry(model) as tel:
        for i in range(0, len(blocks), 8):
            model(input_ids=blocks[i : i + 8])
    return tel.zero_share, list(tel.per_layer.values())


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("converted", help="a converted model directory (zero experts injected)")
    ap.add_argument("--original", default="evals/reference/model")
    ap.add_argument("--tokens", type=int, default=8192, help="test tokens measured")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.original)
    test = pack_texts(read_jsonl("evals/reference/data/test.jsonl"), tok, 256, args.tokens)
    calib = pack_texts(read_jsonl("evals/reference/data/validation.jsonl"), tok, 256, 8192)
    total, layers = shares(zeda.load(args.converted), test)
    print(f"zeda {total:.3f} " + " ".join(f"{s:.3f}" for s in layers))
    original = attach_router_policy(zeda.load(args.original))
    calib_batches = [calib[i : i + 8] for i in range(0, len(calib), 8)]
    for kind in RULES:
        cal = calibrate_rule(original, kind, total, calib_batches)
        with apply_policy(original, cal.policy):
            rule_total, rule_layers = shares(original, test)
        print(f"{kind} {rule_total:.3f} " + " ".join(f"{s:.3f}" for s in rule_layers))


if __name__ == "__main__":
    main()
