"""Special tokens, chat prompts and the memory-slot string (README: "How CLaRa reads a document").

The strings and the token layout follow the official CLaRa release so that its checkpoints load
and results compare.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

SYSTEM_QA = (
    "You are a helpful assistant. Given a document, your task is to generate some single questions "
    "to cover all key information of the document and answer them sequentially."
)
SYSTEM_PARAPHRASE = (
    "You are a helpful assistant. Your task is follow the instructions to paraphrase the background information."
)
SYSTEM_ANSWER = (
    "You are a helpful assistant. Your task is to extract relevant information from provided "
    "documents and to answer to questions as briefly as possible."
)

PARAPHRASE_INSTRUCTIONS = (
    "Background: {slots} means the same as",
    "Background: {slots} Can you put the above sentences in your own terms?",
    "Background: {slots} Please provide a reinterpretation of the preceding background text.",
    "These two expressions are equivalent in essence:\n(1) {slots}\n(2)",
    "Background: {slots} is a paraphrase of what?",
    "Background: {slots} Could you give me a different version of the background sentences above?",
    "In other words, background: {slots} is just another way of saying:",
    "You're getting across the same point whether you say background: {slots} or",
    "Background: {slots} After unpacking the ideas in the background information above, we got:",
    "Background: {slots} Please offer a restatement of the background sentences I've just read.",
    "Background: {slots}, which also means:",
    "Strip away the mystery, and you'll find background: {slots} is simply another rendition of:",
    "The essence of background: {slots} is captured again in the following statement:",
)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens CLaRa adds, and of the tokenizer's own tokens it relies on."""

    mem_ids: tuple[int, ...]
    ae_id: int
    enc_id: int
    sep_id: int
    bos_token: str
    eos_token: str
    pad_id: int

    @property
    def n_mem(self) -> int:
        return len(self.mem_ids)

    @property
    def first_mem_id(self) -> int:
        return self.mem_ids[0]


def added_token_strings(n_mem: int) -> list[str]:
    return [f"<MEM{i}>" for i in range(n_mem)] + ["<AE>", "<ENC>", "<SEP>"]


def add_special_tokens(tokenizer, n_mem: int) -> SpecialTokens:
    """Add the memory, <AE>, <ENC> and <SEP> tokens after the tokenizer's own, and set padding."""
    own_extra = [str(t) for t in tokenizer.extra_special_tokens]
    new = [t for t in added_token_strings(n_mem) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    return special_tokens_of(tokenizer, n_mem, own_extra)


def special_tokens_of(tokenizer, n_mem: int, own_extra: list[str] | None = None) -> SpecialTokens:
    """Read the ids of a tokenizer that already holds the CLaRa tokens."""
    added = set(added_token_strings(n_mem))
    if own_extra is None:
        own_extra = [str(t) for t in tokenizer.extra_special_tokens if str(t) not in added]
    # Tokenizers without BOS (the Qwen family) use their first own extra special token instead.
    bos = tokenizer.bos_token or (own_extra[0] if own_extra else None)
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS token nor an extra special token to serve as one")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = bos
    ids = tokenizer.convert_tokens_to_ids(added_token_strings(n_mem))
    mem_ids = tuple(ids[:n_mem])
    if list(mem_ids) != list(range(mem_ids[0], mem_ids[0] + n_mem)):
        raise ValueError("the memory tokens <MEM0>.. must have consecutive ids")
    return SpecialTokens(
        mem_ids=mem_ids,
        ae_id=ids[n_mem],
        enc_id=ids[n_mem + 1],
        sep_id=ids[n_mem + 2],
        bos_token=bos,
        eos_token=tokenizer.eos_token,
        pad_id=tokenizer.pad_token_id,
    )


def memory_slots(n_mem: int, n_docs: int) -> str:
    """One slot per document: its memory tokens followed by <SEP>."""
    one = "".join(f"<MEM{i}>" for i in range(n_mem)) + "<SEP>"
    return one * n_docs


def document_text(tokens: SpecialTokens, doc: str) -> str:
    return "<ENC>" + tokens.bos_token + doc + tokens.eos_token


def paraphrase_instruction(doc: str, seed: int) -> str:
    """A paraphrase request picked per sample; keyed on the text so that resumed runs pick the same."""
    index = (zlib.crc32(doc.encode("utf-8")) + seed) % len(PARAPHRASE_INSTRUCTIONS)
    return PARAPHRASE_INSTRUCTIONS[index]


def qa_target(questions: list[str], answers: list[str]) -> str:
    return "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(questions, answers))


def answer_user_message(slots: str, question: str) -> str:
    return f"Background:\n{slots}\n\nQuestion:{question}"


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=False
    )


def _prompt(tokenizer, system: str, user: str) -> tuple[list[dict], str]:
    """The messages of the prompt and its rendering with a generation prompt.

    Templates that reject a system role get the system text, a newline and the user text as one user turn.
    """
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        return messages, _chat(tokenizer, messages, True)
    except Exception as error:  # jinja raises TemplateError (or its own exception) for an unsupported role
        # Templates word the refusal differently (Mistral-7B-Instruct-v0.2: "Conversation roles must
        # alternate user/assistant/..."), so try the folded form whatever the message; if that fails
        # too, the problem was not the system role and the original error is the informative one.
        folded = [{"role": "user", "content": system + "\n" + user}]
        try:
            return folded, _chat(tokenizer, folded, True)
        except Exception:
            raise error from None


def render_prompt(tokenizer, system: str, user: str) -> str:
    """The inference prompt: the chat template with a generation prompt."""
    return _prompt(tokenizer, system, user)[1]


def render_supervised(tokenizer, system: str, user: str, answer: str) -> tuple[str, str]:
    """(inference prompt, assistant turn): the turn is the text the template renders for the answer.

    Where the generation prompt is a prefix of the rendered full chat (Qwen, Mistral), the turn is
    the rest of that chat: the answer as the template writes it, the end-of-turn marker and what
    follows it (Qwen: `<|im_end|>\n`), which is what the official code supervises. Where it is not
    (some Qwen3 variants render an empty think block only at generation time), cutting the full
    chat would shift the labels, so the turn is the answer followed by the text the template puts
    after an assistant message.
    """
    messages, prompt = _prompt(tokenizer, system, user)
    full = _chat(tokenizer, messages + [{"role": "assistant", "content": answer}], False)
    if full.startswith(prompt):
        return prompt, full[len(prompt) :]
    return prompt, answer + _after_assistant_text(tokenizer)


def _after_assistant_text(tokenizer) -> str:
    return _after_assistant_cached(tokenizer.chat_template or "", tokenizer)


@functools.lru_cache(maxsize=8)
def _after_assistant_cached(template: str, tokenizer) -> str:
    marker = "ZQXJ answer ZQXJ"
    chat = _chat(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], False)
    at = chat.rfind(marker)
    tail = chat[at + len(marker) :] if at >= 0 else ""
    return tail if tail.strip() else tokenizer.eos_token


def end_of_turn(tokenizer) -> str:
    """The end-of-turn marker a template puts after an assistant message (e.g. <|im_end|> or </s>)."""
    return _after_assistant_text(tokenizer).strip()
