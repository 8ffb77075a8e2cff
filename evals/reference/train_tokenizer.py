"""Train the reference BPE tokenizer (8192 tokens) on the train split; save it as an HF tokenizer.

python evals/reference/train_tokenizer.py [--out evals/reference/cache/tokenizer]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default=str(HERE / "cache/corpus/train.jsonl"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", default=str(HERE / "cache/tokenizer"))
    args = ap.parse_args()
    texts = [json.loads(line)["text"] for line in open(args.train, encoding="utf-8")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=1024,
    )
    fast.save_pretrained(args.out)
    print(f"saved {len(fast)} tokens to {args.out}")


if __name__ == "__main__":
    main()
