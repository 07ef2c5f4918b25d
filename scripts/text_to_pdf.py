"""Write a text file as a PDF whose text pypdf reads back: the example documents' PDF (example/make_documents.py)
and the test folders' PDFs are made with it, so no PDF is checked in that nothing here can rebuild.

    python scripts/text_to_pdf.py IN.txt OUT.pdf [--lines_per_page 50]

Standard library only (and clara's atomic write): a PDF 1.4 file with one Helvetica text stream per page
(Latin-1 text; other characters become `?`). Lines are wrapped at 90 characters; a page ends after
--lines_per_page lines or at a form feed.
"""

from __future__ import annotations

import argparse
import textwrap

from clara.files import atomic_path

WIDTH = 90  # characters per line at 10 pt Helvetica on a Letter page with 50 pt margins, about


def pages_of(text: str, lines_per_page: int) -> list[list[str]]:
    pages = []
    for block in text.split("\f"):
        lines = []
        for line in block.splitlines():
            lines += textwrap.wrap(line, WIDTH) or [""]
        pages += [lines[i : i + lines_per_page] for i in range(0, max(len(lines), 1), lines_per_page)]
    return pages


def _literal(line: str) -> bytes:
    escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"(" + escaped.encode("latin-1", "replace") + b")"


def pdf_bytes(pages: list[list[str]]) -> bytes:
    """The file: catalog, page tree, font, then a page object and its content stream per page, and the xref."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
               b"/Encoding /WinAnsiEncoding >>"]  # fmt: skip
    kids = []
    for lines in pages:
        stream = b"BT /F1 10 Tf 13 TL 50 742 Td " + b" ".join(_literal(line) + b" Tj T*" for line in lines) + b" ET"
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (len(objects))
        )
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a text file as a PDF (Helvetica, Letter pages).")
    parser.add_argument("text", help="UTF-8 text file; blank lines separate paragraphs, a form feed ends a page")
    parser.add_argument("out", help="PDF file to write")
    parser.add_argument("--lines_per_page", type=int, default=50)
    args = parser.parse_args()
    with open(args.text, encoding="utf-8") as handle:
        data = pdf_bytes(pages_of(handle.read(), args.lines_per_page))
    with atomic_path(args.out) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    print(f"{args.out}: {data.count(b'/Type /Page ')} pages")


if __name__ == "__main__":
    main()
