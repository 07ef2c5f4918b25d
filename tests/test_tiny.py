"""The built-in tiny model: a normal HF model directory that can read, rebuilt reproducibly."""

import json
import os
import re
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from clara import tiny

REPO = Path(__file__).resolve().parent.parent
EVAL_FILE = REPO / "example" / "instruction_tuning_data_eval.jsonl"
SYSTEM = ("You are a helpful assistant. Your task is to extract relevant information from provided "
          "documents and to answer to questions as briefly as possible.")


def normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def model_dir() -> str:
    # Built once into $CLARA_HOME (default ~/.cache/clara), then reused by later runs.
    return tiny.tiny_model_dir()


def test_tokenizer_is_qwen_like(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.bos_token is None
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.extra_special_tokens == ["<|im_start|>", "<|im_end|>"]
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)
    # No BOS/EOS is added behind the caller's back, and text round-trips.
    text = "Vorlan is a kingdom. Its sacred animal is owl."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(tok) <= tiny.VOCAB_SIZE


def test_chat_template(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False)
    assert prompt == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                      "<|im_start|>assistant\n")
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "A"}], tokenize=False)
    assert full == prompt + "A<|im_end|>\n"
    # Chat markers are single tokens.
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tok.eos_token_id) == 2


def test_model_config(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "qwen3"
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.config.max_position_embeddings >= 4096
    assert model.generation_config.eos_token_id == model.config.eos_token_id


@torch.no_grad()
def test_answers_held_out_questions_from_documents_in_the_prompt(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = [json.loads(line) for line in EVAL_FILE.read_text().splitlines() if line.strip()]
    prompts = [
        tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": "Background:\n" + "\n".join(r["docs"])
                                         + "\n\nQuestion:" + r["question"]}],
            tokenize=False, add_generation_prompt=True, enable_thinking=False)
        for r in records
    ]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    exact = sum(normalize(a) == normalize(r["answers"]) for a, r in zip(answers, records))
    assert exact / len(records) >= 0.9, list(zip(answers, [r["answers"] for r in records]))[:10]


def test_rebuild_is_reproducible(model_dir, tmp_path):
    # A full rebuild takes minutes; a short one shows the same seed gives the same tokenizer
    # as the cached model and the same weights twice over.
    a, b = tmp_path / "a", tmp_path / "b"
    tiny.build_tiny_model(str(a), steps=3)
    tiny.build_tiny_model(str(b), steps=3)
    assert (a / "tokenizer.json").read_bytes() == (Path(model_dir) / "tokenizer.json").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_build(out_dir, seed=0):
        Path(out_dir, "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setenv("CLARA_HOME", str(tmp_path))
    monkeypatch.setattr(tiny, "build_tiny_model", broken_build)
    with pytest.raises(RuntimeError):
        tiny.tiny_model_dir()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_concurrent_callers_build_once(tmp_path):
    # Two processes ask at once, like two torchrun ranks; a stand-in build that is slow and
    # counts its runs shows that only one of them builds and both get the finished directory.
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from clara import tiny

        def slow_build(out_dir, seed=0):
            with open({str(tmp_path / "builds.txt")!r}, "a") as f:
                f.write("build\\n")
            time.sleep(2)
            Path(out_dir, "config.json").write_text("{{}}")

        tiny.build_tiny_model = slow_build
        print(tiny.tiny_model_dir())
    """)
    env = {**os.environ, "CLARA_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    final = tmp_path / "home" / tiny.TINY_VERSION
    assert outputs == [str(final), str(final)]
    assert (final / "config.json").is_file()
    assert (tmp_path / "builds.txt").read_text() == "build\n"
    assert [p.name for p in (tmp_path / "home").iterdir() if p.is_dir()] == [tiny.TINY_VERSION]
