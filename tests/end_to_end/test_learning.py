"""Learning, end to end, on the built-in tiny model: a stage1_2 run through the command line
learns to answer held-out questions from compressed documents, and the same trained model given
blank documents answers no better than a guess that never reads a document; a stage2 run on top,
with the retrieval loss, learns to find held-out places' documents among the whole example corpus.

Every bar is set against a baseline computed from the data, not against one machine's run: the
floating-point kernels torch picks for a processor (`ATEN_CPU_CAPABILITY`) change a 3,000-step
trajectory, so a figure measured on one CPU moves on another (README: "The learning figures").
CLARA_LEARNING_SEED runs the same tests with another seed.
"""

import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from clara.evaluation.metrics import normalize_answer
from tests.helpers import EXAMPLE, read_jsonl, run_module

TRAIN_FILE = EXAMPLE / "instruction_tuning_data.jsonl"
EVAL_FILE = EXAMPLE / "instruction_tuning_data_eval.jsonl"
# Every file a run on the example data trains on: a place named in none of them is held out.
TRAINING_FILES = (
    "pretrain_data.jsonl",
    "instruction_tuning_data.jsonl",
    "end_to_end_data.jsonl",
    "open_corpus_data.jsonl",
)
# The step at which the tiny model starts answering from memory depends on the seed and the CPU's
# kernels (spec section 8); with seeds 42 and 7 it passes 80% well before this many steps on every
# arithmetic tried (figures in the README).
STEPS = 3000
SEED = int(os.environ.get("CLARA_LEARNING_SEED", "42"))
# One epoch of the open-corpus questions would be 250 steps; the README's walk-through trains 2,000.
STAGE2_STEPS = 250
# A one-sided binomial test at this level separates "answers from somewhere" from a lucky guesser.
SIGNIFICANCE = 1e-3


def run(args: list[str]) -> None:
    result = run_module(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def evaluate(checkpoint: Path, dataset: Path, output: Path, *extra: str) -> dict:
    run(
        [
            "clara.evaluate",
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            str(dataset),
            "--output",
            str(output),
            "--max_new_tokens",
            "8",
            "--batch_size",
            "25",
            "--no_progress",
            *extra,
        ]
    )
    return json.loads(output.with_suffix(".summary.json").read_text())["metrics"]


def question_pattern(question: str) -> str:
    """The question without the place it names ("What is the main food of Povai?" -> "What is the main food of")."""
    return question.rsplit(" ", 1)[0]


def first_answer(record: dict) -> str:
    answers = record["answers"]
    return normalize_answer(answers if isinstance(answers, str) else answers[0])


def held_out_facts() -> list[dict]:
    """One question per fact of every place that no training file names, from its document in corpus.jsonl."""
    trained_text = "\n".join((EXAMPLE / name).read_text() for name in TRAINING_FILES)
    records = []
    for document in read_jsonl(EXAMPLE / "corpus.jsonl"):
        name, *sentences = document["text"].removesuffix(".").split(". ")
        name = name.split(" is ")[0]
        if f'"{name} is ' in trained_text or f". {name} is " in trained_text:
            continue
        for sentence in sentences:
            attribute, value = sentence.removeprefix("Its ").split(" is ")
            records.append({"question": f"What is the {attribute} of {name}?", "answers": value})
    return records


def answer_prior(questions: list[dict]) -> tuple[float, float]:
    """What a model that never reads a document can score on `questions`, learnt from the training answers.

    The best such model answers each question pattern with its most frequent training answer. Returns
    that guess's exact match on `questions`, and its expected hit rate (each pattern's top training
    frequency, averaged over the questions), the rate a lucky document-free guesser is tested against.
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in read_jsonl(TRAIN_FILE):
        counts[question_pattern(record["question"])][first_answer(record)] += 1
    hits, rate = 0, 0.0
    for record in questions:
        ((guess, top),) = counts[question_pattern(record["question"])].most_common(1)
        hits += guess == first_answer(record)
        rate += top / sum(counts[question_pattern(record["question"])].values())
    return hits / len(questions), rate / len(questions)


def chance_bound(rate: float, n: int) -> float:
    """The smallest score that a model hitting with probability `rate` reaches on `n` questions with probability
    at most SIGNIFICANCE (one-sided binomial tail): a score at or above it did not come from that model's luck."""
    tail = 1.0
    for k in range(n + 1):
        if tail <= SIGNIFICANCE:
            return k / n
        tail -= math.comb(n, k) * rate**k * (1 - rate) ** (n - k)
    return 1.0


def report(figures: dict) -> None:
    """One line per test that `pytest -s` shows: the figures the README's table quotes."""
    kernels = torch.backends.cpu.get_cpu_capability()
    print(f"\nlearning figures (seed {SEED}, CPU kernels {kernels}): {json.dumps(figures)}")


@pytest.fixture(scope="module")
def stage1_2(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("learning") / "stage1_2"
    run(
        [
            "clara.train",
            "--stage",
            "stage1_2",
            "--model_path",
            "tiny",
            "--allow_no_checkpoint",
            "true",
            "--max_steps",
            str(STEPS),
            "--max_epochs",
            "100",
            "--seed",
            str(SEED),
            "--debug_mode",
            "false",
            "--save_steps",
            str(STEPS),
            "--save_path",
            str(save),
        ]
    )
    return save


@pytest.mark.slow
def test_stage1_2_learns_to_answer_from_compressed_documents(stage1_2, tmp_path):
    with_documents = evaluate(stage1_2, EVAL_FILE, tmp_path / "with_documents.jsonl")["exact_match"]

    # Blank documents, over every fact of every held-out place: enough questions that a prior shows.
    questions = held_out_facts()
    n_docs = len(read_jsonl(EVAL_FILE)[0]["docs"])
    blank = tmp_path / "blank_docs.jsonl"
    blank.write_text("".join(json.dumps({**r, "docs": [""] * n_docs}) + "\n" for r in questions))
    without = evaluate(stage1_2, blank, tmp_path / "blank.jsonl")["exact_match"]
    prior, rate = answer_prior(questions)
    prior_bound, reading_bound = chance_bound(rate, len(questions)), chance_bound(without, 100)
    report(
        {
            "with_documents": with_documents,
            "blank_documents": round(without, 4),
            "blank_questions": len(questions),
            "prior": round(prior, 4),
            "prior_bound": prior_bound,
            "reading_bound": reading_bound,
        }
    )

    assert len(questions) >= 1000, f"{len(questions)} held-out facts in corpus.jsonl"
    assert without < prior_bound, (
        f"held-out exact match {without:.1%} from blank documents over {len(questions)} questions: the most frequent "
        f"training answer scores {prior:.1%}, and a guesser at its rate reaches {prior_bound:.1%} with probability "
        f"{SIGNIFICANCE}: the model answers from something other than the documents"
    )
    assert with_documents >= reading_bound, (
        f"held-out exact match {with_documents:.0%} from compressed documents, "
        f"{without:.1%} from blank ones: no better than without documents"
    )
    # 20 of the 100 held-out questions answered from the documents alone; measured gaps: 30 to 94 points.
    assert with_documents - without >= 0.2, (
        f"exact match {with_documents:.0%} with documents against {without:.0%} "
        f"without: too few answers come from the documents"
    )


@pytest.mark.slow
def test_stage2_with_the_retrieval_loss_finds_held_out_documents_in_the_whole_corpus(stage1_2, tmp_path):
    # Stage 2 keeps the compressor frozen: one index of the stage-1_2 compressor serves before and after training.
    index, save, dataset = tmp_path / "index", tmp_path / "stage2", EXAMPLE / "open_corpus_data_eval.jsonl"
    run(
        [
            "clara.index",
            "--checkpoint",
            str(stage1_2),
            "--corpus",
            str(EXAMPLE / "corpus.jsonl"),
            "--out",
            str(index),
            "--no_progress",
        ]
    )
    # Where stage 2 starts: the query reasoner a copy of the compressor.
    before = evaluate(stage1_2, dataset, tmp_path / "before.jsonl", "--index", str(index), "--stage", "stage2")
    run(
        [
            "clara.train",
            "--stage",
            "stage2",
            "--pretrain_checkpoint",
            str(stage1_2),
            "--retrieval_weight",
            "1",
            "--dataset",
            str(EXAMPLE / "open_corpus_data.jsonl"),
            "--max_steps",
            str(STAGE2_STEPS),
            "--seed",
            str(SEED),
            "--debug_mode",
            "false",
            "--save_steps",
            str(STAGE2_STEPS),
            "--save_path",
            str(save),
        ]
    )
    after = evaluate(save, dataset, tmp_path / "after.jsonl", "--index", str(index))
    names = ("recall@5", "open_recall@5")
    report(
        {
            **{f"{name} before": before[name] for name in names},
            **{name: after[name] for name in names},
            "open_recall@1": after["open_recall@1"],
            "open_exact_match": after["open_exact_match"],
        }
    )

    assert after["open_documents"] == 2400 and after["open_retrieval_samples"] == 100
    # Over the whole corpus: better than where stage 2 started, beyond what luck gives 100 questions.
    bound = chance_bound(before["open_recall@5"], after["open_retrieval_samples"])
    assert after["open_recall@5"] >= bound, (
        f"open-corpus recall@5 {after['open_recall@5']:.0%} after {STAGE2_STEPS} stage-2 steps, "
        f"{before['open_recall@5']:.0%} before: no better than the query reasoner that stage 2 starts from"
    )
    # Among each question's candidates, where the compressor copy may already rank well: far above chance.
    candidates = [len(r["docs"]) for r in read_jsonl(dataset)]
    chance = sum(min(1.0, 5 / n) for n in candidates) / len(candidates)
    assert after["recall@5"] >= chance_bound(chance, len(candidates)), (
        f"closed-candidate recall@5 {after['recall@5']:.0%} against {chance:.0%} by chance"
    )
