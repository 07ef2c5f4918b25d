"""Generate the synthetic example data for every training stage (see clara/synthetic.py).

Held-out files use places that never occur in the training files. corpus.jsonl holds every
place's document with an id (`{"id": "place-0000", "text": ...}`), for `python -m clara.index`;
the held-out stage2 questions name their gold documents' ids (`gold_ids`) for open-corpus evaluation.
Run `python example/make_data.py`; the output is the same on every run (fixed seed).
"""

import json
import random
from pathlib import Path

from clara.synthetic import end_to_end_records, instruction_records, invent_names, make_entity, pretrain_records

SEED = 20240517
OUT_DIR = Path(__file__).resolve().parent

N_TRAIN_ENTITIES = 2000
N_EVAL_ENTITIES = 400

SIZES = {
    "pretrain": (1500, 100),
    "instruction_tuning": (1500, 100),
    "end_to_end": (400, 100),
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
    path = OUT_DIR / "corpus.jsonl"
    write_jsonl(path, [{"id": doc_id, "text": doc} for doc, doc_id in doc_ids.items()])
    print(f"{path.name}: {len(doc_ids)} documents (every place, training and held out)")


if __name__ == "__main__":
    main()
