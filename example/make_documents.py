"""Write example/documents/, the folder of the tutorial (docs/tutorial.md): invented places in the example corpus's
language (clara/data/example_data.py), as a user's documents come: a Markdown atlas long enough to be cut into
passages, an HTML page with markup and a script, a PDF of several pages, and a short note that fits one passage.

    python example/make_documents.py [--out FOLDER]

The output is the same on every run (fixed seed); the PDF is written by scripts/text_to_pdf.py.
"""

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from clara.data.example_data import invent_names, make_entity

SEED = 20261207
REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "example" / "documents"
SECTIONS = ("kingdom", "city", "valley", "village")  # the atlas's chapters; harbors and islands have their own files


def by_kind(entities: list[dict], kinds) -> list[dict]:
    return [e for e in entities if e["kind"] in kinds]


def atlas(entities: list[dict]) -> str:
    parts = ["# An atlas of the inner lands", "Each entry names a place and what it is known for."]
    for kind in SECTIONS:
        parts.append(f"## The {kind}s" if kind != "city" else "## The cities")
        parts += [e["doc"] for e in by_kind(entities, {kind})]
    return "\n\n".join(parts) + "\n"


def harbors_page(entities: list[dict]) -> str:
    paragraphs = "\n".join(f"    <p>{e['doc']}</p>" for e in entities)
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n  <title>Harbors of the coast</title>\n"
        "  <style>p { max-width: 40em; }</style>\n  <script>console.log('tracking');</script>\n</head>\n<body>\n"
        '  <nav><a href="atlas.md">Atlas</a></nav>\n  <h1>Harbors of the coast</h1>\n  <article>\n'
        f"{paragraphs}\n  </article>\n</body>\n</html>\n"
    )


def write_pdf(text: str, path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "islands.txt"
        source.write_text(text, encoding="utf-8")
        command = [sys.executable, str(REPO / "scripts" / "text_to_pdf.py"), str(source), str(path)]
        subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the tutorial's example documents.")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder to write (default {OUT_DIR})")
    out = parser.parse_args().out
    rng = random.Random(SEED)
    entities = [make_entity(rng, name) for name in invent_names(rng, 160)]
    (out / "notes").mkdir(parents=True, exist_ok=True)
    inland = by_kind(entities, set(SECTIONS))
    (out / "atlas.md").write_text(atlas(inland[:60]), encoding="utf-8")
    harbors = by_kind(entities, {"harbor"})[:12]
    (out / "harbors.html").write_text(harbors_page(harbors), encoding="utf-8")
    islands = by_kind(entities, {"island"})[:18]
    pages = ["\n\n".join(e["doc"] for e in islands[i : i + 6]) for i in range(0, len(islands), 6)]
    write_pdf("\f".join(pages), out / "islands.pdf")
    note = by_kind(entities, {"fortress"})[0]
    (out / "notes" / "fortress.md").write_text(note["doc"] + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
