"""Learning, end to end, on the built-in tiny model: a stage1_2 run through the command line
learns to answer held-out questions from compressed documents, and the same trained model given
blank documents cannot, so its answers come from the documents and not from a prior over the
answer vocabulary (16 values per fact, so guessing scores about 6%). A stage2 run on top, with the
retrieval loss, learns to find held-out places' documents among the whole example corpus.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "example"
EVAL_FILE = EXAMPLE / "instruction_tuning_data_eval.jsonl"
# The step at which the tiny model starts answering from memory depends on the seed (spec
# section 8); with this seed it passes 80% well before this many steps (figures in the README).
STEPS = 3000
SEED = 42
# One epoch of the open-corpus questions would be 250 steps; the README's walk-through trains 2,000.
STAGE2_STEPS = 250


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def exact_match(checkpoint: Path, dataset: Path, output: Path) -> float:
    run(["-m", "clara.evaluate", "--checkpoint", str(checkpoint), "--dataset", str(dataset),
         "--output", str(output), "--max_new_tokens", "8", "--batch_size", "25", "--no_progress"], REPO)
    return json.loads(output.with_suffix(".summary.json").read_text())["metrics"]["exact_match"]


@pytest.fixture(scope="module")
def stage1_2(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("learning") / "stage1_2"
    run(["-m", "clara.train", "--stage", "stage1_2", "--model_path", "tiny", "--allow_no_checkpoint", "true",
         "--max_steps", str(STEPS), "--max_epochs", "100", "--seed", str(SEED), "--debug_mode", "false",
         "--save_steps", str(STEPS), "--save_path", str(save)], REPO)
    return save


@pytest.mark.slow
def test_stage1_2_learns_to_answer_from_compressed_documents(stage1_2, tmp_path):
    save = stage1_2

    records = [json.loads(line) for line in EVAL_FILE.read_text().splitlines() if line.strip()]
    blank = tmp_path / "blank_docs.jsonl"
    blank.write_text("".join(json.dumps({**r, "docs": [""] * len(r["docs"])}) + "\n" for r in records))

    with_documents = exact_match(save, EVAL_FILE, tmp_path / "with_documents.jsonl")
    without = exact_match(save, blank, tmp_path / "blank.jsonl")
    assert with_documents >= 0.8, f"held-out exact match {with_documents:.0%} from compressed documents"
    assert without < 0.1, f"held-out exact match {without:.0%} from blank documents"


@pytest.mark.slow
def test_stage2_with_the_retrieval_loss_finds_held_out_documents_in_the_whole_corpus(stage1_2, tmp_path):
    save, index = tmp_path / "stage2", tmp_path / "index"
    run(["-m", "clara.train", "--stage", "stage2", "--pretrain_checkpoint", str(stage1_2), "--retrieval_weight", "1",
         "--dataset", str(EXAMPLE / "open_corpus_data.jsonl"), "--max_steps", str(STAGE2_STEPS), "--seed", str(SEED),
         "--debug_mode", "false", "--save_steps", str(STAGE2_STEPS), "--save_path", str(save)], REPO)
    run(["-m", "clara.index", "--checkpoint", str(save), "--corpus", str(EXAMPLE / "corpus.jsonl"), "--out", str(index),
         "--no_progress"], REPO)
    output = tmp_path / "open.jsonl"
    run(["-m", "clara.evaluate", "--checkpoint", str(save), "--dataset", str(EXAMPLE / "open_corpus_data_eval.jsonl"),
         "--index", str(index), "--output", str(output), "--max_new_tokens", "8", "--batch_size", "25",
         "--no_progress"], REPO)
    metrics = json.loads(output.with_suffix(".summary.json").read_text())["metrics"]
    # Chance: 5 of 2,400 documents (0.2%) over the corpus, 5 of 20 candidates (25%) in the closed set.
    # Measured with this seed: open recall@5 86%, closed 100% (README: "On CPU, from training to asking").
    assert metrics["open_documents"] == 2400 and metrics["open_retrieval_samples"] == 100
    assert metrics["recall@5"] >= 0.8, f"closed-candidate recall@5 {metrics['recall@5']:.0%}"
    assert metrics["open_recall@5"] >= 0.5, f"open-corpus recall@5 {metrics['open_recall@5']:.0%}"
