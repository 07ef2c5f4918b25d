"""The invented corpus behind the example data and the built-in tiny model.

Each document describes one invented place with a few key-value facts, e.g.
"Vorlan is a kingdom. Its sacred animal is owl. Its main food is rice.", and every question
asks for one fact of one named place, so it can only be answered by reading that place's
document. In instruction-tuning and end-to-end samples the other documents do not state the
asked fact at all.
"""

import random

ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "th",
    "sh",
    "st",
    "tr",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd"]

KINDS = ["kingdom", "village", "island", "city", "valley", "republic", "harbor", "fortress"]

# Two-word attribute names keep documents in the 80-160 character range with 3-4 facts.
# Sixteen values per attribute: a model that guesses without reading the document (e.g. from a
# blank one) is right about 6% of the time, so exact match from documents shows real reading.
ATTRIBUTES = {
    "banner color": [
        "red",
        "blue",
        "green",
        "yellow",
        "purple",
        "orange",
        "white",
        "grey",
        "black",
        "pink",
        "brown",
        "teal",
        "crimson",
        "amber",
        "indigo",
        "scarlet",
    ],
    "sacred animal": [
        "owl",
        "fox",
        "wolf",
        "bear",
        "horse",
        "eagle",
        "otter",
        "deer",
        "swan",
        "hawk",
        "lion",
        "tiger",
        "raven",
        "crane",
        "seal",
        "goat",
    ],
    "main food": [
        "rice",
        "bread",
        "cheese",
        "honey",
        "plums",
        "beans",
        "fish",
        "soup",
        "apples",
        "corn",
        "dates",
        "figs",
        "lamb",
        "nuts",
        "pears",
        "eggs",
    ],
    "chief metal": [
        "gold",
        "silver",
        "copper",
        "iron",
        "tin",
        "bronze",
        "lead",
        "zinc",
        "nickel",
        "steel",
        "brass",
        "cobalt",
        "platinum",
        "chrome",
        "titanium",
        "pewter",
    ],
    "national flower": [
        "rose",
        "lily",
        "tulip",
        "daisy",
        "iris",
        "lotus",
        "poppy",
        "violet",
        "orchid",
        "aster",
        "lilac",
        "peony",
        "dahlia",
        "jasmine",
        "clover",
        "heather",
    ],
    "lucky number": [
        "three",
        "five",
        "seven",
        "nine",
        "twelve",
        "twenty",
        "forty",
        "sixty",
        "two",
        "four",
        "six",
        "eight",
        "ten",
        "eleven",
        "thirty",
        "fifty",
    ],
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

N_STAGE2_CANDIDATES = 20


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def invent_names(rng: random.Random, count: int) -> list[str]:
    # Seeding with the vocabulary keeps a name from reading as a value, e.g. "Rose".
    names: set[str] = set(KINDS) | {v for values in ATTRIBUTES.values() for v in values}
    ordered: list[str] = []
    while len(ordered) < count:
        syllables = rng.choice([2, 2, 3])
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
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


def pick_fact(rng: random.Random, entity: dict) -> str:
    return rng.choice(list(entity["facts"]))


def distractors(rng: random.Random, entities: list[dict], entity: dict, attr: str, count: int) -> list[dict]:
    """Other places whose documents lack `attr`, so that only `entity`'s document answers.

    A distractor stating the same attribute would make the question hinge on matching the
    place's name across documents, which a two-layer tiny model cannot learn in minutes.
    """
    pool = [e for e in entities if e is not entity and attr not in e["facts"]]
    return rng.sample(pool, count)


def paraphrase(rng: random.Random, entity: dict) -> str:
    name = entity["name"]
    facts = [
        rng.choice(PARAPHRASE_FACT).format(attr=attr, name=name, value=value) for attr, value in entity["facts"].items()
    ]
    rng.shuffle(facts)
    intro = rng.choice(PARAPHRASE_INTRO).format(name=name, article=article(entity["kind"]), kind=entity["kind"])
    sentences = [intro] + facts if rng.random() < 0.6 else facts + [intro]
    return " ".join(sentences)


def pretrain_records(rng: random.Random, entities: list[dict], count: int) -> list[dict]:
    records = []
    for entity in rng.sample(entities, count):
        if rng.random() < 0.8:
            candidates = list(entity["facts"]) + [KIND_QUESTION]
            attrs = rng.sample(candidates, rng.choice([2, 3]))
            pairs = [question_answer(entity, attr) for attr in attrs]
            records.append(
                {
                    "data_type": "qa",
                    "question": [q for q, _ in pairs],
                    "answers": [a for _, a in pairs],
                    "docs": [entity["doc"]],
                }
            )
        else:
            records.append(
                {
                    "data_type": "paraphrase",
                    "docs": [entity["doc"]],
                    "answers": [paraphrase(rng, entity)],
                }
            )
    return records


def instruction_records(rng: random.Random, entities: list[dict], count: int) -> list[dict]:
    records = []
    for entity in rng.sample(entities, count):
        attr = pick_fact(rng, entity)
        question, answer = question_answer(entity, attr)
        docs = [entity["doc"], distractors(rng, entities, entity, attr, 1)[0]["doc"]]
        rng.shuffle(docs)
        records.append({"question": question, "answers": answer, "docs": docs})
    return records


def end_to_end_records(rng: random.Random, entities: list[dict], count: int) -> list[dict]:
    records = []
    for entity in rng.sample(entities, count):
        attr = pick_fact(rng, entity)
        question, answer = question_answer(entity, attr)
        others = distractors(rng, entities, entity, attr, N_STAGE2_CANDIDATES - 1)
        position = rng.randrange(N_STAGE2_CANDIDATES)
        docs = [e["doc"] for e in others]
        docs.insert(position, entity["doc"])
        records.append({"question": question, "gold_answer": answer, "docs": docs, "pos_index": [position]})
    return records
