"""Learning, end to end, on the built-in tiny model: a stage1_2 run through the command line
learns to answer held-out questions from compressed documents, and the same trained model given
blank documents cannot, so its answers come from the documents and not from a prior over the
answer vocabulary (16 values per fact, so guessing scores about 6%).
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EVAL_FILE = REPO / "example" / "instruction_tuning_data_eval.jsonl"
# The step at which the tiny model starts answering from memory depends on the seed (spec
# section 8); with this seed it passes 80% well before this many steps (figures in the README).
STEPS = 3000
SEED = 42


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def exact_match(checkpoint: Path, dataset: Path, output: Path) -> float:
    run(["-m", "clara.evaluate", "--checkpoint", str(checkpoint), "--dataset", str(dataset),
         "--output", str(output), "--max_new_tokens", "8", "--batch_size", "25", "--no_progress"], REPO)
    return json.loads(output.with_suffix(".summary.json").read_text())["metrics"]["exact_match"]


def test_stage1_2_learns_to_answer_from_compressed_documents(tmp_path):
    save = tmp_path / "stage1_2"
    run(["-m", "clara.train", "--stage", "stage1_2", "--model_path", "tiny", "--allow_no_checkpoint", "true",
         "--max_steps", str(STEPS), "--max_epochs", "100", "--seed", str(SEED), "--debug_mode", "false",
         "--save_steps", str(STEPS), "--save_path", str(save)], REPO)

    records = [json.loads(line) for line in EVAL_FILE.read_text().splitlines() if line.strip()]
    blank = tmp_path / "blank_docs.jsonl"
    blank.write_text("".join(json.dumps({**r, "docs": [""] * len(r["docs"])}) + "\n" for r in records))

    with_documents = exact_match(save, EVAL_FILE, tmp_path / "with_documents.jsonl")
    without = exact_match(save, blank, tmp_path / "blank.jsonl")
    assert with_documents >= 0.8, f"held-out exact match {with_documents:.0%} from compressed documents"
    assert without < 0.1, f"held-out exact match {without:.0%} from blank documents"
