"""Generate the synthetic example data for every training stage.

Each document describes one invented place with a few key-value facts, e.g.
"Vorlan is a kingdom. Its sacred animal is owl. Its main food is rice.", and every
question asks for one fact of one named place, so it can only be answered by reading that
place's document. Held-out files use places that never occur in the training files.

Run `python example/make_data.py`; the output is the same on every run (fixed seed).
"""

import json
import random
from pathlib import Path

SEED = 20240517
OUT_DIR = Path(__file__).resolve().parent

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kr", "th", "sh", "st", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd"]

KINDS = ["kingdom", "village", "island", "city", "valley", "republic", "harbor", "fortress"]

# Two-word attribute names keep documents in the 80-160 character range with 3-4 facts.
ATTRIBUTES = {
    "banner color": ["red", "blue", "green", "yellow", "purple", "orange", "white", "grey"],
    "sacred animal": ["owl", "fox", "wolf", "bear", "horse", "eagle", "otter", "deer", "swan"],
    "main food": ["rice", "bread", "cheese", "honey", "plums", "beans", "fish", "soup"],
    "chief metal": ["gold", "silver", "copper", "iron", "tin", "bronze"],
    "national flower": ["rose", "lily", "tulip", "daisy", "iris", "lotus", "poppy", "violet"],
    "lucky number": ["three", "five", "seven", "nine", "twelve", "twenty", "forty", "sixty"],
}

KIND_QUESTION = "kind"

PARAPHRASE_FACT = [
    "The {attr} of {name} is {value}.",
    "{name}'s {attr} is {value}.",
    "For {name}, the {attr} is {value}.",
    "{name} has {value} as its {attr}.",
]
PARAPHRASE_INTRO = [
    "{name} is {article} {kind}.",
    "There is {article} {kind} called {name}.",
    "{name} is known as {article} {kind}.",
]

N_TRAIN_ENTITIES = 2000
N_EVAL_ENTITIES = 400
N_STAGE2_CANDIDATES = 20

SIZES = {
    "pretrain": (1500, 100),
    "instruction_tuning": (1500, 100),
    "end_to_end": (400, 100),
}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def invent_names(rng: random.Random, count: int) -> list[str]:
    # Seeding with the vocabulary keeps a name from reading as a value, e.g. "Rose".
    names: set[str] = set(KINDS) | {v for values in ATTRIBUTES.values() for v in values}
    ordered: list[str] = []
    while len(ordered) < count:
        syllables = rng.choice([2, 2, 3])
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                       for _ in range(syllables))
        # Long names make documents needlessly long for a tiny tokenizer.
        if len(name) > 10 or name in names:
            continue
        names.add(name)
        ordered.append(name.capitalize())
    return ordered


def make_entity(rng: random.Random, name: str) -> dict:
    kind = rng.choice(KINDS)
    attrs = rng.sample(list(ATTRIBUTES), rng.choice([3, 4]))
    facts = {attr: rng.choice(ATTRIBUTES[attr]) for attr in attrs}
    sentences = [f"{name} is {article(kind)} {kind}."]
    sentences += [f"Its {attr} is {value}." for attr, value in facts.items()]
    return {"name": name, "kind": kind, "facts": facts, "doc": " ".join(sentences)}


def question_answer(entity: dict, attr: str) -> tuple[str, str]:
    if attr == KIND_QUESTION:
        return f"What kind of place is {entity['name']}?", entity["kind"]
    return f"What is the {attr} of {entity['name']}?", entity["facts"][attr]


def pick_attribute(rng: random.Random, entity: dict) -> str:
    # The kind question is rarer than the fact questions: facts are what a reader must find.
    if rng.random() < 0.1:
        return KIND_QUESTION
    return rng.choice(list(entity["facts"]))


def paraphrase(rng: random.Random, entity: dict) -> str:
    name = entity["name"]
    facts = [rng.choice(PARAPHRASE_FACT).format(attr=attr, name=name, value=value)
             for attr, value in entity["facts"].items()]
    rng.shuffle(facts)
    intro = rng.choice(PARAPHRASE_INTRO).format(
        name=name, article=article(entity["kind"]), kind=entity["kind"])
    sentences = [intro] + facts if rng.random() < 0.6 else facts + [intro]
    return " ".join(sentences)


def pretrain_records(rng: random.Random, entities: list[dict], count: int) -> list[dict]:
    records = []
    for entity in rng.sample(entities, count):
        if rng.random() < 0.8:
            candidates = list(entity["facts"]) + [KIND_QUESTION]
            attrs = rng.sample(candidates, rng.choice([2, 3]))
            pairs = [question_answer(entity, attr) for attr in attrs]
            records.append({
                "data_type": "qa",
                "question": [q for q, _ in pairs],
                "answers": [a for _, a in pairs],
                "docs": [entity["doc"]],
            })
        else:
            records.append({
                "data_type": "paraphrase",
                "docs": [entity["doc"]],
                "answers": [paraphrase(rng, entity)],
            })
    return records


def instruction_records(rng: random.Random, entities: list[dict], count: int) -> list[dict]:
    records = []
    for entity in rng.sample(entities, count):
        distractor = rng.choice([e for e in entities if e is not entity])
        question, answer = question_answer(entity, pick_attribute(rng, entity))
        docs = [entity["doc"], distractor["doc"]]
        rng.shuffle(docs)
        records.append({"question": question, "answers": answer, "docs": docs})
    return records


def end_to_end_records(rng: random.Random, entities: list[dict], count: int) -> list[dict]:
    records = []
    for entity in rng.sample(entities, count):
        others = rng.sample([e for e in entities if e is not entity], N_STAGE2_CANDIDATES - 1)
        position = rng.randrange(N_STAGE2_CANDIDATES)
        docs = [e["doc"] for e in others]
        docs.insert(position, entity["doc"])
        question, answer = question_answer(entity, pick_attribute(rng, entity))
        records.append({"question": question, "gold_answer": answer, "docs": docs,
                        "pos_index": [position]})
    return records


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
    for stem, build in builders.items():
        for suffix, pool in splits.items():
            count = SIZES[stem][0] if suffix == "" else SIZES[stem][1]
            records = build(rng, pool, count)
            path = OUT_DIR / f"{stem}_data{suffix}.jsonl"
            write_jsonl(path, records)
            print(summary(path, records))


if __name__ == "__main__":
    main()
