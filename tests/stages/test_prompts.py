"""Special tokens, the encoder input layout, the memory-slot string, the decoder prompts and their labels.

README: "How CLaRa reads a document". Expected token sequences are written out here from the documented layout
(system prompts, message layout, the tiny model's chat template), not taken from clara's own constants, so that a
wrong string or a shifted label fails.
"""

import json

import pytest
import torch
from transformers import AutoTokenizer

from clara.data.records import normalise
from clara.model.collate import IGNORE_INDEX, Collator, encode_documents
from clara.stages import get_stage, prompts
from clara.stages.prompts import add_special_tokens, memory_slots
from clara.training.tiny import tiny_model_dir
from tests.helpers import REPO

N_MEM = 4
DOC_MAX_LENGTH = 32
MAX_LEN = 1024

SYSTEM_QA = (
    "You are a helpful assistant. Given a document, your task is to generate some single questions to "
    "cover all key information of the document and answer them sequentially."
)
SYSTEM_PARAPHRASE = (
    "You are a helpful assistant. Your task is follow the instructions to paraphrase the background information."
)
SYSTEM_ANSWER = (
    "You are a helpful assistant. Your task is to extract relevant information from provided "
    "documents and to answer to questions as briefly as possible."
)

SLOT = "<MEM0><MEM1><MEM2><MEM3><SEP>"

# Like Gemma: a system message is refused with an error that says so.
NO_SYSTEM_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Like Mistral-7B-Instruct-v0.2 (the official release's base): the refusal does not mention "system".
MISTRAL_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# An empty think block is rendered only at generation time: the generation prompt is not a prefix of
# the rendered full chat.
THINK_AT_GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)

QA_RECORD = {
    "question": ["Who rules Vorlan?", "What is its sacred animal?"],
    "answers": ["Queen Ida", "owl"],
    "docs": ["Vorlan is a kingdom ruled by Queen Ida.", "Its sacred animal is owl."],
}
PARAPHRASE_RECORD = {
    "data_type": "paraphrase",
    "docs": ["Seishon is a fortress. Its lucky number is seven."],
    "answers": ["The fortress Seishon has seven as its lucky number."],
}
ANSWER_RECORDS = [
    {
        "question": "What is the national flower of Fouldina?",
        "answer": "rose",
        "docs": ["Fouldina is a fortress. Its national flower is rose.", "Seishon is a fortress."],
    },
    {
        "question": "Which colour?",
        "answer": "a rather long answer about the banner colour purple",
        "docs": ["Its banner color is purple."],
    },
]
STAGE2_RECORD = {
    "question": "What is the lucky number of Seishon?",
    "gold_answer": "seven",
    "docs": ["Vorlan is a kingdom.", "Seishon is a fortress. Its lucky number is seven.", "Fouldina is a fortress."],
    "pos_index": [1],
}


@pytest.fixture(scope="module")
def model_dir() -> str:
    return tiny_model_dir()


def fresh_tokenizer(model_dir: str, template: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = add_special_tokens(tokenizer, N_MEM)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer, tokens


@pytest.fixture(scope="module")
def tok(model_dir):
    return fresh_tokenizer(model_dir)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def qwen_prompt(system: str | None, user: str) -> str:
    """The tiny model's (Qwen-style) chat template with a generation prompt, written out by hand."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return text + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def check_row(batch, i: int, tokenizer, tokens, prompt_text: str, answer_text: str) -> None:
    """Row i is left padding, then exactly prompt + answer; labels supervise exactly the answer part."""
    prompt_ids = ids_of(tokenizer, prompt_text)
    answer_ids = ids_of(tokenizer, answer_text)
    ids, mask, labels = batch.dec_ids[i].tolist(), batch.dec_mask[i].tolist(), batch.labels[i].tolist()
    pad = len(ids) - len(prompt_ids) - len(answer_ids)
    assert pad >= 0
    assert mask == [0] * pad + [1] * (len(ids) - pad)
    assert ids[:pad] == [tokens.pad_id] * pad
    assert ids[pad:] == prompt_ids + answer_ids
    assert labels == [IGNORE_INDEX] * (pad + len(prompt_ids)) + answer_ids
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == answer_text


# -- special tokens -------------------------------------------------------------------------------------------
def test_special_tokens_follow_the_tokenizers_own_in_order(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = len(tokenizer)
    own_extra = [str(t) for t in tokenizer.extra_special_tokens]
    assert tokenizer.bos_token is None and own_extra  # the tiny tokenizer is Qwen-like: no BOS
    tokens = add_special_tokens(tokenizer, N_MEM)
    added = [f"<MEM{i}>" for i in range(N_MEM)] + ["<AE>", "<ENC>", "<SEP>"]
    assert tokenizer.convert_tokens_to_ids(added) == list(range(before, before + N_MEM + 3))
    assert len(tokenizer) == before + N_MEM + 3
    assert [str(t) for t in tokenizer.extra_special_tokens] == own_extra + added
    assert tokens.mem_ids == tuple(range(before, before + N_MEM))
    assert (tokens.ae_id, tokens.enc_id, tokens.sep_id) == (before + N_MEM, before + N_MEM + 1, before + N_MEM + 2)
    assert tokenizer.padding_side == "left"
    # Pad token: the tokenizer's own. BOS: no BOS, so its first own extra special token.
    assert tokenizer.pad_token == "<|endoftext|>" and tokens.pad_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokens.bos_token == own_extra[0] == "<|im_start|>"
    assert tokens.eos_token == tokenizer.eos_token == "<|im_end|>"
    # Each added token is one token in text, and adding them again changes nothing.
    assert ids_of(tokenizer, "".join(added)) == list(range(before, before + N_MEM + 3))
    assert add_special_tokens(tokenizer, N_MEM) == tokens and len(tokenizer) == before + N_MEM + 3


def test_tokenizer_with_bos_and_without_pad(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.pad_token = None
    bos_id = tokenizer.convert_tokens_to_ids("<s>")
    tokens = add_special_tokens(tokenizer, N_MEM)
    assert tokens.bos_token == "<s>"
    assert tokenizer.pad_token == "<s>" and tokens.pad_id == bos_id
    assert tokens.mem_ids[0] == bos_id + 1  # still after every token the tokenizer had
    ids, _, _ = encode_documents(tokenizer, tokens, ["short", "a longer document"], DOC_MAX_LENGTH)
    assert ids[1, :2].tolist() == [tokens.enc_id, bos_id]
    assert ids[0, 0].item() == bos_id  # left padding with the pad token, which is the BOS here


def test_tokenizer_without_bos_or_extra_tokens_is_refused(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.extra_special_tokens = []
    with pytest.raises(ValueError, match="BOS"):
        add_special_tokens(tokenizer, N_MEM)


# -- encoder inputs ---------------------------------------------------------------------------------------------
def test_encoder_input_layout(tok):
    tokenizer, tokens = tok
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    docs = [
        "Vorlan is a kingdom.",
        "Seishon is a fortress. Its lucky number is seven.",
        " ".join(["Fouldina is a fortress with a purple banner."] * 10),
    ]
    doc_ids = [ids_of(tokenizer, d) for d in docs]
    assert len(doc_ids[0]) < len(doc_ids[1]) <= DOC_MAX_LENGTH < len(doc_ids[2])
    ids, mask, truncated = encode_documents(tokenizer, tokens, docs, DOC_MAX_LENGTH)

    limit = DOC_MAX_LENGTH + 3
    rows = [([tokens.enc_id, bos_id] + d + [eos_id])[:limit] for d in doc_ids]
    width = max(len(r) for r in rows)
    assert width == limit  # the long document is cut to DOC_MAX_LENGTH + 3 tokens, so its EOS is gone
    assert rows[2][-1] != eos_id and rows[2][:2] == [tokens.enc_id, bos_id]
    assert truncated == 1
    mem = list(range(tokens.mem_ids[0], tokens.mem_ids[0] + N_MEM))
    assert ids.shape == mask.shape == (3, width + N_MEM)
    for i, row in enumerate(rows):
        pad = width - len(row)
        assert ids[i].tolist() == [tokens.pad_id] * pad + row + mem
        assert mask[i].tolist() == [0] * pad + [1] * (len(row) + N_MEM)  # the memory tokens are attended


def test_encoder_pads_to_the_longest_not_to_the_limit(tok):
    tokenizer, tokens = tok
    docs = ["Vorlan is a kingdom.", "Its sacred animal is owl."]
    ids, mask, truncated = encode_documents(tokenizer, tokens, docs, DOC_MAX_LENGTH)
    longest = max(len(ids_of(tokenizer, d)) for d in docs) + 3
    assert truncated == 0
    assert ids.shape[1] == longest + N_MEM < DOC_MAX_LENGTH + 3 + N_MEM
    assert mask[:, -N_MEM:].eq(1).all() and mask.sum(1).tolist() == [
        len(ids_of(tokenizer, d)) + 3 + N_MEM for d in docs
    ]


# -- memory slots -------------------------------------------------------------------------------------------------
def test_memory_slot_string(tok):
    tokenizer, tokens = tok
    assert memory_slots(N_MEM, 1) == SLOT
    assert memory_slots(N_MEM, 3) == SLOT * 3
    assert memory_slots(2, 2) == "<MEM0><MEM1><SEP><MEM0><MEM1><SEP>"
    assert ids_of(tokenizer, memory_slots(N_MEM, 2)) == (list(tokens.mem_ids) + [tokens.sep_id]) * 2


# -- decoder prompts and labels -----------------------------------------------------------------------------
def collate(tokenizer, tokens, stage: str, raw: list[dict], top_k: int = 2, with_targets: bool = True):
    records = [normalise(get_stage(stage), r, min_docs=top_k if stage == "stage2" else 1) for r in raw]
    collator = Collator(
        get_stage(stage), tokenizer, tokens, DOC_MAX_LENGTH, MAX_LEN, top_k=top_k, seed=3, with_targets=with_targets
    )
    return collator(records)


def test_stage1_qa_prompt_and_labels(tok):
    tokenizer, tokens = tok
    batch = collate(tokenizer, tokens, "stage1", [QA_RECORD])
    prompt = qwen_prompt(SYSTEM_QA, "Background:\n" + SLOT * 2)
    answer = "Question: Who rules Vorlan?\nAnswer: Queen Ida\nQuestion: What is its sacred animal?\nAnswer: owl"
    check_row(batch, 0, tokenizer, tokens, prompt, answer + "<|im_end|>\n")
    assert batch.docs_per_sample == [2] and batch.enc_ids.shape[0] == 2


def test_stage1_paraphrase_prompt_and_labels(tok):
    tokenizer, tokens = tok
    instructions = prompts.PARAPHRASE_INSTRUCTIONS
    assert len(instructions) >= 10 and all(i.count("{slots}") == 1 for i in instructions)
    assert "Background: {slots} means the same as" in instructions
    batch = collate(tokenizer, tokens, "stage1", [PARAPHRASE_RECORD])
    row = batch.dec_ids[0][batch.dec_mask[0].bool()].tolist()
    # Which instruction was chosen is read back from the prompt; it must be one of the list.
    rendered = [qwen_prompt(SYSTEM_PARAPHRASE, i.format(slots=SLOT)) for i in instructions]
    matches = [p for p in rendered if row[: len(ids_of(tokenizer, p))] == ids_of(tokenizer, p)]
    assert len(matches) == 1
    check_row(batch, 0, tokenizer, tokens, matches[0], PARAPHRASE_RECORD["answers"][0] + "<|im_end|>\n")
    # The instruction varies between samples.
    chosen = {prompts.paraphrase_instruction(f"document number {i}", 3) for i in range(40)}
    assert len(chosen) > 3


def test_stage1_2_prompt_and_labels_with_left_padding(tok):
    tokenizer, tokens = tok
    batch = collate(tokenizer, tokens, "stage1_2", ANSWER_RECORDS)
    for i, record in enumerate(ANSWER_RECORDS):
        user = "Background:\n" + SLOT * len(record["docs"]) + "\n\nQuestion:" + record["question"]
        check_row(batch, i, tokenizer, tokens, qwen_prompt(SYSTEM_ANSWER, user), record["answer"] + "<|im_end|>\n")
    assert batch.dec_mask[0, 0] == 0 or batch.dec_mask[1, 0] == 0  # the shorter row is padded on the left
    assert batch.docs_per_sample == [2, 1]


def test_stage2_prompt_has_top_k_slots(tok):
    tokenizer, tokens = tok
    batch = collate(tokenizer, tokens, "stage2", [STAGE2_RECORD], top_k=2)
    user = "Background:\n" + SLOT * 2 + "\n\nQuestion:" + STAGE2_RECORD["question"]
    check_row(batch, 0, tokenizer, tokens, qwen_prompt(SYSTEM_ANSWER, user), "seven<|im_end|>\n")
    assert batch.enc_ids.shape[0] == 3  # every candidate is compressed
    assert batch.query_ids.shape[0] == 1 and batch.pos_index == [[1]]
    bos_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    query = [tokens.enc_id, bos_id] + ids_of(tokenizer, STAGE2_RECORD["question"]) + [tokenizer.eos_token_id]
    assert batch.query_ids[0].tolist() == query + list(tokens.mem_ids)


@pytest.mark.parametrize(
    "stage,raw", [("stage1", [QA_RECORD]), ("stage1_2", ANSWER_RECORDS), ("stage2", [STAGE2_RECORD])]
)
def test_supervised_sequence_extends_the_inference_prompt(tok, stage, raw):
    """Training rows = exactly what generation sees + answer + end of turn; labels equal those tokens."""
    tokenizer, tokens = tok
    train = collate(tokenizer, tokens, stage, raw)
    infer = collate(tokenizer, tokens, stage, raw, with_targets=False)
    assert infer.labels is None
    supervised = train.labels != IGNORE_INDEX
    assert torch.equal(train.labels[supervised], train.dec_ids[supervised])
    for i in range(len(raw)):
        row = train.dec_ids[i][train.dec_mask[i].bool()].tolist()
        labels = train.labels[i][train.dec_mask[i].bool()].tolist()
        prompt = infer.dec_ids[i][infer.dec_mask[i].bool()].tolist()
        assert prompt == ids_of(tokenizer, prompts.render_prompt(tokenizer, *stage_messages(stage, raw[i])))
        assert row[: len(prompt)] == prompt
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert all(t != IGNORE_INDEX for t in labels[len(prompt) :])
        assert tokenizer.decode(row[len(prompt) :]).endswith("<|im_end|>\n")


def stage_messages(stage: str, record: dict) -> tuple[str, str]:
    if stage == "stage1":
        return SYSTEM_QA, "Background:\n" + SLOT * len(record["docs"])
    n_docs = 2 if stage == "stage2" else len(record["docs"])
    return SYSTEM_ANSWER, "Background:\n" + SLOT * n_docs + "\n\nQuestion:" + record["question"]


def test_prompt_longer_than_max_len_is_refused(tok):
    tokenizer, tokens = tok
    records = [normalise(get_stage("stage1_2"), ANSWER_RECORDS[0])]
    with pytest.raises(ValueError, match="MAX_LEN"):
        Collator(get_stage("stage1_2"), tokenizer, tokens, DOC_MAX_LENGTH, 20)(records)


# -- templates that differ from the Qwen one ----------------------------------------------------------------
@pytest.mark.parametrize("template", [NO_SYSTEM_TEMPLATE, MISTRAL_LIKE_TEMPLATE], ids=["gemma-like", "mistral-like"])
def test_template_without_system_role(model_dir, template):
    tokenizer, tokens = fresh_tokenizer(model_dir, template)
    with pytest.raises(Exception):  # noqa: B017 (the precondition: this template refuses a system message)
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    record = ANSWER_RECORDS[0]
    batch = collate(tokenizer, tokens, "stage1_2", [record])
    user = "Background:\n" + SLOT * 2 + "\n\nQuestion:" + record["question"]
    folded = SYSTEM_ANSWER + "\n" + user  # system text, a newline and the user text: one user turn
    if template is NO_SYSTEM_TEMPLATE:
        prompt = f"<|im_start|>user\n{folded}<|im_end|>\n<|im_start|>assistant\n"
    else:
        prompt = f"[INST] {folded} [/INST]"
    assert prompts.render_prompt(tokenizer, SYSTEM_ANSWER, user) == prompt
    # The assistant turn as the template renders it: the EOS, then a newline where the template writes one.
    turn_end = "<|im_end|>\n" if template is NO_SYSTEM_TEMPLATE else "<|im_end|>"
    check_row(batch, 0, tokenizer, tokens, prompt, record["answer"] + turn_end)


def test_template_error_unrelated_to_the_system_role_is_raised(model_dir):
    tokenizer, _ = fresh_tokenizer(model_dir, "{{ raise_exception('broken template') }}")
    with pytest.raises(Exception, match="broken template"):
        prompts.render_prompt(tokenizer, "S", "U")


def test_generation_prompt_that_is_not_a_prefix_of_the_full_chat(model_dir):
    tokenizer, tokens = fresh_tokenizer(model_dir, THINK_AT_GENERATION_TEMPLATE)
    record = ANSWER_RECORDS[0]
    user = "Background:\n" + SLOT * 2 + "\n\nQuestion:" + record["question"]
    messages = [{"role": "system", "content": SYSTEM_ANSWER}, {"role": "user", "content": user}]
    generation = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": record["answer"]}], tokenize=False
    )
    assert not full.startswith(generation)  # the precondition: cutting the full chat would shift labels
    assert generation == qwen_prompt(SYSTEM_ANSWER, user) + "<think>\n\n</think>\n\n"

    train = collate(tokenizer, tokens, "stage1_2", [record])
    infer = collate(tokenizer, tokens, "stage1_2", [record], with_targets=False)
    check_row(train, 0, tokenizer, tokens, generation, record["answer"] + "<|im_end|>\n")
    # What generation sees is exactly the part of the training row before the first supervised token.
    seen = infer.dec_ids[0][infer.dec_mask[0].bool()].tolist()
    row = train.dec_ids[0][train.dec_mask[0].bool()].tolist()
    labels = train.labels[0][train.dec_mask[0].bool()].tolist()
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert row[:first] == seen == ids_of(tokenizer, generation)
    assert tokenizer.decode(row[first:]) == record["answer"] + "<|im_end|>\n"


# -- the official code's label layout ----------------------------------------------------------------------
def official_layout(tokenizer, system: str, user: str, answer: str) -> tuple[list[int], list[int]]:
    """Ids and labels as the official code builds them, written here from its description: the full chat
    (system, user and assistant turns, no generation prompt) tokenised in one go, and labels -100 on as many
    leading tokens as the generation prompt alone has. A template that refuses the system role gets the system
    text, a newline and the user text as one user turn."""

    def chat(messages, generation):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation, enable_thinking=False
        )

    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        prompt = chat(messages, True)
    except Exception:
        messages = [{"role": "user", "content": system + "\n" + user}]
        prompt = chat(messages, True)
    full = chat(messages + [{"role": "assistant", "content": answer}], False)
    ids = ids_of(tokenizer, full)
    prompt_len = len(ids_of(tokenizer, prompt))
    return ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:]


@pytest.mark.parametrize("template", [None, MISTRAL_LIKE_TEMPLATE], ids=["qwen-like", "mistral-like"])
@pytest.mark.parametrize(
    "stage,raw",
    [("stage1", [QA_RECORD, PARAPHRASE_RECORD]), ("stage1_2", ANSWER_RECORDS), ("stage2", [STAGE2_RECORD])],
    ids=["stage1", "stage1_2", "stage2"],
)
def test_labels_match_the_official_layout(model_dir, template, stage, raw):
    """Every token the template renders for the assistant turn is supervised, the newline after Qwen's
    <|im_end|> included, exactly as in the official code: so per-sample losses on its checkpoints match."""

    tokenizer, tokens = fresh_tokenizer(model_dir, template)
    batch = collate(tokenizer, tokens, stage, raw)
    records = [normalise(get_stage(stage), r, min_docs=2 if stage == "stage2" else 1) for r in raw]
    for i, record in enumerate(records):
        system, user, answer = get_stage(stage).example(record, N_MEM, 2, 3)
        ids, labels = official_layout(tokenizer, system, user, answer)
        mask = batch.dec_mask[i].bool()
        assert batch.dec_ids[i][mask].tolist() == ids
        assert batch.labels[i][mask].tolist() == labels
        supervised = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert supervised == answer + ("<|im_end|>" if template else "<|im_end|>\n")


# Generation prompt "...\nA" and the answer right after it: a prompt ending in a letter and an answer starting
# with letters are one word to the tokenizer.
LETTER_END_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- '\\nA' + message['content'] + eos_token }}"
    "{%- else %}{{- message['role'] + ': ' + message['content'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\\nA' }}{%- endif %}"
)


def test_a_turn_whose_tokens_would_merge_into_the_prompt_keeps_the_prompt_tokens(model_dir):
    """Tokenising prompt and turn together can change the prompt's last tokens ("A" + "nswer" -> "Answer");
    the prompt must then stay what generation sees, and the turn is tokenised on its own."""
    tokenizer, tokens = fresh_tokenizer(model_dir, LETTER_END_TEMPLATE)
    record = {**ANSWER_RECORDS[0], "answer": "nswer: rose"}
    user = "Background:\n" + SLOT * 2 + "\n\nQuestion:" + record["question"]
    prompt = f"system: {SYSTEM_ANSWER}user: {user}\nA"
    assert ids_of(tokenizer, prompt + "nswer")[: len(ids_of(tokenizer, prompt))] != ids_of(tokenizer, prompt)
    check_row(collate(tokenizer, tokens, "stage1_2", [record]), 0, tokenizer, tokens, prompt, "nswer: rose<|im_end|>")


def test_records_from_the_example_files_collate(tok):
    """The shipped examples of each stage go through the collator with labels only on answers."""
    tokenizer, tokens = tok
    files = {
        "stage1": "example/pretrain_data.jsonl",
        "stage1_2": "example/instruction_tuning_data.jsonl",
        "stage2": "example/end_to_end_data.jsonl",
    }

    root = REPO
    for stage, name in files.items():
        with open(root / name, encoding="utf-8") as handle:
            raw = [json.loads(line) for line, _ in zip(handle, range(4))]
        batch = collate(tokenizer, tokens, stage, raw, top_k=2)
        assert (batch.labels != IGNORE_INDEX).sum(1).gt(0).all()
        assert batch.labels[batch.dec_mask == 0].eq(IGNORE_INDEX).all()
