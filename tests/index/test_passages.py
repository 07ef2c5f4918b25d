"""The one splitter (clara/index/passages.py): passages within the limit, on paragraph and sentence boundaries where
they fit, the overlap, the ids, and the passages file's check against the compressor that reads it."""

from __future__ import annotations

import pytest

from clara.errors import DataError
from clara.index.passages import (
    Cut,
    check_cut,
    document_of,
    load_tokenizer,
    read_passages,
    split_documents,
    split_text,
    token_counter,
    tokenizer_key,
    write_passages,
)
from clara.model.checkpoint import build_model
from clara.model.model import ModelSettings


def words(texts: list[str]) -> list[int]:
    """A tokenizer whose tokens are words: the tests can count by eye."""
    return [len(t.split()) for t in texts]


def test_a_document_that_fits_is_one_passage_with_its_id():
    passages = split_documents(["a.md", "b.md"], ["One two three.", "Four five."], words, 10)
    assert [(p.id, p.document, p.position, p.text) for p in passages] == [
        ("a.md", "a.md", 1, "One two three."),
        ("b.md", "b.md", 1, "Four five."),
    ]


def test_paragraphs_are_kept_whole_where_they_fit():
    text = "A b c d.\n\nE f g h.\n\nI j k l."
    assert split_text(text, words, 8) == ["A b c d.\n\nE f g h.", "I j k l."]


def test_a_long_paragraph_is_cut_between_sentences_then_between_words():
    text = "One two three. Four five six. Seven eight nine ten eleven twelve thirteen."
    assert split_text(text, words, 6) == [
        "One two three. Four five six.",
        "Seven eight nine ten eleven twelve",
        "thirteen.",
    ]


def test_a_word_longer_than_the_limit_is_cut_between_characters():
    def characters(texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    assert split_text("abcdefghij", characters, 4) == ["abcd", "efgh", "ij"]


def test_the_overlap_repeats_the_last_pieces_of_the_passage_before():
    text = "A b. C d. E f. G h. I j."
    assert split_text(text, words, 4, overlap=2) == ["A b. C d.", "C d. E f.", "E f. G h.", "G h. I j."]
    assert split_text(text, words, 4) == ["A b. C d.", "E f. G h.", "I j."]


def test_longer_documents_get_numbered_passage_ids_that_map_back():
    passages = split_documents(["guide.md"], ["A b c.\n\nD e f."], words, 3)
    assert [p.id for p in passages] == ["guide.md#1", "guide.md#2"]
    assert [p.position for p in passages] == [1, 2]
    assert {document_of(p.id) for p in passages} == {"guide.md"}
    assert document_of("notes#draft") == "notes#draft"  # a '#' in an id, not a passage number
    assert document_of("place-0001") == "place-0001"


def test_with_the_tiny_tokenizer_every_passage_fits_and_the_text_is_kept():
    tokenizer = load_tokenizer("tiny")
    count = token_counter(tokenizer)
    paragraphs = [f"Place number {i} is a harbor. Its main food is rice. Its lucky number is {i}." for i in range(60)]
    text = "\n\n".join(paragraphs) + "\n\n" + "x" * 3000  # and one word far longer than a passage
    passages = split_text(text, count, 64)
    assert len(passages) > 10 and max(count(passages)) <= 64
    assert "".join("".join(p.split()) for p in passages) == "".join(text.split())


def test_a_checkpoint_and_its_base_have_the_same_tokenizer_key():
    base = load_tokenizer("tiny")
    model = build_model(
        ModelSettings(base_model="tiny", n_mem_tokens=4, compress_rate=32, doc_max_length=128), ["encoder_adapter"]
    )
    assert len(model.tokenizer) > len(base)  # the checkpoint's tokenizer holds CLaRa's tokens too
    assert tokenizer_key(model.tokenizer) == tokenizer_key(base)


def test_a_passages_file_is_refused_by_a_compressor_of_another_length(tmp_path):
    path = str(tmp_path / "passages.json")
    cut = Cut("tiny", "0123456789abcdef", 64, 0)
    passages = split_documents(["a"], ["A b c."], words, 64)
    write_passages(path, cut, passages, {"path": "docs", "files": 1, "read": 1, "skipped": {}})
    saved, read, corpus = read_passages(path)
    assert saved == cut and read == passages and corpus["path"] == "docs"
    check_cut(path, saved, Cut("ck", "0123456789abcdef", 64, 0))
    with pytest.raises(DataError) as error:
        check_cut(path, saved, Cut("ck", "0123456789abcdef", 128, 0))
    assert "DOC_MAX_LENGTH=64" in str(error.value) and "DOC_MAX_LENGTH=128" in str(error.value)
    with pytest.raises(DataError, match="tokenizer ck"):
        check_cut(path, saved, Cut("ck", "fedcba9876543210", 64, 0))
