"""The colour-coded confidence print (README: "The debug print"), on the built-in tiny model.

In-process tests build a stage model, run the training forward and format the print, then check it
against numbers this file computes itself: a second, separate decoder pass through the full causal LM
(every position projected to the whole vocabulary), with the same dropout seed, and a log-softmax
written here. Subprocess tests run the real CLI, torchrun and the launcher; they start together in
the background (one thread each) and take about a minute together on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from clara.data.records import normalise
from clara.evaluation import debug
from clara.evaluation.debug import DebugPrinter
from clara.model.collate import IGNORE_INDEX, Collator
from clara.model.stage_model import build_stage_model
from clara.stages import get_stage
from clara.training.setup import model_settings
from clara.training.trainer import epoch_order, micro_batch_indices, optimizer_step
from tests.helpers import DOC_MAX_LENGTH, MAX_LEN, REPO, TOP_K, small_config

EXAMPLES = REPO / "example"
FILES = {
    "stage1": "pretrain_data.jsonl",
    "stage1_2": "instruction_tuning_data.jsonl",
    "stage2": "end_to_end_data.jsonl",
}
STAGES = tuple(FILES)

MSE_WEIGHT = 0.1
SEED = 42
RUN_TIMEOUT = 600  # generous: a 2-core machine may be busy with other work

RULE = "=" * 80
ESC = "\x1b"
# One print, field by field, exactly as laid out in README "The debug print" (stage 2 adds the chosen line).
PRINT = re.compile(
    r"={80}\n"
    r"\[Debug\] CLaRa Training Debug - Sample (?P<sample>\d+)\n"
    r"={80}\n"
    r"\[Debug\] Question: (?P<question>[^\n]*)\n"
    r"\[Debug\] Expected Answer: (?P<answer>[^\n]*)\n"
    r"(?:\[Debug\] Chosen documents: (?P<chosen>\[[0-9, ]*\])  pos_index: (?P<pos>[^\n]*)\n)?"
    r"\[Debug\] Answer metrics\n"
    r"  token_acc : (?P<acc>\d+\.\d\d)% \((?P<correct>\d+)/(?P<total>\d+)\)\n"
    r"  ce_loss   : (?P<ce>[^\n]+)\n"
    r"\n"
    r"\[Debug\] Answer colored by P\(gold token\) - red=low confidence, green=high confidence:\n"
    r"<MEM\.\.\.>\*(?P<slots>\d+) Question: (?P<prompt_question>[^\n]*)\n"
    r"Assistant: (?P<body>[\s\S]*?)\n"
    r"={80}"
)
HEADER = "[Debug] CLaRa Training Debug - Sample"
TAIL = re.compile(r"\.\.\.\(\+(\d+) tokens\)$")
PLAIN_TOKEN = re.compile(r"([\s\S]*?)\[(\d\.\d\d|nan)\]")
COLOUR_TOKEN = re.compile(r"\x1b\[38;2;(\d+);(\d+);(\d+)m([\s\S]*?)\x1b\[0m")


# -- parsing the print ------------------------------------------------------------------------------------
def parse_prints(text: str) -> list[dict]:
    """Every print in `text`, as a dict of its fields; fails when a header starts a print that does not parse."""
    found = [m.groupdict() for m in PRINT.finditer(text)]
    assert len(found) == text.count(HEADER), (
        f"a print does not follow the layout of README 'The debug print':\n{text[-3000:]}"
    )
    return found


def only_print(text: str) -> dict:
    found = parse_prints(text)
    assert len(found) == 1, text
    assert text.startswith(RULE) and text.endswith(RULE), repr(text[:100] + " ... " + text[-100:])
    return found[0]


def split_tail(body: str) -> tuple[str, int]:
    """The shown tokens and the N of a `...(+N tokens)` tail (0 without one)."""
    tail = TAIL.search(body)
    return (body[: tail.start()], int(tail.group(1))) if tail else (body, 0)


def plain_tokens(body: str) -> tuple[list[tuple[str, float]], int]:
    """NO_COLOR answer: [(token text, probability)] and the hidden-token count; nothing else may be there."""
    shown, hidden = split_tail(body)
    tokens = [(text, float(p)) for text, p in PLAIN_TOKEN.findall(shown)]
    assert "".join(f"{t}[{p:.2f}]" for t, p in tokens) == shown, f"unparsed text in {shown!r}"
    return tokens, hidden


def coloured_tokens(body: str) -> tuple[list[tuple[str, tuple[int, int, int]]], int]:
    """Coloured answer: [(token text, (r, g, b))] and the hidden-token count; nothing else may be there."""
    shown, hidden = split_tail(body)
    tokens = [(text, (int(r), int(g), int(b))) for r, g, b, text in COLOUR_TOKEN.findall(shown)]
    rebuilt = "".join(f"{ESC}[38;2;{r};{g};{b}m{t}{ESC}[0m" for t, (r, g, b) in tokens)
    assert rebuilt == shown, f"unparsed text in {shown!r}"
    return tokens, hidden


# -- the model, batches, and the independent reference ---------------------------------------------------


def stage_model(stage: str):
    """A stage model whose LoRA B matrices are not zero, so that every adapter changes what the model says."""
    torch.manual_seed(0)
    model = build_stage_model(model_settings(small_config(stage)), None, get_stage(stage), log=lambda *args: None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.02)
    return model


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(stage: str):
        if stage not in cache:
            cache[stage] = stage_model(stage)
        return cache[stage]

    return get


def raw_records(stage: str) -> list[dict]:
    with open(EXAMPLES / FILES[stage], encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def records(stage: str, raws: list[dict]) -> list[dict]:
    if stage == "stage2":
        # Four candidates keep it fast: the relevant one and the first three others.
        cut = []
        for raw in raws:
            pos = raw["pos_index"][0]
            keep = sorted([pos] + [i for i in range(len(raw["docs"])) if i != pos][:3])
            cut.append({**raw, "docs": [raw["docs"][i] for i in keep], "pos_index": [keep.index(pos)]})
        raws = cut
    return [normalise(get_stage(stage), r, min_docs=TOP_K if stage == "stage2" else 1) for r in raws]


def first_qa_records(count: int) -> list[dict]:
    """stage1 QA records with at least two questions."""
    return [r for r in raw_records("stage1") if r.get("data_type", "qa") == "qa" and len(r["question"]) >= 2][:count]


def make_batch(model, stage: str, recs: list[dict]):
    return Collator(get_stage(stage), model.tokenizer, model.tokens, DOC_MAX_LENGTH, MAX_LEN, top_k=TOP_K, seed=0)(recs)


def default_batch(model, stage: str):
    raws = first_qa_records(2) if stage == "stage1" else raw_records(stage)[:2]
    return make_batch(model, stage, records(stage, raws))


def mse_weight(stage: str) -> float:
    return 0.0 if stage == "stage2" else MSE_WEIGHT


def training_forward(model, batch, stage: str, seed: int):
    """The forward the trainer runs: training mode (LoRA dropout on), seeded."""
    model.train()
    torch.manual_seed(seed)
    return model(batch, mse_weight=mse_weight(stage))


@torch.no_grad()
def reference(model, batch, stage: str, seed: int, sample: int = 0) -> dict:
    """Answer-token statistics from a separate pass: the whole causal LM, every position, the full vocabulary.

    Same mode and dropout seed as `training_forward`, so the LoRA dropout masks are the same ones.
    """
    model.train()
    torch.manual_seed(seed)
    embeds, extras = model.decoder_inputs(batch, with_mse=mse_weight(stage) > 0)
    with model.adapter("decoder_adapter"):
        logits = model.causal_lm(inputs_embeds=embeds, attention_mask=batch.dec_mask, use_cache=False).logits
    assert logits.shape[-1] == len(model.tokenizer)  # every token of the vocabulary, not a subset
    log_probs = torch.log_softmax(logits[sample].double(), dim=-1)
    labels = batch.labels[sample]
    where = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1)  # position t predicts token t + 1
    gold = labels[where + 1]
    gold_lp = log_probs[where].gather(1, gold.unsqueeze(1)).squeeze(1)
    correct = int((log_probs[where].argmax(-1) == gold).sum())
    return {
        "ids": gold.tolist(),
        "probs": gold_lp.exp().tolist(),
        "correct": correct,
        "total": len(gold),
        "ce": float(-gold_lp.mean()),
        "chosen": extras.chosen,
    }


def token_texts(model, ids: list[int]) -> list[str]:
    return [model.tokenizer.decode([i]) for i in ids]


def memory_runs(model, ids: torch.Tensor) -> int:
    """Runs of consecutive memory tokens in one decoder input row (one run per document slot)."""
    first, n = model.tokens.first_mem_id, model.tokens.n_mem
    is_mem = ((ids >= first) & (ids < first + n)).tolist()
    return sum(1 for i, m in enumerate(is_mem) if m and (i == 0 or not is_mem[i - 1]))


def rgb(p: float) -> tuple[float, float, int]:
    """The colour README "The debug print" gives probability p, before rounding."""
    return 255 * (1 - p), 255 * p, 0


def printed(model, batch, out, max_tokens: int = 1000) -> str:
    return DebugPrinter(model.tokenizer, model.tokens, max_tokens).format_sample(batch, out)


# -- metrics: the printed numbers against an independent computation ----------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_printed_metrics_equal_an_independent_forward(stage, models, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    model = models(stage)
    batch = default_batch(model, stage)
    out = training_forward(model, batch, stage, seed=7)
    ref = reference(model, batch, stage, seed=7)
    assert ref["total"] >= 2
    if stage == "stage1":  # a long target: neither all right nor all wrong, so the count is a real check
        assert 0 < ref["correct"] < ref["total"]
    assert 0.05 < ref["ce"] < 20

    # The print reads the forward's output; it must not run the model again.
    calls = []
    hook = model.backbone.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        fields = only_print(printed(model, batch, out))
    finally:
        hook.remove()
    assert calls == []

    assert fields["sample"] == "0"
    assert (int(fields["correct"]), int(fields["total"])) == (ref["correct"], ref["total"])
    assert fields["acc"] == f"{100 * ref['correct'] / ref['total']:.2f}"
    assert re.fullmatch(r"\d+\.\d{6}", fields["ce"])
    assert float(fields["ce"]) == pytest.approx(ref["ce"], abs=2e-6)
    tokens, hidden = plain_tokens(fields["body"])
    assert hidden == 0
    assert [t for t, _ in tokens] == token_texts(model, ref["ids"])
    for (_, shown), p in zip(tokens, ref["probs"]):
        assert shown == pytest.approx(p, abs=0.005 + 1e-6)
    assert fields["question"] == fields["prompt_question"] == batch.questions[0]
    assert fields["answer"] == batch.answers[0]


def test_the_trainer_hands_the_hook_its_own_training_forward(monkeypatch):
    """optimizer_step: the hook runs once per optimizer step, for micro-batch 0, with that forward's output,
    and nothing runs the model a second time. Its numbers are those of the same seeded forward."""
    monkeypatch.setenv("NO_COLOR", "1")
    stage = "stage1"
    model = stage_model(stage)  # its own: the step changes the weights
    recs = records(stage, first_qa_records(4))
    batches = [make_batch(model, stage, recs[:2]), make_batch(model, stage, recs[2:])]
    seeds = [101, 102]
    ref = reference(model, batches[0], stage, seed=seeds[0])  # before the step changes the weights
    assert 0 < ref["correct"] < ref["total"]

    engine = CountingEngine(model, len(batches))
    seen = []
    texts = []
    printer = DebugPrinter(model.tokenizer, model.tokens, 1000)
    model.train()
    with single_process_group():
        optimizer_step(
            engine,
            engine.optimizer,
            batches,
            seeds,
            mse_weight=MSE_WEIGHT,
            on_first=lambda b, o: (seen.append((b, o)), texts.append(printer.format_sample(b, o))),
        )
    assert len(engine.outputs) == len(batches)  # one forward per micro-batch, none for the print
    assert len(seen) == 1 and seen[0][0] is batches[0] and seen[0][1] is engine.outputs[0]
    fields = only_print(texts[0])
    assert (int(fields["correct"]), int(fields["total"])) == (ref["correct"], ref["total"])
    assert float(fields["ce"]) == pytest.approx(ref["ce"], abs=2e-6)


class CountingEngine:
    """What optimizer_step needs of a DeepSpeed engine (plain AdamW, no ZeRO), counting the forwards."""

    def __init__(self, model, micro_batches: int):
        self.module, self.micro_batches, self.outputs, self.micro = model, micro_batches, [], 0
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def __call__(self, batch, **loss_weights):
        self.outputs.append(self.module(batch, **loss_weights))
        return self.outputs[-1]

    def backward(self, loss):
        loss.backward()

    def is_gradient_accumulation_boundary(self):
        return self.micro == self.micro_batches - 1

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro += 1


class single_process_group:
    """A one-process gloo group for optimizer_step's all-reduce, unless one exists already."""

    def __enter__(self):
        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        if self.owned:
            dist.destroy_process_group()


# -- colours, NO_COLOR, truncation ------------------------------------------------------------------------
def test_colour_runs_from_red_to_green():
    for p in (0.0, 0.25, 0.5, 0.93, 1.0):
        r, g, b = rgb(p)
        assert debug.colour(p) == f"{ESC}[38;2;{round(r)};{round(g)};0m"
    assert debug.colour(0.0) == f"{ESC}[38;2;255;0;0m" and debug.colour(1.0) == f"{ESC}[38;2;0;255;0m"


@pytest.mark.parametrize("stage", ["stage1", "stage1_2"])
def test_each_token_has_the_colour_of_its_probability(stage, models, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    model = models(stage)
    batch = default_batch(model, stage)
    out = training_forward(model, batch, stage, seed=3)
    ref = reference(model, batch, stage, seed=3)
    text = printed(model, batch, out)
    fields = only_print(text)
    tokens, hidden = coloured_tokens(fields["body"])
    assert hidden == 0
    assert [t for t, _ in tokens] == token_texts(model, ref["ids"])
    for (_, (r, g, b)), p in zip(tokens, ref["probs"]):
        want_r, want_g, _ = rgb(p)
        # 24-bit colour from the probability; within rounding of the independently computed one.
        assert abs(r - want_r) <= 0.5 + 1e-3 and abs(g - want_g) <= 0.5 + 1e-3 and b == 0, (r, g, p)
    if stage == "stage1":  # a long target: red and green tokens both, in many shades
        assert len({colour for _, colour in tokens}) > 10
        assert min(ref["probs"]) < 0.2 and max(ref["probs"]) > 0.8
    # Only the answer is coloured: the rest of the print is plain text.
    assert text.replace(fields["body"], "").count(ESC) == 0


@pytest.mark.parametrize("value", ["1", ""])
def test_no_color_shows_each_token_with_its_probability(value, models, monkeypatch):
    """NO_COLOR, whatever its value (even empty): no escape code; every token followed by [p]."""
    monkeypatch.setenv("NO_COLOR", value)
    stage = "stage1_2"
    model = models(stage)
    batch = default_batch(model, stage)
    out = training_forward(model, batch, stage, seed=5)
    ref = reference(model, batch, stage, seed=5)
    text = printed(model, batch, out)
    assert ESC not in text
    tokens, hidden = plain_tokens(only_print(text)["body"])
    assert hidden == 0 and len(tokens) == ref["total"]
    assert [t for t, _ in tokens] == token_texts(model, ref["ids"])
    assert max(abs(shown - p) for (_, shown), p in zip(tokens, ref["probs"])) <= 0.005 + 1e-6


@pytest.mark.parametrize("colour_on", [False, True])
def test_long_answers_are_cut_at_max_print_tokens(colour_on, models, monkeypatch):
    if colour_on:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", "1")
    stage = "stage1"  # QA targets hold every question/answer pair: long
    model = models(stage)
    batch = default_batch(model, stage)
    out = training_forward(model, batch, stage, seed=11)
    ref = reference(model, batch, stage, seed=11)
    total = ref["total"]
    assert total > 20
    parse = coloured_tokens if colour_on else plain_tokens
    for limit in (1, 7, total - 1, total, total + 5):
        fields = only_print(printed(model, batch, out, max_tokens=limit))
        tokens, hidden = parse(fields["body"])
        assert len(tokens) == min(limit, total)
        assert [t for t, _ in tokens] == token_texts(model, ref["ids"][:limit])
        assert hidden == max(total - limit, 0)
        assert fields["body"].endswith(f"...(+{total - limit} tokens)") == (limit < total)
        # The metrics still cover the whole answer.
        assert (int(fields["correct"]), int(fields["total"])) == (ref["correct"], total)


# -- what each stage adds -----------------------------------------------------------------------------
def test_stage2_prints_the_chosen_documents_and_pos_index(models, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    stage = "stage2"
    model = models(stage)
    raws = raw_records(stage)[:2]
    raws[1] = {key: value for key, value in raws[1].items() if key != "pos_index"}  # pos_index is optional
    recs = records(stage, raws[:1]) + [normalise(get_stage(stage), raws[1], min_docs=TOP_K)]
    batch = make_batch(model, stage, [recs[0], {**recs[1], "docs": recs[1]["docs"][:4]}])
    out = training_forward(model, batch, stage, seed=13)
    ref = reference(model, batch, stage, seed=13)
    fields = only_print(printed(model, batch, out))
    assert out.chosen.shape == (2, TOP_K)
    assert json.loads(fields["chosen"]) == out.chosen[0].tolist() == ref["chosen"][0].tolist()
    assert json.loads(fields["pos"]) == recs[0]["pos_index"]
    assert int(fields["slots"]) == TOP_K == memory_runs(model, batch.dec_ids[0])
    assert (int(fields["correct"]), int(fields["total"])) == (ref["correct"], ref["total"])
    assert float(fields["ce"]) == pytest.approx(ref["ce"], abs=2e-6)

    # Sample 1 has no pos_index: the print says so rather than failing.
    text = DebugPrinter(model.tokenizer, model.tokens, 5).format_sample(batch, out, sample=1)
    fields = only_print(text)
    assert fields["sample"] == "1" and fields["pos"] == "None"
    assert json.loads(fields["chosen"]) == out.chosen[1].tolist()

    # Stages 1 and 1_2 have no retrieval, hence no chosen line.
    for other in ("stage1", "stage1_2"):
        m = models(other)
        b = default_batch(m, other)
        assert only_print(printed(m, b, training_forward(m, b, other, seed=1)))["chosen"] is None


def test_stage1_qa_shows_the_first_question_and_answer(models, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    stage = "stage1"
    model = models(stage)
    raw = first_qa_records(1)[0]
    multi_doc = {
        "data_type": "qa",
        "question": ["What is the main food of Zed?", "What is the lucky number of Zed?"],
        "answers": ["bread", "nine"],
        "docs": ["Zed is a city. Its main food is bread.", "Zed's lucky number is nine."],
    }
    for record in (raw, multi_doc):
        batch = make_batch(model, stage, records(stage, [record, raw]))
        out = training_forward(model, batch, stage, seed=17)
        text = printed(model, batch, out)
        fields = only_print(text)
        assert fields["question"] == fields["prompt_question"] == record["question"][0]
        assert fields["answer"] == record["answers"][0]
        assert record["question"][1] not in fields["question"]
        # The coloured answer is the whole target: every pair of the record, in order.
        tokens, _ = plain_tokens(fields["body"])
        pairs = "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(record["question"], record["answers"]))
        assert "".join(t for t, _ in tokens).startswith(pairs)
        # Memory runs compacted: one <MEM...> entry per document slot of the decoder input, no <MEMi> text.
        assert int(fields["slots"]) == len(record["docs"]) == memory_runs(model, batch.dec_ids[0])
        assert "<MEM0>" not in text and "<SEP>" not in text


def test_a_non_finite_forward_still_prints(models, monkeypatch):
    """A NaN loss skips the optimizer step (README: "Outputs, checkpoints and resuming"); the debug print of that
    step must not crash it."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    stage = "stage1"
    model = models(stage)
    batch = default_batch(model, stage)
    out = training_forward(model, batch, stage, seed=19)
    out.lm.logits[out.lm.sample_index == 0] = float("nan")
    fields = only_print(printed(model, batch, out, max_tokens=3))
    assert fields["ce"] == "nan"
    tokens, hidden = coloured_tokens(fields["body"])
    assert len(tokens) == 3 and hidden == int(fields["total"]) - 3
    monkeypatch.setenv("NO_COLOR", "1")
    tokens, _ = plain_tokens(only_print(printed(model, batch, out, max_tokens=3))["body"])
    assert all(math.isnan(p) for _, p in tokens)


def test_a_diverged_step_prints_through_the_trainer(monkeypatch):
    """The real path: optimizer_step skips a NaN step but still calls the hook; the colour print survives it."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    stage = "stage1_2"
    model = stage_model(stage)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".decoder_adapter." in n and ".lora_B." in n).fill_(float("nan"))
    batch = default_batch(model, stage)
    texts = []
    printer = DebugPrinter(model.tokenizer, model.tokens, 100)
    model.train()
    with single_process_group():
        engine = CountingEngine(model, 1)
        result = optimizer_step(
            engine,
            engine.optimizer,
            [batch],
            [1],
            mse_weight=MSE_WEIGHT,
            on_first=lambda b, o: texts.append(printer.format_sample(b, o)),
        )
    assert result.skipped
    fields = only_print(texts[0])
    assert fields["ce"] == "nan"
    tokens, _ = coloured_tokens(fields["body"])
    assert len(tokens) == int(fields["total"]) > 0


def test_print_sample_flushes_before_the_progress_bar_returns(models, monkeypatch):
    """stdout on a pipe or file is block-buffered: an unflushed print would appear long after its step."""
    monkeypatch.setenv("NO_COLOR", "1")

    class Recorder:
        def __init__(self):
            self.text, self.flushed = "", []

        def write(self, part):
            self.text += part

        def flush(self):
            self.flushed.append(len(self.text))

    stage = "stage1_2"
    model = models(stage)
    batch = default_batch(model, stage)
    out = training_forward(model, batch, stage, seed=23)
    stream = Recorder()
    DebugPrinter(model.tokenizer, model.tokens, 100, stream=stream).print_sample(batch, out)
    assert stream.text == printed(model, batch, out, 100) + "\n"
    assert stream.flushed and stream.flushed[-1] == len(stream.text)


# -- real runs: the CLI with gradient accumulation, torchrun with two ranks, the launcher ------------------
# They start together, in the background, when the first test below needs them.
STAGE1_RECORDS = 40
CLI_ARGS = (
    "--stage",
    "stage1",
    "--dataset",
    str(EXAMPLES / FILES["stage1"]),
    "--max_samples",
    str(STAGE1_RECORDS),
    "--doc_max_length",
    "32",
    "--compress_rate",
    "8",
    "--seed",
    str(SEED),
    "--resume",
    "false",
    "--save_steps",
    "1000",
    "--debug_max_print_tokens",
    "5",
)
# Accumulation run: 5 optimizer steps of 2 micro-batches; a print every 2 steps -> steps 0, 2, 4.
ACCUM = {"max_steps": 5, "batch_size": 4, "micro_batch_size": 2, "every": 2, "steps": [0, 2, 4]}
# Two ranks: 3 steps of 4 samples (1 per micro-batch, 2 micro-batches per rank); a print every step.
TWO = {"max_steps": 3, "batch_size": 4, "micro_batch_size": 1, "every": 1, "steps": [0, 1, 2]}
# The launcher with its defaults (DEBUG_EVERY_STEPS 5; batch sizes read from the run) and MAX_STEPS 6.
LAUNCHER = {"max_steps": 6, "steps": [0, 5]}


def launcher_variables() -> set[str]:
    """Every setting the launcher reads, from its defaults block, so that a developer's shell cannot change a run."""
    text = (REPO / "train_single_gpu.sh").read_text()
    return set(re.findall(r'^: "\$\{(\w+):=', text, re.M)) | {"PYTHON"}


def clean_env(**extra) -> dict:
    # No NO_COLOR unless asked; no PYTHONUNBUFFERED, which users do not have and which would hide a missing flush.
    drop = launcher_variables() | {"NO_COLOR", "PYTHONUNBUFFERED"}
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.update({key: str(value) for key, value in extra.items()})
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    import psutil  # a DeepSpeed dependency

    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    for victim in [proc, *below]:
        try:
            victim.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    proc.wait()
    psutil.wait_procs(below, timeout=30)


class Background:
    """One command started now, stdout and stderr into one file (as a terminal or the launcher's log gets them)."""

    def __init__(self, name: str, args: list[str], env: dict, folder: Path):
        self.name, self.args, self.log = name, args, folder / f"{name}.out"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started = time.monotonic()
        self._output = None

    def output(self) -> str:
        if self._output is None:
            try:
                self.proc.wait(timeout=max(1.0, RUN_TIMEOUT - (time.monotonic() - self.started)))
            except subprocess.TimeoutExpired:
                kill_tree(self.proc)
                pytest.fail(f"{self.name} ran past {RUN_TIMEOUT}s:\n{self.log.read_text(errors='replace')[-3000:]}")
            self._output = self.log.read_text(errors="replace")
            assert self.proc.returncode == 0, f"{self.name}: exit {self.proc.returncode}\n{self._output[-4000:]}"
        return self._output


def trainer(*args) -> list[str]:
    return [sys.executable, "-m", "clara.train", *CLI_ARGS, *map(str, args)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("debug_runs")
    single = (
        "--max_steps",
        ACCUM["max_steps"],
        "--batch_size",
        ACCUM["batch_size"],
        "--micro_batch_size",
        ACCUM["micro_batch_size"],
        "--debug_every_steps",
        ACCUM["every"],
    )
    two = (
        "--max_steps",
        TWO["max_steps"],
        "--batch_size",
        TWO["batch_size"],
        "--micro_batch_size",
        TWO["micro_batch_size"],
        "--debug_every_steps",
        TWO["every"],
    )
    started = {
        "debug": Background("debug", trainer(*single, "--save_path", folder / "debug"), clean_env(NO_COLOR=1), folder),
        "quiet": Background(
            "quiet",
            trainer(*single, "--save_path", folder / "quiet", "--debug_mode", "false"),
            clean_env(NO_COLOR=1),
            folder,
        ),
        "two_ranks": Background(
            "two_ranks",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                "--log_dir",
                str(folder / "rank_logs"),
                "--tee",
                "3",
                "-m",
                "clara.train",
                *CLI_ARGS,
                *map(str, two),
                "--save_path",
                str(folder / "two_ranks"),
            ],
            clean_env(NO_COLOR=1),
            folder,
        ),
        "launcher": Background(
            "launcher",
            ["bash", "./train_single_gpu.sh"],
            clean_env(MAX_STEPS=LAUNCHER["max_steps"], SAVE_PATH=folder / "launcher", MASTER_PORT=free_port()),
            folder,
        ),
    }
    yield folder, started
    for run in started.values():
        if run.proc.poll() is None:
            kill_tree(run.proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expected_samples(
    count: int, steps: list[int], batch_size: int, micro_batch_size: int, world: int = 1
) -> list[dict]:
    """The raw stage1 record each print must show: the first sample of the step's first micro-batch on rank 0."""
    raws = raw_records("stage1")[:count]
    order = epoch_order(count, SEED, 0)
    return [raws[micro_batch_indices(order, step, 0, 0, world, batch_size, micro_batch_size)[0]] for step in steps]


def check_headers(fields: dict, raw: dict) -> None:
    assert fields["answer"] == (raw["answers"][0] if isinstance(raw["answers"], list) else raw["answers"])
    if raw.get("data_type", "qa") == "qa":
        assert fields["question"] == raw["question"][0]


def bar_counts(text: str) -> list[tuple[int, int]]:
    """(offset, steps done) of every state of the training progress bar (its description is the stage) in the output."""
    return [(m.start(), int(m.group(1))) for m in re.finditer(r"stage1: *\d+%\|[^|\r\n]*\| *(\d+)/\d+ \[", text)]


def check_printed_at_their_steps(text: str, steps: list[int]) -> None:
    """Each print appears while its step runs: after the bar showed `step` done, before it shows `step + 1`."""
    bars = bar_counts(text)
    for match, step in zip(PRINT.finditer(text), steps):
        before = [n for at, n in bars if at < match.start()]
        after = [n for at, n in bars if at > match.end()]
        assert max(before, default=0) <= step, f"the print of step {step} came after the bar showed {max(before)} steps"
        assert after and max(after) > step


@pytest.mark.slow
def test_one_print_per_qualifying_optimizer_step_with_accumulation(runs):
    folder, started = runs
    text = started["debug"].output()
    assert "gradient accumulation 2" in text
    found = parse_prints(text)
    assert len(found) == len(ACCUM["steps"]) == 3  # steps 0, 2, 4 of 5; not one per micro-batch
    lines = [json.loads(line) for line in (folder / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5]
    samples = expected_samples(STAGE1_RECORDS, ACCUM["steps"], ACCUM["batch_size"], ACCUM["micro_batch_size"])
    for fields, raw in zip(found, samples):
        check_headers(fields, raw)
        # DEBUG_MAX_PRINT_TOKENS 5: five tokens, then the count of the rest.
        tokens, hidden = plain_tokens(fields["body"])
        assert len(tokens) == 5 and hidden == int(fields["total"]) - 5 > 0
        assert fields["body"].endswith(f"...(+{hidden} tokens)")
    assert ESC not in text
    check_printed_at_their_steps(text, ACCUM["steps"])


@pytest.mark.slow
def test_the_print_does_not_change_the_training_result(runs):
    folder, started = runs
    started["debug"].output()
    assert HEADER not in started["quiet"].output()
    for name in ("adapters.safetensors", "special_tokens.safetensors"):
        with_print, without = load_file(folder / "debug" / name), load_file(folder / "quiet" / name)
        assert with_print.keys() == without.keys() and with_print
        for key in with_print:
            assert torch.equal(with_print[key], without[key]), f"{name}: {key} differs"

    def losses(run: str) -> list[float]:
        lines = (folder / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    assert losses("debug") == losses("quiet")


@pytest.mark.slow
def test_nothing_prints_on_rank_1(runs):
    folder, started = runs
    text = started["two_ranks"].output()
    assert "world size 2" in text
    # One copy per step in the combined output: as many prints as a single rank would make.
    assert text.count(HEADER) == len(TWO["steps"])
    assert not [line for line in text.splitlines() if line.startswith("[default1]:") and "[Debug]" in line]
    per_rank = {}
    for log in (folder / "rank_logs").rglob("std*.log"):
        rank = int(log.parent.name)
        per_rank.setdefault(rank, "")
        per_rank[rank] += log.read_text(errors="replace")
    assert set(per_rank) == {0, 1}, sorted((folder / "rank_logs").rglob("*"))
    assert per_rank[0].count(HEADER) == len(TWO["steps"])
    assert "[Debug]" not in per_rank[1]
    found = parse_prints(per_rank[0])
    samples = expected_samples(STAGE1_RECORDS, TWO["steps"], TWO["batch_size"], TWO["micro_batch_size"], world=2)
    for fields, raw in zip(found, samples):
        check_headers(fields, raw)


@pytest.mark.slow
def test_launcher_defaults_print_in_colour_every_5_steps(runs):
    folder, started = runs
    text = started["launcher"].output()
    # The trainer's resolved settings: the batch sizes are the launcher's (device- and model-dependent) defaults.
    settings = json.loads(re.search(r"^Settings: (\{.*\})$", text, re.M).group(1))
    assert settings["debug_mode"] is True and settings["debug_every_steps"] == 5
    assert settings["max_steps"] == LAUNCHER["max_steps"] and settings["max_samples"] is None
    found = parse_prints(text)
    assert len(found) == len(LAUNCHER["steps"]) == 2  # steps 0 and 5 of 6
    world = 1
    samples = expected_samples(
        len(raw_records("stage1")), LAUNCHER["steps"], settings["batch_size"], settings["micro_batch_size"], world
    )
    assert settings["dataset"].endswith(FILES["stage1"])
    limit = settings["debug_max_print_tokens"]
    for fields, raw in zip(found, samples):
        check_headers(fields, raw)
        tokens, hidden = coloured_tokens(fields["body"])
        total = int(fields["total"])
        assert tokens and len(tokens) == min(limit, total) and hidden == max(0, total - limit)
        assert all(b == 0 and abs(r + g - 255) <= 1 for _, (r, g, b) in tokens)
    check_printed_at_their_steps(text, LAUNCHER["steps"])
    # The launcher's log file holds the same prints.
    assert (folder / "launcher" / "train.log").read_text(errors="replace").count(HEADER) == 2
