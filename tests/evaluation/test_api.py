"""The official CLaRa inference API on `clara.CLaRa`, and answer scoring against several gold answers.

Every call of the official README (and its generate_from_compressed_documents_and_questions) is
made with the official argument names, and its return types are checked, on tiny checkpoints
trained here for two optimizer steps (stage1_2 from scratch, then stage2 from it). The models are
untrained for practical purposes: the tests check shapes, types and agreement between code paths
(vectors computed earlier vs. text, the API vs. clara.evaluation.command), not answer quality. Each test runs
on the CPU and, where there is one, on a CUDA device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from clara import CLaRa
from clara.data.load import load_records
from clara.data.spec import parse_source
from clara.evaluation import command as evaluate
from clara.evaluation.evaluate import EvalSettings, evaluate_stage
from clara.evaluation.metrics import ANSWER_SCORE_NAMES, f1_score
from clara.model.collate import encode_documents
from clara.stages import get_stage
from tests.helpers import REPO, read_jsonl

EXAMPLE = REPO / "example"
QUESTIONS = 3  # questions asked in each test; their records hold 2 (stage1_2) or 20 (stage2) documents
NEW_TOKENS = 8
# Every call below fits in one micro-batch, so that two code paths given the same inputs see the
# same batches and padding, and agree exactly.
BATCH = 8
WRONG_GOLD = "qqqzzz xxxqqq"  # made-up words: no answer here contains them

DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoints(trained_checkpoints) -> dict[str, Path]:
    """stage1_2 (fresh adapters) -> stage2, two optimizer steps each: the session's shared model (tests/conftest.py)."""
    return trained_checkpoints


@pytest.fixture(scope="module")
def qa_records() -> list[dict]:
    return read_jsonl(EXAMPLE / "instruction_tuning_data_eval.jsonl")[:QUESTIONS]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_official_stage1_2_calls(device, checkpoints, qa_records):
    model = CLaRa.from_pretrained(str(checkpoints["stage1_2"]), device=device, batch_size=BATCH)
    questions = [r["question"] for r in qa_records]
    documents = [r["docs"] for r in qa_records]
    flat = [d for docs in documents for d in docs]
    n, hidden = model.model.tokens.n_mem, model.model.hidden_size

    # compress_documents(documents=...) -> (embeddings [D, n, H], mse)
    embeddings, mse = model.compress_documents(documents=flat)
    assert embeddings.shape == (len(flat), n, hidden) and embeddings.device.type == device
    assert isinstance(mse, torch.Tensor) and mse.dim() == 0 and mse.dtype == torch.float32
    assert math.isfinite(mse.item()) and mse.item() > 0
    # The MSE is the compressor's alignment loss over all the documents: what the model computes
    # for them in one batch, and the mean of the per-document values.
    ids, mask, _ = encode_documents(
        model.model.tokenizer, model.model.tokens, flat, model.model.settings.doc_max_length
    )
    with torch.no_grad():
        _, expected = model.model.compress(ids.to(model.device), mask.to(model.device), with_mse=True)
    assert mse.item() == pytest.approx(expected.item(), rel=1e-2 if device == "cuda" else 1e-4)
    one_by_one = CLaRa(model.model, stage=model.stage, device=device, batch_size=1)
    per_document = [one_by_one.compress_documents(documents=[d])[1].item() for d in flat]
    assert mse.item() == pytest.approx(sum(per_document) / len(flat), rel=2e-2 if device == "cuda" else 1e-4)

    # generate_from_text(questions=..., documents=..., max_new_tokens=...) -> list of answers
    answers = model.generate_from_text(questions=questions, documents=documents, max_new_tokens=NEW_TOKENS)
    assert isinstance(answers, list) and len(answers) == QUESTIONS and all(isinstance(a, str) for a in answers)
    # Our earlier positional form still works.
    assert model.generate_from_text(questions, documents, NEW_TOKENS) == answers

    # generate_from_compressed_documents_and_questions: vectors computed earlier give the same answers.
    from_vectors = model.generate_from_compressed_documents_and_questions(
        questions=questions, compressed_documents=embeddings, max_new_tokens=NEW_TOKENS
    )
    assert from_vectors == answers
    # With the official default of 128 new tokens, and from vectors kept on the CPU.
    longer = model.generate_from_compressed_documents_and_questions(
        questions=questions, compressed_documents=embeddings.cpu()
    )
    assert len(longer) == QUESTIONS and all(long.startswith(short) for long, short in zip(longer, answers))
    with pytest.raises(ValueError, match="compressed_documents: expected a tensor"):
        model.generate_from_compressed_documents_and_questions(
            questions=questions, compressed_documents=embeddings[:-1]
        )
    with pytest.raises(ValueError, match="compressed_documents: expected a tensor"):
        model.generate_from_compressed_documents_and_questions(
            questions=questions[:1], compressed_documents=embeddings[:, :-1]
        )
    with pytest.raises(TypeError, match="the embeddings of `embeddings, mse"):  # the whole pair passed
        model.generate_from_compressed_documents_and_questions(
            questions=questions, compressed_documents=(embeddings, mse)
        )

    # generate_from_paraphrase(questions=..., documents=..., max_new_tokens=...), as in the README:
    # one (unused) question per list of documents.
    paraphrase_docs = [[flat[0]], flat[1:3]]
    paraphrases = model.generate_from_paraphrase(
        questions=["" for _ in paraphrase_docs], documents=paraphrase_docs, max_new_tokens=NEW_TOKENS
    )
    assert isinstance(paraphrases, list) and len(paraphrases) == 2 and all(isinstance(p, str) for p in paraphrases)
    # The question text plays no part, and a single document may be given as a string.
    assert (
        model.generate_from_paraphrase(
            questions=["q1", "q2"], documents=[flat[0], flat[1:3]], max_new_tokens=NEW_TOKENS
        )
        == paraphrases
    )
    with pytest.raises(ValueError, match="1 questions but 2 document lists"):
        model.generate_from_paraphrase(questions=[""], documents=paraphrase_docs)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_official_stage2_call_and_agreement_with_evaluate(device, checkpoints, tmp_path):
    records = read_jsonl(EXAMPLE / "end_to_end_data_eval.jsonl")[:QUESTIONS]
    model = CLaRa.from_pretrained(str(checkpoints["stage2"]), device=device, batch_size=BATCH)
    questions = [r["question"] for r in records]
    documents = [r["docs"] for r in records]
    k = model.model.settings.generation_top_k

    # generate_from_questions(questions=..., documents=..., max_new_tokens=...) -> (answers, topk_indices)
    answers, topk_indices = model.generate_from_questions(
        questions=questions, documents=documents, max_new_tokens=NEW_TOKENS
    )
    assert isinstance(answers, list) and len(answers) == QUESTIONS and all(isinstance(a, str) for a in answers)
    assert isinstance(topk_indices, torch.Tensor) and topk_indices.dtype == torch.long
    assert topk_indices.shape == (QUESTIONS, k)
    for row, docs in zip(topk_indices.tolist(), documents):
        assert len(set(row)) == k and all(0 <= i < len(docs) for i in row)
    # Our earlier positional form still works.
    again, indices_again = model.generate_from_questions(questions, documents, NEW_TOKENS)
    assert again == answers and torch.equal(indices_again, topk_indices)

    # clara.evaluation.command (the trainer's evaluation too) picks the same documents and gives the same answers.
    path = write_jsonl(tmp_path / "stage2.jsonl", records)
    settings = EvalSettings(
        batch_size=BATCH, generate_limit=QUESTIONS, max_new_tokens=NEW_TOKENS, max_len=1024, seed=42
    )
    rows = evaluate_stage(
        model.model,
        load_records(get_stage("stage2"), parse_source(str(path)), min_docs=k, log=lambda *a: None),
        get_stage("stage2"),
        settings,
        device=model.device,
        show_progress=False,
    )["samples"]
    assert [r["prediction"] for r in rows] == answers
    assert [r["chosen"] for r in rows] == topk_indices.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_readme_loading_pattern_moves_to_the_device(device, checkpoints, qa_records):
    """`model = ...from_pretrained(path).to(device)`, as the official README writes it."""
    model = CLaRa.from_pretrained(str(checkpoints["stage1_2"]), device="cpu").to(device)
    assert model.device.type == device
    embeddings, _ = model.compress_documents(documents=qa_records[0]["docs"])
    assert embeddings.device.type == device
    answers = model.generate_from_compressed_documents_and_questions(
        questions=[qa_records[0]["question"]], compressed_documents=embeddings, max_new_tokens=NEW_TOKENS
    )
    assert answers == model.generate_from_text(
        questions=[qa_records[0]["question"]], documents=[qa_records[0]["docs"]], max_new_tokens=NEW_TOKENS
    )


@pytest.mark.slow
def test_summary_scores_the_first_gold_and_the_best_of_all(checkpoints, qa_records, tmp_path):
    """A dataset whose second gold answer is the model's own prediction: the first-gold scores miss,
    the *_any scores hit. Runs clara.evaluation.evaluate's evaluate_stage, which the trainer's evaluation uses."""
    model = CLaRa.from_pretrained(str(checkpoints["stage1_2"]), device="cpu", batch_size=BATCH)
    questions = [r["question"] for r in qa_records]
    documents = [r["docs"] for r in qa_records]
    predictions = model.generate_from_text(questions=questions, documents=documents, max_new_tokens=NEW_TOKENS)

    # golden_answers (a list) is one of the accepted answer fields; one more record is not generated.
    extra = read_jsonl(EXAMPLE / "instruction_tuning_data_eval.jsonl")[QUESTIONS]
    lines = [
        {"question": q, "golden_answers": [WRONG_GOLD, p], "docs": d}
        for q, p, d in zip(questions, predictions, documents)
    ]
    lines.append(
        {"question": extra["question"], "golden_answers": [extra["answers"], WRONG_GOLD], "docs": extra["docs"]}
    )
    records = load_records(
        get_stage("stage1_2"), parse_source(str(write_jsonl(tmp_path / "golds.jsonl", lines))), log=lambda *a: None
    )
    assert records[0]["answer"] == WRONG_GOLD and records[0]["answers"] == [WRONG_GOLD, predictions[0]]

    settings = EvalSettings(
        batch_size=BATCH, generate_limit=QUESTIONS, max_new_tokens=NEW_TOKENS, max_len=2048, seed=42
    )
    results = evaluate_stage(model.model, records, get_stage("stage1_2"), settings, show_progress=False)
    rows, summary = results["samples"], results["summary"]
    assert [r["prediction"] for r in rows[:QUESTIONS]] == predictions
    for row, prediction in zip(rows, predictions):
        assert row["answer"] == WRONG_GOLD and row["answers"] == [WRONG_GOLD, prediction]
        assert (row["exact_match"], row["f1"], row["cover_exact_match"]) == (0.0, 0.0, 0.0)
        assert (row["exact_match_any"], row["cover_exact_match_any"]) == (1.0, 1.0)
        assert row["f1_any"] == f1_score(prediction, prediction)
    last = rows[QUESTIONS]
    assert last["prediction"] is None and all(last[name] is None for name in ANSWER_SCORE_NAMES)

    assert summary["generated"] == QUESTIONS
    assert (summary["exact_match"], summary["f1"], summary["cover_exact_match"]) == (0.0, 0.0, 0.0)
    assert summary["exact_match_any"] == 1.0 and summary["cover_exact_match_any"] == 1.0
    assert summary["f1_any"] == pytest.approx(sum(r["f1_any"] for r in rows[:QUESTIONS]) / QUESTIONS)
    table = evaluate.format_table(summary)
    for name in ANSWER_SCORE_NAMES:
        assert f"{name} " in table
    assert any(line.split() == ["exact_match_any", "100.00%"] for line in table.splitlines())
