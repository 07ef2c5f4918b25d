"""The built-in tiny model: a small Qwen3-architecture causal LM that can already read.

CLaRa trains LoRA adapters on a frozen base model. A base with random weights cannot show learning (its frozen
output head keeps predictions near uniform), so the tiny model is pretrained here, on CPU, on texts from the
example corpus's generator (clara/data/example_data.py): documents as plain text, stage1 chats, and chat turns
whose user message holds one or two documents and a question and whose answer is copied from the right
document. Each text invents new places, so the model learns to read rather than to memorise. Its tokenizer is
trained on the example files.

The built model ships in clara/tiny_model with the hash of the recipe it was built from (recipe.json), so no
run waits for a build; clara.model.tiny_base finds it without loading this builder. `python -m clara.tiny --out
DIR` rebuilds it from the recipe; `python -m clara.tiny` checks the shipped model against the recipe.

This module is one file on purpose: the recipe's hash covers its code (recipe_version), so splitting it would
change the version of every tiny checkpoint.
"""

import argparse
import ast
import functools
import hashlib
import inspect
import json
import random
import sys
import textwrap
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from clara.data import example_data
from clara.data.example_data import invent_names, make_entity, pick_fact, pretrain_records, question_answer
from clara.evaluation.metrics import normalize_answer
from clara.model.tiny_base import EXAMPLE_DIR, RECIPE_FILE, SHIPPED_DIR, read_recipe, tiny_model_dir, tiny_version
from clara.stages.prompts import SYSTEM_ANSWER, SYSTEM_PARAPHRASE, SYSTEM_QA, answer_user_message, qa_target
from clara.training.schedule import cosine_with_warmup

TRAIN_FILES = ("pretrain_data.jsonl", "instruction_tuning_data.jsonl", "end_to_end_data.jsonl")
EVAL_FILE = "instruction_tuning_data_eval.jsonl"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Qwen3-style turns without the thinking block; `enable_thinking` is accepted and ignored (Jinja leaves it alone).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

VOCAB_SIZE = 640
MODEL_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 256,
}
TRAIN_STEPS = 2500
BATCH_TEXTS = 32
LEARNING_RATE = 3e-3
WARMUP_STEPS = 50
DOC_TEXT_SHARE = 0.05
STAGE1_SHARE = 0.15
TWO_DOC_SHARE = 0.5
DOCS_PER_TEXT = 3
# Every real token is trained (the model must also learn the documents' language), but answer tokens weigh this
# much more: copying the answer is the skill CLaRa relies on (README: "The built-in tiny model" measures it).
ANSWER_WEIGHT = 30.0
LR_FLOOR = 0.1


def _require_example_files() -> None:
    missing = [name for name in TRAIN_FILES if not (EXAMPLE_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the tiny model is built from the example data, but {missing} is missing in "
            f"{EXAMPLE_DIR}; run `python example/make_data.py`"
        )


class _Meaning(ast.NodeTransformer):
    """Drops what changes no behaviour: imports (a moved module is imported from elsewhere) and docstrings."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if isinstance(body, list):
            if (
                isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                body = body[1:]
            node.body = [statement for statement in body if not isinstance(statement, (ast.Import, ast.ImportFrom))]
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.JoinedStr:
        # Python 3.12.1 ends some f-string format specs with an empty string that 3.11 and 3.13 leave out.
        self.generic_visit(node)
        node.values = [v for v in node.values if not (isinstance(v, ast.Constant) and v.value == "")]
        return node


def _canonical(node) -> str:
    # ast.dump's text differs between Python versions (3.12 adds empty type_params, 3.13 leaves empty
    # fields out), so the tree is written here, every empty or absent field left out.
    if isinstance(node, ast.AST):
        fields = ((name, getattr(node, name, None)) for name in node._fields)
        return (
            f"{type(node).__name__}("
            + ", ".join(f"{name}={_canonical(value)}" for name, value in fields if value is not None and value != [])
            + ")"
        )
    if isinstance(node, list):
        return "[" + ", ".join(_canonical(item) for item in node) + "]"
    return repr(node)


def code_meaning(source: str) -> bytes:
    """What the code does, as bytes: its syntax tree without comments, docstrings, imports, layout or
    line numbers, so moving or reformatting a module leaves it unchanged and changing a value does not."""
    return _canonical(_Meaning().visit(ast.parse(textwrap.dedent(source)))).encode()


@functools.cache
def recipe_version(seed: int = 0, steps: int = TRAIN_STEPS) -> str:
    """The name of the model this recipe builds: a hash of everything that shapes its weights.

    That is the code of this module and of the generator, the schedule and the prompt pieces taken from other
    modules (their meaning, see code_meaning: where they live and how they are laid out do not count), the
    example training files, the seed and the step count. Computed on demand rather than at import: it reads
    about 2 MB of example data, which an installation without example/ does not have.
    """
    _require_example_files()
    digest = hashlib.sha256()
    for module in (sys.modules[__name__], example_data):
        digest.update(code_meaning(inspect.getsource(module)))
    # Whatever the build takes from other modules must be listed here.
    for function in (cosine_with_warmup, qa_target, answer_user_message):
        digest.update(code_meaning(inspect.getsource(function)))
    for prompt in (SYSTEM_ANSWER, SYSTEM_QA, SYSTEM_PARAPHRASE):
        digest.update(prompt.encode())
    for name in TRAIN_FILES:
        digest.update((EXAMPLE_DIR / name).read_bytes())
    digest.update(f"seed={seed} steps={steps}".encode())
    return f"tiny-{digest.hexdigest()[:12]}"


def reading_messages(docs: list[str], question: str, answer: str | None = None) -> list[dict]:
    """Chat messages that ask `question` about `docs` given as text (the stage1_2 prompt)."""
    user = answer_user_message("\n".join(docs), question)
    messages = [{"role": "system", "content": SYSTEM_ANSWER}, {"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _stage1_messages(record: dict) -> list[dict]:
    """A stage1 record as a complete chat in the stage1 prompts, with the document as text: their answers copy
    many facts and the name from the document, which teaches copying faster than one answer per text."""
    user = "Background:\n" + "\n".join(record["docs"])
    if record["data_type"] == "qa":
        system = SYSTEM_QA
        answer = qa_target(record["question"], record["answers"])
    else:
        system = SYSTEM_PARAPHRASE
        answer = record["answers"][0]
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]


def _tokenizer_texts() -> list[str]:
    """The example training files as the model reads them, each prompt's system message as often
    as it is used: merged into few tokens, it keeps training sequences short."""
    _require_example_files()
    pretrain, instruction, end_to_end = (_read_jsonl(EXAMPLE_DIR / name) for name in TRAIN_FILES)
    texts = [m["content"] for record in pretrain for m in _stage1_messages(record)]
    for record in instruction:
        texts += record["docs"] + [SYSTEM_ANSWER, record["question"], record["answers"]]
    for record in end_to_end:
        texts += record["docs"] + [SYSTEM_ANSWER, record["question"], record["gold_answer"]]
    return texts


def _train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    # Spaces are tokens of their own, so "owl" is the same token in " is owl." and in the answer "owl", and a
    # name is the same tokens in a document and in a question: copying is then one skill, not one per word.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[A-Za-z]+ ?|[0-9]+ ?|[^A-Za-z0-9\s]+ ?|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in (PAD_TOKEN, IM_START, IM_END)]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    # Like Qwen: no BOS, pad <|endoftext|>, EOS <|im_end|>, chat markers as extra special tokens.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer trained afresh from the example data (the shipped model holds the same)."""
    return _train_tokenizer(_tokenizer_texts())


def _sample_text(rng: random.Random, tokenizer: PreTrainedTokenizerFast) -> tuple[str, int]:
    """A training text about newly invented places, and the character offset where its answer starts (its
    length if none). Every text invents its own places, so no fact can be memorised: the only way to lower the
    loss on an answer is to read it from the document, which is the skill CLaRa builds on."""
    draw = rng.random()
    if draw < DOC_TEXT_SHARE:
        # Several documents per text, as in packed pretraining: the chat turns, not a short document, set the
        # batch's padded length.
        text = "".join(make_entity(rng, name)["doc"] + PAD_TOKEN for name in invent_names(rng, DOCS_PER_TEXT))
        return text, len(text)
    if draw < DOC_TEXT_SHARE + STAGE1_SHARE:
        place = make_entity(rng, invent_names(rng, 1)[0])
        messages = _stage1_messages(pretrain_records(rng, [place], 1)[0])
    else:
        name, other_name = invent_names(rng, 2)
        place = make_entity(rng, name)
        fact = pick_fact(rng, place)
        question, answer = question_answer(place, fact)
        docs = [place["doc"]]
        if rng.random() < TWO_DOC_SHARE:
            # As in the instruction-tuning data: the other document does not state the fact.
            other = make_entity(rng, other_name)
            while fact in other["facts"]:
                other = make_entity(rng, other_name)
            docs.insert(rng.randrange(2), other["doc"])
        messages = reading_messages(docs, question, answer)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    return full, len(prompt)


def build_tiny_model(out_dir: str, seed: int = 0, steps: int = TRAIN_STEPS) -> None:
    """Train the tokenizer and the model from the example training files and save both to `out_dir`,
    with recipe.json (written last, so a directory that has it holds a complete build)."""
    version = recipe_version(seed, steps)
    Path(out_dir, RECIPE_FILE).unlink(missing_ok=True)
    # One thread, whatever the caller's setting: the tiny matrices gain nothing from more, and a fixed thread
    # count fixes the order of float reductions, so a machine always builds the same model.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_tiny_model(out_dir, seed, steps)
    finally:
        torch.set_num_threads(threads)
    with open(Path(out_dir) / RECIPE_FILE, "w", encoding="utf-8") as handle:
        json.dump({"version": version, "seed": seed, "steps": steps}, handle, indent=2)
        handle.write("\n")


def _train_tiny_model(out_dir: str, seed: int, steps: int) -> None:
    start = time.time()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
        **MODEL_SHAPE,
    )
    model = Qwen3ForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.0)
    tokenizer.padding_side = "right"
    running = 0.0
    for step in range(steps):
        samples = [_sample_text(rng, tokenizer) for _ in range(BATCH_TEXTS)]
        batch = tokenizer(
            [text for text, _ in samples],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            return_offsets_mapping=True,
        )
        answer_start = torch.tensor([start for _, start in samples])[:, None]
        is_answer = batch["offset_mapping"][:, :, 0] >= answer_start
        weights = batch["attention_mask"].float() * (1 + (ANSWER_WEIGHT - 1) * is_answer.float())
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * cosine_with_warmup(step, steps, WARMUP_STEPS, LR_FLOOR)
        # Right padding under causal attention cannot affect real tokens: no mask, the faster unmasked path.
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
        )
        target_weights = weights[:, 1:].reshape(-1)
        loss = (token_loss * target_weights).sum() / target_weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            window = (step % 100) + 1
            print(
                f"[clara.tiny] step {step + 1}/{steps} loss {running / window:.4f} ({time.time() - start:.0f}s)",
                flush=True,
            )
            running = 0.0
    model.eval()
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@torch.no_grad()
def reading_exact_match(model_dir: str, data_path: str | None = None, batch_size: int = 25) -> float:
    """Share of stage1_2-format questions answered exactly with the documents given as text."""
    records = _read_jsonl(Path(data_path) if data_path else EXAMPLE_DIR / EVAL_FILE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    correct = 0
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                reading_messages(r["docs"], r["question"]),
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for r in chunk
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
        answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(normalize_answer(p) == normalize_answer(r["answers"]) for p, r in zip(answers, chunk))
    return correct / len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build the built-in tiny CLaRa base model from its recipe, or check the shipped one."
    )
    parser.add_argument(
        "--out",
        help=f"build into this directory ({SHIPPED_DIR} replaces the shipped "
        "model); without it, check the shipped model against the recipe",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the build (with --out)")
    args = parser.parse_args(argv)
    if args.out:
        start = time.time()
        build_tiny_model(args.out, seed=args.seed)
        out = args.out
        print(f"[clara.tiny] built {read_recipe(out)['version']} into {out} ({time.time() - start:.0f}s)")
    else:
        if args.seed != 0:
            parser.error("--seed: expected only with --out (the shipped model is built with seed 0)")
        out = tiny_model_dir()
        shipped, current = tiny_version(), recipe_version()
        verdict = (
            "matches the recipe"
            if shipped == current
            else f"is outdated: the recipe now builds {current}; run `python -m clara.tiny --out {out}`"
        )
        print(f"[clara.tiny] the shipped model {shipped} in {out} {verdict}")
    score = reading_exact_match(out)
    print(f"[clara.tiny] held-out exact match with the documents in the prompt: {score:.1%}")


if __name__ == "__main__":
    main()
