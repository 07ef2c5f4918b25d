"""clara.synthesis.records: a training file per registered stage, named after it and made by its record schema."""

from __future__ import annotations

import dataclasses

from clara.stages import STAGES
from clara.synthesis import records
from clara.synthesis.documents import PAIR_TASKS

WORDS = "harbor lantern violin glacier copper orchard meteor canyon falcon saffron".split()


def corpus(count: int) -> tuple[list[str], list[str], list[dict]]:
    """Ids, texts and one synthesized result per document: a pair per task and a paraphrase."""
    ids = [f"doc{i}" for i in range(count)]
    texts = [f"The {WORDS[i]} and the {WORDS[(i + 3) % len(WORDS)]} of document {i}." for i in range(count)]
    results = [
        {
            "id": doc_id,
            "pairs": {task: [[f"What does {task} say of the {WORDS[i]}?", f"answer {i}"]] for task in PAIR_TASKS},
            "paraphrase": f"A retelling of document {i}.",
        }
        for i, doc_id in enumerate(ids)
    ]
    return ids, texts, results


def test_a_registered_stage_gets_a_file_made_by_its_schema(monkeypatch):
    added = {
        "stage1_again": dataclasses.replace(STAGES["stage1"], name="stage1_again"),
        "stage2_again": dataclasses.replace(STAGES["stage2"], name="stage2_again"),
    }
    monkeypatch.setattr(records, "STAGES", {**STAGES, **added})
    files, duplicates = records.build_records(*corpus(8), records.Layout(0.25, 2, 4, 0))
    assert list(files) == [name + split for name in (*STAGES, *added) for split in ("", "_eval")]
    assert not duplicates and all(files.values())
    for name in ("stage1_again", "stage1_again_eval", "stage2_again", "stage2_again_eval"):
        assert files[name] == files[name.replace("_again", "")]
    # The answer schema: with a query reasoner `candidates` documents and the gold ids, else `stage1_2_docs`.
    assert all(len(r["docs"]) == 4 and r["gold_ids"] for r in files["stage2"])
    assert all(len(r["docs"]) == 2 and "gold_ids" not in r for r in files["stage1_2"])
    assert {r["data_type"] for r in files["stage1"]} == {"qa", "paraphrase"}
