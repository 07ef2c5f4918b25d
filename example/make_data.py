"""Generate the synthetic example data for every training stage (see clara/data/example_data.py).

Held-out files use places that never occur in the training files. corpus.jsonl holds every
place's document with an id (`{"id": "place-0000", "text": ...}`), for `python -m clara.index`;
the held-out stage2 questions name their gold documents' ids (`gold_ids`) for open-corpus evaluation.
open_corpus_data*.jsonl hold stage2 questions that describe their place by its facts (with `gold_ids`),
for retrieval over the whole corpus.
Run `python example/make_data.py`; the output is the same on every run (fixed seed).
"""

import json
import random
from pathlib import Path

from clara.data.example_data import (
    N_STAGE2_CANDIDATES,
    end_to_end_records,
    instruction_records,
    invent_names,
    make_entity,
    pretrain_records,
)

SEED = 20240517
# Its own seed: the open-corpus files are drawn after the others and must not change them (the
# training files above are part of the tiny model's recipe).
OPEN_CORPUS_SEED = 20261202
OUT_DIR = Path(__file__).resolve().parent

N_TRAIN_ENTITIES = 2000
N_EVAL_ENTITIES = 400

SIZES = {
    "pretrain": (1500, 100),
    "instruction_tuning": (1500, 100),
    "end_to_end": (400, 100),
    "open_corpus": (2000, 100),
}


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def summary(path: Path, records: list[dict]) -> str:
    docs = [d for r in records for d in r["docs"]]
    mean_chars = sum(len(d) for d in docs) / len(docs)
    line = (f"{path.name}: {len(records)} records, {len(docs)} docs "
            f"(mean {mean_chars:.0f} chars, {min(map(len, docs))}-{max(map(len, docs))})")
    if "data_type" in records[0]:
        n_qa = sum(r["data_type"] == "qa" for r in records)
        line += f", {n_qa} qa / {len(records) - n_qa} paraphrase"
    return line


def described_question(entity: dict, attr: str) -> str:
    """A question that names the place by its other facts, never by its name.

    Compressed documents keep their facts far more than their names (a made-up name is a few
    characters of a tiny tokenizer's vocabulary), so a question the query reasoner can match against
    a whole corpus describes the place the way its document does.
    """
    others = [f"whose {other} is {value}" for other, value in entity["facts"].items() if other != attr]
    return f"What is the {attr} of the {entity['kind']} {' and '.join(others)}?"


def fits(entity: dict, kind: str, described: set[tuple[str, str]]) -> bool:
    return entity["kind"] == kind and described <= set(entity["facts"].items())


def unique_attrs(entity: dict, corpus: list[dict]) -> list[str]:
    """The facts to ask for whose description (kind and the other facts) fits no other place of the corpus."""
    return [attr for attr in entity["facts"]
            if not any(other is not entity and fits(other, entity["kind"], described_facts(entity, attr))
                       for other in corpus)]


def described_facts(entity: dict, attr: str) -> set[tuple[str, str]]:
    return {(a, v) for a, v in entity["facts"].items() if a != attr}


def open_corpus_records(rng: random.Random, entities: list[dict], corpus: list[dict], count: int,
                        doc_ids: dict[str, str]) -> list[dict]:
    """Stage-2 records whose question describes its place so that only its document fits among the whole
    corpus; about half the distractors share a described fact."""
    askable = [(entity, attrs) for entity in entities if (attrs := unique_attrs(entity, corpus))]
    # Every place once before any twice.
    drawn = rng.sample(askable, min(count, len(askable))) + rng.choices(askable, k=max(0, count - len(askable)))
    records = []
    for entity, attrs in drawn:
        attr = rng.choice(attrs)
        described = described_facts(entity, attr)
        similar = [e for e in entities if e is not entity and described & set(e["facts"].items())]
        n_similar = min(len(similar), (N_STAGE2_CANDIDATES - 1) // 2)
        others = rng.sample(similar, n_similar)
        rest = [e for e in entities if e is not entity and e not in others]
        others += rng.sample(rest, N_STAGE2_CANDIDATES - 1 - n_similar)
        rng.shuffle(others)
        position = rng.randrange(N_STAGE2_CANDIDATES)
        docs = [e["doc"] for e in others]
        docs.insert(position, entity["doc"])
        records.append({"question": described_question(entity, attr), "gold_answer": entity["facts"][attr],
                        "docs": docs, "pos_index": [position], "gold_ids": [doc_ids[entity["doc"]]]})
    return records


def main() -> None:
    rng = random.Random(SEED)
    names = invent_names(rng, N_TRAIN_ENTITIES + N_EVAL_ENTITIES)
    entities = [make_entity(rng, name) for name in names]
    splits = {"": entities[:N_TRAIN_ENTITIES], "_eval": entities[N_TRAIN_ENTITIES:]}
    builders = {
        "pretrain": pretrain_records,
        "instruction_tuning": instruction_records,
        "end_to_end": end_to_end_records,
    }
    doc_ids = {entity["doc"]: f"place-{i:04d}" for i, entity in enumerate(entities)}
    for stem, build in builders.items():
        for suffix, pool in splits.items():
            count = SIZES[stem][0] if suffix == "" else SIZES[stem][1]
            records = build(rng, pool, count)
            # Held-out only: the training files are part of the tiny model's recipe (its cache key).
            if stem == "end_to_end" and suffix == "_eval":
                for record in records:
                    record["gold_ids"] = [doc_ids[record["docs"][i]] for i in record["pos_index"]]
            path = OUT_DIR / f"{stem}_data{suffix}.jsonl"
            write_jsonl(path, records)
            print(summary(path, records))
    open_rng = random.Random(OPEN_CORPUS_SEED)
    for suffix, pool in splits.items():
        count = SIZES["open_corpus"][0] if suffix == "" else SIZES["open_corpus"][1]
        path = OUT_DIR / f"open_corpus_data{suffix}.jsonl"
        records = open_corpus_records(open_rng, pool, entities, count, doc_ids)
        write_jsonl(path, records)
        print(summary(path, records))
    path = OUT_DIR / "corpus.jsonl"
    write_jsonl(path, [{"id": doc_id, "text": doc} for doc, doc_id in doc_ids.items()])
    print(f"{path.name}: {len(doc_ids)} documents (every place, training and held out)")


if __name__ == "__main__":
    main()
