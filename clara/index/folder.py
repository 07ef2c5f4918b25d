"""A folder of documents as users have them, read recursively: `.txt` and `.md` as UTF-8 text, `.html` / `.htm`
as the text a browser shows (BeautifulSoup: no markup, scripts or styles), `.pdf` as the text of its pages, one
paragraph a page (pypdf, the optional extra `pip install 'clara-train[pdf]'`). A file's path relative to the
folder, with `/` between folders, is its document id.

A file that cannot be read, holds no text or has another suffix is skipped with its reason, and the run goes on
unless no file gave a document (DataError, exit 2).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from clara.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
PDF_EXTRA = "pip install 'clara-train[pdf]' (or pip install pypdf==7.1.1)"
BLOCKS = ["address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "figcaption", "footer", "h1", "h2",
          "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "td",
          "th", "tr", "ul"]  # fmt: skip
PARAGRAPH = re.compile(r"\n\s*\n")
MAX_LISTED = 20  # skipped files named in the log; every one is in the passages file


@dataclass
class FolderDocuments:
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # file id -> why it gave no document

    def summary(self) -> dict:
        return {"files": len(self.ids) + len(self.skipped), "read": len(self.ids), "skipped": dict(self.skipped)}


class Unreadable(Exception):
    """A file that gives no text, and why (the message)."""


def _read_text(path: str) -> str:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise Unreadable(f"not UTF-8 text (byte {error.start})") from None


def _read_html(path: str) -> str:
    from bs4 import BeautifulSoup  # deferred: only folders with HTML files need it

    soup = BeautifulSoup(_read_text(path), "html.parser")
    for hidden in soup(["script", "style", "noscript", "template", "head"]):
        hidden.decompose()
    # Block elements become paragraphs (the splitter's first boundary); inline ones (<b>, <a>) stay in the text.
    for block in soup(BLOCKS):
        block.insert_before("\n\n")
        block.insert_after("\n\n")
    paragraphs = (" ".join(part.split()) for part in PARAGRAPH.split(soup.get_text()))
    return "\n\n".join(p for p in paragraphs if p)


def _read_pdf(path: str) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise DataError(f"{path}: reading PDF files needs pypdf, an optional extra: {PDF_EXTRA}") from None
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings on a broken file: the skip line says it
    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, OSError, ValueError, KeyError, TypeError) as error:
        raise Unreadable(f"not a readable PDF ({type(error).__name__}: {error})") from None
    # A PDF's line breaks are layout (a sentence wraps over lines), not structure: each page is one paragraph.
    return "\n\n".join(" ".join(page.split()) for page in pages if page.strip())


READERS = {
    **dict.fromkeys(TEXT_SUFFIXES, _read_text),
    **dict.fromkeys(HTML_SUFFIXES, _read_html),
    **dict.fromkeys(PDF_SUFFIXES, _read_pdf),
}


def read_folder(folder: str) -> FolderDocuments:
    """Every file under folder, in sorted path order, as a document or a skipped file with its reason."""
    found = FolderDocuments()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            doc_id = os.path.relpath(path, folder).replace(os.sep, "/")
            reader = READERS.get(os.path.splitext(name)[1].lower())
            if reader is None:
                found.skipped[doc_id] = f"unsupported file type (read: {', '.join(sorted(READERS))})"
                continue
            try:
                text = reader(path)
            except Unreadable as error:
                found.skipped[doc_id] = str(error)
                continue
            except OSError as error:
                found.skipped[doc_id] = f"cannot be read ({error.strerror})"
                continue
            if not text.strip():
                found.skipped[doc_id] = "empty (no text)"
                continue
            found.ids.append(doc_id)
            found.texts.append(text)
    if not found.ids:
        listed = "; ".join(f"{name}: {why}" for name, why in list(found.skipped.items())[:MAX_LISTED])
        raise DataError(f"--corpus {folder}: no readable document in the folder" + (f" ({listed})" if listed else ""))
    return found


def describe_skipped(skipped: dict[str, str]) -> list[str]:
    """Log lines naming the skipped files and why (at most MAX_LISTED, then how many more)."""
    lines = [f"  skipped {name}: {why}" for name, why in list(skipped.items())[:MAX_LISTED]]
    if len(skipped) > MAX_LISTED:
        lines.append(f"  ... and {len(skipped) - MAX_LISTED} more skipped files (listed in the passages file)")
    return lines
