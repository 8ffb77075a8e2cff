"""Step-0 quality of the zero-expert starts (`inject.init`) on the reference model, no training.

For a target share (default 0.5) each start is calibrated on the quickstart's training text
(8,192 tokens, sequences of 128, as `inject.init` does) and evaluated on 20,480 validation
tokens against the original model: skipped share, perplexity ratio, top-1 agreement, KL.

    python evals/quickstart/start_probe.py [--share 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

import zeda
from zeda.distillation.data import pack_texts, read_jsonl
from zeda.zero.start import start_at_share

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "evals" / "tradeoff"))
from run_tradeoff import quality  # noqa: E402

STARTS = {
    "zero rows, one bias (inject.init=threshold)": {"rows": "zero"},
    "fitted rows, one bias": {"rows": "fitted", "per_layer": False},
    "fitted rows, bias per layer (inject.init=relative)": {"rows": "fitted"},
}


def main() -> None:
    """CLI entry point: prints a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ROOT / "evals/reference/model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    val = pack_texts(read_jsonl(ROOT / "evals/reference/data/validation.jsonl"), tok, 256, 20480)
    train = pack_texts(read_jsonl(ROOT / "evals/reference/data/train_sample.jsonl"), tok, 128, 8192)
    original = zeda.load(model_dir)
    with torch.no_grad():
        ref = [original(input_ids=val[i : i + 8]).logits[:, :-1].float() for i in range(0, len(val), 8)]
    base = quality(original, ref, val)["ppl"]
    print(f"| start ({args.share:.0%} target) | skipped | step-0 ppl ratio | top-1 agr. | KL |")
    print("|---|---|---|---|---|")
    for name, kwargs in STARTS.items():
        model = zeda.load(model_dir)
        zeda.inject_zero_experts(model, seed=0)
        start_at_share(model, args.share, train, **kwargs)
        q = quality(model, ref, val)
        print(
            f"| {name} | {q['skipped_share']:.1%} | {q['ppl'] / base:.4f} | {q['top1_agreement']:.3f} | {q['kl']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
