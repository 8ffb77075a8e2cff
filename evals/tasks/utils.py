"""Helpers for zeda's offline lm-eval tasks: load JSONL files next to this file (any cwd)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def load_jsonl(file: str, split: str = "test", **_: object) -> datasets.DatasetDict:
    """A one-split DatasetDict from ``data/<file>`` (no network)."""
    rows = [json.loads(line) for line in (DATA / file).open(encoding="utf-8")]
    for r in rows:
        r.pop("canary", None)  # kept in the files, not needed in documents
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def perplexity_results(doc: dict, results: list) -> dict:
    """Word and byte perplexity of one passage (``loglikelihood_rolling``)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def cloze_context(doc: dict) -> str:
    """Passage without its last word."""
    return doc["text"].rsplit(" ", 1)[0]


def cloze_target(doc: dict) -> str:
    """The last word, with its leading space."""
    return " " + doc["text"].rsplit(" ", 1)[1]
