"""Write the example data as a data set in the Hub layout of apple/CLaRa_multi_stage (same configurations
and fields), so that training with `hf:DIR:CONFIG` and `python -m clara.benchmark --data DIR` can be tried
without the Hub:

    python example/make_hub_copy.py data/clara_example_hub

`pretraining` <- pretrain_data.jsonl; `instruction_tuning` <- instruction_tuning_data.jsonl;
`inst_eval_{nq,hotpotqa,musique,2wiki}_*` <- a quarter of instruction_tuning_data_eval.jsonl each;
`e2e_training_ours_*` and `e2e_eval_ours_*` <- quarters of end_to_end_data(_eval).jsonl. `with_pos` keeps
the records as they are (the relevant document is among the documents: the paper's oracle setting);
`no_pos` puts a document about another place in its stead (the normal setting: nothing to find) and
empties pos_index. The four "data sets" are slices of the same synthetic data, not the paper's sets.
"""

import json
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent
QA_SETS = ("nq", "hotpotqa", "musique", "2wiki")


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLE / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def place(question: str) -> str:
    """Every example question ends with the place it asks about."""
    return question.rstrip("?").split()[-1]


def without_positive(docs: list[str], question: str, stranger: str) -> list[str]:
    return [stranger if doc.startswith(place(question) + " ") else doc for doc in docs]


def inst(record: dict) -> dict:
    return {"question": record["question"], "docs": record["docs"], "gold_answer": record["answers"],
            "answer": record["answers"]}


def e2e(record: dict) -> dict:
    return {"question": record["question"], "answer": record["gold_answer"], "docs": record["docs"],
            "pos_index": record["pos_index"]}


def no_pos(record: dict, stranger: str) -> dict:
    return {**record, "docs": without_positive(record["docs"], record["question"], stranger),
            **({"pos_index": []} if "pos_index" in record else {})}


def main(out: Path) -> None:
    configs = {"pretraining": read("pretrain_data.jsonl"),
               "instruction_tuning": [inst(r) for r in read("instruction_tuning_data.jsonl")]}
    sources = {"inst_eval": [inst(r) for r in read("instruction_tuning_data_eval.jsonl")],
               "e2e_training_ours": [e2e(r) for r in read("end_to_end_data.jsonl")],
               "e2e_eval_ours": [e2e(r) for r in read("end_to_end_data_eval.jsonl")]}
    for prefix, records in sources.items():
        size = len(records) // len(QA_SETS)
        for n, dataset in enumerate(QA_SETS):
            part = records[n * size:(n + 1) * size]
            # A document of the next slice: about a place that no question of this slice asks about.
            stranger = records[((n + 1) % len(QA_SETS)) * size]["docs"][0]
            configs[f"{prefix}_{dataset}_with_pos"] = part
            configs[f"{prefix}_{dataset}_no_pos"] = [no_pos(r, stranger) for r in part]
    readme = ["---", "configs:"]
    for config, records in configs.items():
        path = out / config / "train-00000.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        readme += [f"- config_name: {config}", "  data_files:", "  - split: train", f"    path: {config}/*.jsonl"]
    note = "The CLaRa example data in the layout of apple/CLaRa_multi_stage (example/make_hub_copy.py)."
    readme += ["---", "", note, ""]
    (out / "README.md").write_text("\n".join(readme), encoding="utf-8")
    print(f"Wrote {len(configs)} configurations to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python example/make_hub_copy.py OUT_DIR")
    main(Path(sys.argv[1]))
