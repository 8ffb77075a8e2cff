"""Rebuild the reference corpus and its tokens for the sigmoid reference model, into this folder's cache.

The corpus is *the same one* as ``evals/reference``'s: the documents come from the same
registry fetchers (imported from ``evals/reference/build_corpus.py``), deduplicated and split by
the same rule, and tokenised with the first reference model's own tokenizer
(``evals/reference/model``). Nothing under ``evals/reference`` is written: the outputs go to
``evals/reference_sigmoid/cache/`` (gitignored), and the build refuses to continue unless the
rebuilt validation and test splits are byte-identical to the committed
``evals/reference/data/{validation,test}.jsonl`` and the train split matches the committed
``evals/reference/manifest.json`` (document and character counts per source).

    python evals/reference_sigmoid/build_data.py      # -> cache/corpus/*.jsonl, cache/tokens_*.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
REF = HERE.parent / "reference"
CACHE = HERE / "cache"
SPLITS = ("train", "validation", "test")
log = logging.getLogger("build_data")

sys.path.insert(0, str(REF))
import build_corpus as bc  # noqa: E402  (evals/reference/build_corpus.py: the corpus fetchers)


def build_corpus(cache: Path, val_frac: float = 0.05, test_frac: float = 0.08) -> dict[str, list[dict]]:
    """Fetch, deduplicate and split the documents exactly as ``build_corpus.main`` does.

    Returns:
        ``{split: [document dict]}`` for train / validation / test.
    """
    dl = cache / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    docs = bc.sotu_docs(dl) + bc.brown_docs(dl) + bc.kjv_docs() + bc.shakespeare_docs(dl)
    seen, splits = set(), {s: [] for s in SPLITS}
    for d in docs:
        h = bc._norm_hash(d["text"])
        if h not in seen and len(d["text"]) > 200:
            seen.add(h)
            splits[bc._split_of(d["id"], val_frac, test_frac)].append(d)
    return splits


def check_same_corpus(splits: dict[str, list[dict]]) -> None:
    """Stop unless the rebuilt splits are the committed reference corpus."""
    manifest = json.loads((REF / "manifest.json").read_text())
    for name, rows in splits.items():
        want = manifest["splits"][name]
        got = {"documents": len(rows), "characters": sum(len(r["text"]) for r in rows)}
        if got["documents"] != want["documents"] or got["characters"] != want["characters"]:
            raise SystemExit(
                f"build_data: rebuilt {name} split {got} differs from evals/reference/manifest.json"
            )
    for name in ("validation", "test"):
        committed = (REF / "data" / f"{name}.jsonl").read_text(encoding="utf-8")
        rebuilt = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in splits[name])
        if committed != rebuilt:
            raise SystemExit(
                f"build_data: rebuilt {name} split differs from evals/reference/data/{name}.jsonl"
            )


def tokenize(rows: list[dict], tok) -> torch.Tensor:
    """All tokens of a split, documents joined by EOS (as ``evals/reference/train_model.tokens_of``).

    Returns:
        ``(n_tokens,)`` int32.
    """
    ids: list[int] = []
    for r in rows:
        ids.extend(tok(r["text"])["input_ids"])
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(REF / "model"), help="the first reference model's tokenizer")
    ap.add_argument("--cache", default=str(CACHE))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cache = Path(args.cache)
    splits = build_corpus(cache)
    check_same_corpus(splits)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    (cache / "corpus").mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        bc._write_jsonl(cache / "corpus" / f"{name}.jsonl", rows)
        t = tokenize(rows, tok)
        tmp = cache / f"tokens_{name}.pt.tmp"
        torch.save(t, tmp)
        tmp.replace(cache / f"tokens_{name}.pt")
        log.info("%s: %d documents, %d tokens", name, len(rows), t.numel())


if __name__ == "__main__":
    main()
