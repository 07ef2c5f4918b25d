"""Answers decoded each their own way in one batch (clara/decoding.py through ClaraModel.generate(rows=...)):
greedy rows unchanged, seeded sampling reproducible, stop strings, token limits, streaming, cancellation."""

import pytest

from clara.model.decoding import RowDecoding, Sampling, cut_at_stop
from tests.model.test_model import make_batch, read_records, stage_model

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_and_batch():
    model = stage_model("stage1_2", seed=3).eval()
    return model, make_batch(model, "stage1_2", read_records("stage1_2", 3), with_targets=False)


def test_greedy_rows_answer_as_generate_without_rows(model_and_batch):
    model, batch = model_and_batch
    plain, _ = model.generate(batch, max_new_tokens=NEW_TOKENS)
    rows = [RowDecoding(Sampling(max_new_tokens=NEW_TOKENS)) for _ in plain]
    assert model.generate(batch, rows=rows)[0] == plain
    assert all(row.finish_reason in ("stop", "length") for row in rows)
    assert any(row.text for row in rows)


def test_seeded_sampling_is_reproducible_and_leaves_greedy_rows_alone(model_and_batch):
    model, batch = model_and_batch
    plain, _ = model.generate(batch, max_new_tokens=NEW_TOKENS)

    def sampled(seed: int) -> list[str]:
        rows = [
            RowDecoding(Sampling(NEW_TOKENS, temperature=1.5, top_p=0.95, seed=seed)),
            RowDecoding(Sampling(NEW_TOKENS)),
            RowDecoding(Sampling(NEW_TOKENS, temperature=1.5, seed=seed)),
        ]
        return model.generate(batch, rows=rows)[0]

    first = sampled(1)
    assert sampled(1) == first
    assert first[1] == plain[1]
    assert [sampled(seed) for seed in (2, 3, 4)] != [first] * 3


def test_stop_strings_limits_and_streaming(model_and_batch):
    model, batch = model_and_batch
    plain, _ = model.generate(batch, max_new_tokens=NEW_TOKENS)
    long = max(range(len(plain)), key=lambda i: len(plain[i]))
    stop = plain[long][len(plain[long]) // 2 :][:2]
    pieces: list[list[str]] = [[] for _ in plain]
    rows = [RowDecoding(Sampling(1 if i != long else NEW_TOKENS), on_text=pieces[i].append) for i in range(len(plain))]
    texts, _ = model.generate(batch, rows=rows)
    assert texts[long] == plain[long] and len(pieces[long]) > 1  # streamed token by token, not at the end
    assert all(len(row.tokens) <= 1 and plain[i].startswith(texts[i]) for i, row in enumerate(rows) if i != long)
    assert ["".join(p) for p in pieces] == texts
    rows = [RowDecoding(Sampling(NEW_TOKENS, stop=(stop,) if i == long else ())) for i in range(len(plain))]
    texts, _ = model.generate(batch, rows=rows)
    assert texts[long] == plain[long][: cut_at_stop(plain[long], (stop,))].rstrip()
    assert rows[long].finish_reason == "stop" and texts[long] != plain[long]
    # min_tokens keeps the end token out: every answer runs to its limit.
    rows = [RowDecoding(Sampling(NEW_TOKENS, min_tokens=NEW_TOKENS)) for _ in plain]
    model.generate(batch, rows=rows)
    assert all(len(row.tokens) == NEW_TOKENS and row.finish_reason == "length" for row in rows)


def test_a_cancelled_row_stops_and_the_others_go_on(model_and_batch):
    model, batch = model_and_batch
    plain, _ = model.generate(batch, max_new_tokens=NEW_TOKENS)
    rows = [RowDecoding(Sampling(NEW_TOKENS)) for _ in plain]
    rows[0].cancelled.set()
    texts, _ = model.generate(batch, rows=rows)
    assert rows[0].finish_reason == "cancelled" and rows[0].tokens == []
    assert texts[1:] == plain[1:]
