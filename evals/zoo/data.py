"""Build a zoo member's data: corpus, document splits, committed JSONL, tokenizer and token tensors.

    python -m evals.zoo.data MEMBER [MEMBER ...]

For each member: fetch its corpus's sources (`evals.zoo.sources`, registries only), drop
documents of at most ``min_chars`` characters and exact duplicates (normalised-text hash), split
**by document** with a stable hash of the document id into train / validation / test, write the
splits to the corpus cache and the committed files (``data/validation.jsonl``, ``data/test.jsonl``
and the whole train split as ``data/train.jsonl``, or a md5-ordered ~2.5 MB ``train_sample.jsonl``
for the large reference corpus), train the member's tokenizer on the train split (``bpe:N``) or
take its shared/vendored one, and save the tokenised splits (documents joined by the document
separator) to ``evals/zoo/cache/<member>/tokens_*.pt``.

A committed split or tokenizer that the rebuild does not reproduce byte for byte stops the build
(``--overwrite`` replaces it); outputs are written to temporary files and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from evals.zoo import sources
from evals.zoo.members import CACHE, CORPORA, MEMBERS, ROOT, Corpus, Member, get_member

log = logging.getLogger("evals.zoo.data")
SPLITS = ("train", "validation", "test")
TRAIN_SAMPLE_MB = 2.5


def _norm_hash(text: str) -> str:
    return hashlib.sha1(re.sub(r"\W+", " ", text.lower()).strip().encode()).hexdigest()


def split_of(doc_id: str, val: float, test: float) -> str:
    """The split of a document: a stable sha256 bucket of its id."""
    u = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else "validation" if u < test + val else "train"


def jsonl_text(rows: list[dict]) -> str:
    """Rows as JSONL text (one ``json.dumps`` per line, UTF-8 kept)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def corpus_dir(corpus: Corpus) -> Path:
    """Where the full splits of a corpus are cached."""
    return CACHE / "corpora" / corpus.name


def build_corpus(corpus: Corpus) -> dict[str, list[dict]]:
    """Fetch, deduplicate and split a corpus; cache the full splits and a manifest.

    Returns:
        ``{split: [{"id", "source", "text"}]}``.
    """
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    docs: list[dict] = []
    for name in corpus.sources:
        docs += sources.FETCHERS[name](dl)
    seen, splits = set(), {s: [] for s in SPLITS}
    for d in docs:
        h = _norm_hash(d["text"])
        if h not in seen and len(d["text"]) > corpus.min_chars:
            seen.add(h)
            splits[split_of(d["id"], corpus.val_frac, corpus.test_frac)].append(d)
    out = corpus_dir(corpus)
    for name, rows in splits.items():
        write_atomic(out / f"{name}.jsonl", jsonl_text(rows))
    manifest = {
        "corpus": corpus.name,
        "description": corpus.description,
        "sources": {s: sources.LICENCES[s] for s in corpus.sources},
        "downloads": {s: sources.DOWNLOADS[s] for s in corpus.sources if s in sources.DOWNLOADS},
        "documents_before_dedup": len(docs),
        "documents": sum(len(r) for r in splits.values()),
        "splits": {
            name: {
                "documents": len(rows),
                "characters": sum(len(r["text"]) for r in rows),
                "by_source": {s: sum(1 for r in rows if r["source"] == s) for s in corpus.sources},
            }
            for name, rows in splits.items()
        },
        "split_rule": f"sha256(doc id) bucket: test {corpus.test_frac}, validation {corpus.val_frac}, "
        f"rest train; documents of at most {corpus.min_chars} characters and exact duplicates dropped",
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return splits


def train_sample(rows: list[dict], mb: float = TRAIN_SAMPLE_MB) -> list[dict]:
    """Train documents in md5(id) order until just over ``mb`` megabytes (the reference's sample)."""
    sample, size = [], 0
    for d in sorted(rows, key=lambda d: hashlib.md5(d["id"].encode()).hexdigest()):
        if size > mb * 1e6:
            break
        sample.append(d)
        size += len(d["text"].encode())
    return sample


def committed_files(member: Member, splits: dict[str, list[dict]]) -> dict[Path, str]:
    """The member's committed data files and their contents."""
    train = splits["train"] if member.train_committed_whole else train_sample(splits["train"])
    return {
        member.data_dir / "validation.jsonl": jsonl_text(splits["validation"]),
        member.data_dir / "test.jsonl": jsonl_text(splits["test"]),
        member.train_path: jsonl_text(train),
    }


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check_or_write(files: dict[Path, str], overwrite: bool) -> None:
    """Write the files; an existing file with other contents stops everything unless ``overwrite``."""
    for path, text in files.items():
        if path.exists() and not overwrite and path.read_text(encoding="utf-8") != text:
            raise SystemExit(
                f"zoo data: rebuilt {_rel(path)} differs from the committed file; "
                "pass --overwrite to replace it"
            )
    for path, text in files.items():
        write_atomic(path, text)


def tokenizer_dir(member: Member) -> Path:
    """Where the member's tokenizer is read from."""
    kind, _, arg = member.tokenizer.partition(":")
    if kind == "bpe":
        return member.cache / "tokenizer"
    if kind == "member":
        return tokenizer_dir(get_member(arg))
    if kind == "path":
        return ROOT / arg
    raise SystemExit(f"zoo: member {member.name}: unknown tokenizer {member.tokenizer!r}")


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with one special token ``<|endoftext|>`` (EOS = BOS = pad, id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=1024,
    )


def build_tokenizer(member: Member, train_rows: list[dict], overwrite: bool) -> None:
    """Train a ``bpe:N`` tokenizer into the cache; it must equal the committed model's, if any."""
    kind, _, arg = member.tokenizer.partition(":")
    if kind != "bpe":
        return
    tok = train_bpe([r["text"] for r in train_rows], int(arg))
    out = tokenizer_dir(member)
    tok.save_pretrained(out)
    committed = member.model_dir / "tokenizer.json"
    if committed.exists() and not overwrite:
        if json.loads(committed.read_text()) != json.loads((out / "tokenizer.json").read_text()):
            raise SystemExit(
                f"zoo data: the rebuilt tokenizer of {member.name} differs from {_rel(committed)}; "
                "pass --overwrite to accept it (then retrain the model)"
            )
    log.info("%s: tokenizer of %d tokens -> %s", member.name, len(tok), out)


def doc_sep_id(member: Member, tok) -> int:
    """The id of the token that joins documents."""
    if member.doc_sep is None:
        return tok.eos_token_id
    ids = tok.convert_tokens_to_ids([member.doc_sep])
    return ids[0]


def tokenize(rows: list[dict], tok, sep: int) -> torch.Tensor:
    """All tokens of the rows, each document followed by ``sep``.

    Returns:
        ``(n_tokens,)`` int32.
    """
    ids: list[int] = []
    for r in rows:
        ids.extend(tok(r["text"])["input_ids"])
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.int32)


def head_tokens(path: Path, tok, sep: int, n: int) -> torch.Tensor:
    """The first ``n`` tokens of a JSONL split, documents joined by ``sep`` (read lazily). ``(n,)``."""
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids.extend(tok(json.loads(line)["text"])["input_ids"])
            ids.append(sep)
            if len(ids) >= n:
                break
    return torch.tensor(ids[:n], dtype=torch.int32)


def split_source(member: Member, split: str) -> Path:
    """The JSONL file holding a whole split of the member (committed, or the corpus cache for train)."""
    if split != "train" or member.train_committed_whole:
        return member.data_dir / ("train.jsonl" if split == "train" else f"{split}.jsonl")
    return corpus_dir(CORPORA[member.corpus]) / "train.jsonl"


def tokens_path(member: Member, split: str) -> Path:
    """The cached token tensor of a split."""
    return member.cache / f"tokens_{split}.pt"


def build_tokens(member: Member) -> dict[str, int]:
    """Tokenise the member's splits into the cache. Returns tokens per split."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(member))
    sep = doc_sep_id(member, tok)
    counts = {}
    for split in SPLITS:
        t = tokenize(read_jsonl(split_source(member, split)), tok, sep)
        tmp = tokens_path(member, split).with_suffix(".pt.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        torch.save(t, tmp)
        os.replace(tmp, tokens_path(member, split))
        counts[split] = t.numel()
        log.info("%s: %s %d tokens", member.name, split, t.numel())
    return counts


def build(member: Member, overwrite: bool = False) -> dict:
    """Corpus, committed splits, tokenizer and tokens of one member; returns its data manifest."""
    corpus = CORPORA[member.corpus]
    splits = build_corpus(corpus)
    check_or_write(committed_files(member, splits), overwrite)
    kind, _, arg = member.tokenizer.partition(":")
    if kind == "member" and not (tokenizer_dir(member) / "tokenizer.json").exists():
        owner = get_member(arg)  # the shared tokenizer is trained on its owner's train split
        build_tokenizer(owner, read_jsonl(corpus_dir(CORPORA[owner.corpus]) / "train.jsonl"), overwrite)
    build_tokenizer(member, splits["train"], overwrite)
    counts = build_tokens(member)
    manifest = json.loads((corpus_dir(corpus) / "manifest.json").read_text())
    path = member.data_dir / "manifest.json"
    sharing = [m.name for m in MEMBERS.values() if m.data_dir == member.data_dir]
    previous = json.loads(path.read_text()) if path.exists() else {}
    manifest["tokens"] = {
        **{k: v for k, v in previous.get("tokens", {}).items() if k in sharing},
        member.name: {"tokenizer": member.tokenizer, **counts},
    }
    manifest["committed"] = {
        "validation": "validation.jsonl",
        "test": "test.jsonl",
        "train": member.train_file,
        "train_is_whole_split": member.train_committed_whole,
    }
    manifest["members"] = sharing
    manifest["command"] = f"python -m evals.zoo.data NAME (NAME: {', '.join(sharing)})"
    write_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("members", nargs="+", help=f"members: {', '.join(MEMBERS)}")
    ap.add_argument("--overwrite", action="store_true", help="replace committed files that differ")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in args.members:
        m = build(get_member(name), args.overwrite)
        print(json.dumps({"member": name, "splits": m["splits"], "tokens": m["tokens"][name]}, indent=1))


if __name__ == "__main__":
    main()
