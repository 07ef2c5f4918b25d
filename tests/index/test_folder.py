"""A folder of documents (clara/index/folder.py): each kind of file read as its text, ids from the paths, the files
that give no document named with the reason, and what to install when PDF support is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clara.errors import DataError
from clara.index.corpus import load_corpus
from clara.index.folder import read_folder
from tests.helpers import EXAMPLE, run_module, subprocess_env, write_pdf

PLACE = "Vorlan is a kingdom. Its sacred animal is owl. Its main food is rice."
HTML = (
    "<html><head><title>Atlas</title><style>p {color: red}</style><script>var hidden = 1;</script></head>"
    "<body><h1>Harbors</h1><p>Tromgu is a <b>harbor</b>.</p><script>alert('no')</script>"
    "<p>Its main food is corn.</p></body></html>"
)


def test_every_kind_of_file_is_read_as_its_text_and_named_by_its_path(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "vorlan.md").write_text("# Vorlan\n\n" + PLACE, encoding="utf-8")
    (tmp_path / "plain.txt").write_text(PLACE, encoding="utf-8")
    (tmp_path / "harbors.html").write_text(HTML, encoding="utf-8")
    write_pdf(tmp_path / "atlas.pdf", PLACE + "\f" + "Tromgu is a harbor.")
    found = read_folder(str(tmp_path))
    texts = dict(zip(found.ids, found.texts))
    assert sorted(texts) == ["atlas.pdf", "harbors.html", "notes/vorlan.md", "plain.txt"]
    assert texts["notes/vorlan.md"] == "# Vorlan\n\n" + PLACE
    assert texts["harbors.html"] == "Harbors\n\nTromgu is a harbor.\n\nIts main food is corn."
    assert "var hidden" not in texts["harbors.html"] and "alert" not in texts["harbors.html"]
    assert texts["atlas.pdf"] == PLACE + "\n\nTromgu is a harbor."  # a page is a paragraph
    assert found.skipped == {}


def test_files_that_give_no_document_are_named_with_the_reason(tmp_path):
    (tmp_path / "good.md").write_text(PLACE, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "slides.pptx").write_bytes(b"PK")
    ids, texts, corpus = load_corpus(str(tmp_path))
    assert ids == ["good.md"] and corpus["files"] == 5 and corpus["read"] == 1
    assert corpus["skipped"]["empty.txt"] == "empty (no text)"
    assert corpus["skipped"]["broken.pdf"].startswith("not a readable PDF")
    assert corpus["skipped"]["latin1.txt"] == "not UTF-8 text (byte 3)"
    assert corpus["skipped"]["slides.pptx"].startswith("unsupported file type")


def test_a_folder_with_nothing_readable_is_one_error(tmp_path):
    (tmp_path / "empty.md").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no readable document in the folder .*empty.md: empty"):
        read_folder(str(tmp_path))


def test_without_pypdf_a_pdf_says_what_to_install(tmp_path):
    blocker = tmp_path / "blocker" / "pypdf"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pypdf is not installed here')\n", encoding="utf-8")
    docs = tmp_path / "docs"
    docs.mkdir()
    write_pdf(docs / "atlas.pdf", PLACE)
    env = subprocess_env()
    env["PYTHONPATH"] = f"{blocker.parent}:{env['PYTHONPATH']}"
    proc = run_module(
        ["clara", "synthesize", "--corpus", str(docs), "--out", str(tmp_path / "out"), "--llm", "hf:tiny"], env=env
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'clara-train[pdf]'" in proc.stderr and "atlas.pdf" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_example_documents_are_what_their_script_writes(tmp_path):
    """example/documents/ (the tutorial's folder, its PDF included) is rebuilt byte for byte by its script."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_documents.py"), "--out", str(tmp_path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    shipped = EXAMPLE / "documents"
    names = sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all((shipped / name).read_bytes() == (tmp_path / name).read_bytes() for name in names)
    assert read_folder(str(shipped)).skipped == {}
