"""Records -> tensors: encoder inputs, decoder inputs and labels (README: "How CLaRa reads a document")."""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from clara.data.fingerprint import tokenizer_identity
from clara.model.tokenizer import load_tokenizer
from clara.stages import Stage, prompts
from clara.stages.prompts import SpecialTokens, add_special_tokens

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One micro-batch. Encoder rows are the batch's documents in sample order."""

    enc_ids: torch.Tensor
    enc_mask: torch.Tensor
    dec_ids: torch.Tensor
    dec_mask: torch.Tensor
    labels: torch.Tensor | None
    docs_per_sample: list[int]
    questions: list[str]
    answers: list[str]
    query_ids: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None
    pos_index: list[list[int] | None] = field(default_factory=list)
    truncated_docs: int = 0
    num_tokens: int = 0  # tokens the model reads: decoder prompt and answer, documents, questions

    def to(self, device: torch.device | str) -> "Batch":
        moved = {}
        for name, value in self.__dict__.items():
            moved[name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)


def pad_left(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[pad_value] * (width - len(r)) + r for r in rows], dtype=torch.long)


def encode_documents(
    tokenizer, tokens: SpecialTokens, docs: list[str], doc_max_length: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`<ENC>` BOS doc EOS, cut to doc_max_length + 3 tokens, left-padded to the longest, then the memory tokens.

    Returns ids, attention mask and how many documents were truncated.
    """
    texts = [prompts.document_text(tokens, d) for d in docs]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    limit = doc_max_length + 3
    truncated = sum(len(ids) > limit for ids in encoded)
    rows = [ids[:limit] for ids in encoded]
    width = max(len(r) for r in rows)
    mem = list(tokens.mem_ids)
    ids = torch.tensor([[tokens.pad_id] * (width - len(r)) + r + mem for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * (len(r) + len(mem)) for r in rows], dtype=torch.long)
    return ids, mask, truncated


def encode_supervised(
    tokenizer, system: str, user: str, target: str | None, max_len: int
) -> tuple[list[int], list[int]]:
    """Prompt ids followed by the assistant turn as the chat template renders it; labels only on the turn.

    The prompt is rendered exactly as at inference (generation prompt included); the turn is the
    answer, the end-of-turn marker and what the template writes after it (prompts.render_supervised).
    """
    if target is None:
        prompt_ids = tokenizer(prompts.render_prompt(tokenizer, system, user), add_special_tokens=False)["input_ids"]
        return prompt_ids, [IGNORE_INDEX] * len(prompt_ids)
    prompt, turn = prompts.render_supervised(tokenizer, system, user, target)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_len:
        raise ValueError(
            f"a prompt of {len(prompt_ids)} tokens leaves no room for the answer within "
            f"MAX_LEN={max_len}; raise MAX_LEN or lower the number of documents"
        )
    # The turn is tokenised together with the prompt, as the official code does (a sentencepiece
    # tokenizer would start a separately tokenised answer with a word-start marker), unless joining
    # would change the prompt's own tokens, which must stay what generation sees.
    joint = tokenizer(prompt + turn, add_special_tokens=False)["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids:
        turn_ids = joint[len(prompt_ids) :]
    else:
        turn_ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    turn_ids = turn_ids[: max_len - len(prompt_ids)]
    return prompt_ids + turn_ids, [IGNORE_INDEX] * len(prompt_ids) + turn_ids


def build_decoder(
    tokenizer, tokens: SpecialTokens, examples: list[tuple[str, str, str | None]], max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(system, user, target) triples -> left-padded ids, mask and labels."""
    rows, label_rows = zip(*(encode_supervised(tokenizer, s, u, t, max_len) for s, u, t in examples))
    ids = pad_left(list(rows), tokens.pad_id)
    labels = pad_left(list(label_rows), IGNORE_INDEX)
    mask = pad_left([[1] * len(r) for r in rows], 0)
    return ids, mask, labels


@dataclass
class Collator:
    """Turns a list of normalised records of one stage into a Batch."""

    stage: Stage
    tokenizer: object
    tokens: SpecialTokens
    doc_max_length: int
    max_len: int
    top_k: int = 5
    seed: int = 0
    with_targets: bool = True
    # Set when the tokenizer never makes more tokens than a text has UTF-8 bytes: the bytes the chat template
    # adds around the three texts (see template_overhead).
    byte_overhead: int | None = None

    def length_problem(self, record: dict) -> str | None:
        """Why a normalised record cannot be trained on whole: its decoder input exceeds max_len (else None).

        With byte_overhead, a record whose texts and template have at most max_len UTF-8 bytes fits without
        being rendered or tokenized (tens of times faster); only longer ones are counted exactly.
        """
        system, user, target = self.stage.example(record, self.tokens.n_mem, self.top_k, self.seed)
        if self.byte_overhead is not None and target is not None:
            if self.byte_overhead + utf8_length(system) + utf8_length(user) + utf8_length(target) <= self.max_len:
                return None
        length = len(encode_supervised(self.tokenizer, system, user, target, max_len=sys.maxsize)[0])
        if length <= self.max_len:
            return None
        docs = self.top_k if self.stage.uses_query else len(record["docs"])
        return (
            f"decoder input of {length} tokens ({docs} documents x {self.tokens.n_mem} memory tokens, plus "
            f"the prompt and answer) exceeds MAX_LEN={self.max_len}; raise MAX_LEN or give the record "
            "fewer documents"
        )

    def __call__(self, records: list[dict]) -> Batch:
        examples = []
        for record in records:
            system, user, target = self.stage.example(record, self.tokens.n_mem, self.top_k, self.seed)
            examples.append((system, user, target if self.with_targets else None))
        dec_ids, dec_mask, labels = build_decoder(self.tokenizer, self.tokens, examples, self.max_len)
        docs = [d for record in records for d in record["docs"]]
        enc_ids, enc_mask, truncated = encode_documents(self.tokenizer, self.tokens, docs, self.doc_max_length)
        headers = [self.stage.header(record) for record in records]
        batch = Batch(
            enc_ids=enc_ids,
            enc_mask=enc_mask,
            dec_ids=dec_ids,
            dec_mask=dec_mask,
            labels=labels if self.with_targets else None,
            docs_per_sample=[len(record["docs"]) for record in records],
            questions=[q for q, _ in headers],
            answers=[a for _, a in headers],
            truncated_docs=truncated,
        )
        if self.stage.uses_query:
            # Samples may have different numbers of candidates: ClaraModel.select pads them and masks the padding.
            batch.query_ids, batch.query_mask, _ = encode_documents(
                self.tokenizer, self.tokens, [record["question"] for record in records], self.doc_max_length
            )
            batch.pos_index = [list(record["pos_index"]) if record["has_pos_index"] else None for record in records]
        batch.num_tokens = int(
            batch.dec_mask.sum()
            + batch.enc_mask.sum()
            + (batch.query_mask.sum() if batch.query_mask is not None else 0)
        )
        return batch


def utf8_length(text: str) -> int:
    """UTF-8 bytes of the text as an NFC-normalising tokenizer sees it."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return len(text.encode("utf-8"))


def counts_at_most_bytes(tokenizer) -> bool:
    """True for a byte-level BPE (GPT-2, Qwen, Llama 3, the tiny model): each token stands for at least one
    byte of the text (an added token for its own text), so a text never has more tokens than UTF-8 bytes.
    Not for SentencePiece tokenizers (Llama 2, Mistral, T5), whose word-start marker is a token that stands
    for no byte of the text, nor for slow tokenizers: their records are all tokenized."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return False
    pre = json.loads(backend.pre_tokenizer.__getstate__())
    parts = pre.get("pretokenizers", [pre])
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    normalizer = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
    return (
        bool(byte_level)
        and not any(p.get("add_prefix_space") for p in byte_level)
        and normalizer in (None, {"type": "NFC"})
    )


# Texts that a template which escapes, repeats or rewrites its messages would render at another length.
TEMPLATE_PROBES = (
    ("s", "u", "a"),
    ('System "quoted"\n\\ <b>', "User\n\n  é ü 中文 {{ x }} </think>", "Answer \t<|x|>\n"),
)


def template_overhead(tokenizer) -> int | None:
    """The UTF-8 bytes the chat template adds around (system, user, answer) when it copies each of them
    verbatim, as checked on probe texts; None when it does not (the records are then rendered)."""
    found = set()
    for system, user, answer in TEMPLATE_PROBES:
        prompt, turn = prompts.render_supervised(tokenizer, system, user, answer)
        found.add(utf8_length(prompt + turn) - sum(utf8_length(t) for t in (system, user, answer)))
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class LengthCheck:
    """The MAX_LEN check as a recipe that pickles: each process that prepares data calls it once (loading
    the tokenizer) and gets the check it runs on every record; key() is what the check depends on."""

    stage: Stage
    tokenizer_source: str  # a local folder or Hub id with the tokenizer the stage's model uses
    n_mem: int
    doc_max_length: int
    max_len: int
    top_k: int
    seed: int

    def key(self) -> dict:
        return {
            **tokenizer_identity(self.tokenizer_source),
            "n_mem": self.n_mem,
            "doc_max_length": self.doc_max_length,
            "max_len": self.max_len,
            "top_k": self.top_k,
            "seed": self.seed,
        }

    def __call__(self) -> Callable[[dict], str | None]:
        tokenizer = load_tokenizer(self.tokenizer_source)
        tokens = add_special_tokens(tokenizer, self.n_mem)
        overhead = template_overhead(tokenizer) if counts_at_most_bytes(tokenizer) else None
        return Collator(
            self.stage,
            tokenizer,
            tokens,
            self.doc_max_length,
            self.max_len,
            self.top_k,
            self.seed,
            byte_overhead=overhead,
        ).length_problem
