"""The built-in tiny model: a normal HF model directory that can read, shipped with the package and
rebuilt reproducibly from its recipe."""

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clara.training import tiny
from tests.helpers import REPO


@pytest.fixture(scope="module")
def model_dir() -> str:
    return tiny.tiny_model_dir()


def test_the_shipped_model_is_built_from_the_current_recipe(model_dir):
    # Fails when the code of tiny.py, example_data.py, the schedule or the prompts it uses, or the example
    # training files changed after the shipped model was built.
    recorded = {key: value for key, value in tiny.read_recipe(model_dir).items() if key != "earlier_versions"}
    assert recorded == {"version": tiny.recipe_version(), "seed": 0, "steps": tiny.TRAIN_STEPS}, (
        f"the recipe changed since {model_dir} was built; rebuild it: python -m clara.tiny --out {model_dir}"
    )
    assert (
        Path(model_dir).parent == Path(tiny.__file__).parent.parent
    )  # clara/tiny_model, the builder in clara/training
    assert sum(p.stat().st_size for p in Path(model_dir).iterdir()) < 2_000_000


def test_the_recipe_hash_follows_the_training_data_and_not_comments(tmp_path, monkeypatch):
    shipped = tiny.recipe_version()
    example = tmp_path / "example"
    shutil.copytree(REPO / "example", example)
    monkeypatch.setattr(tiny, "EXAMPLE_DIR", example)
    tiny.recipe_version.cache_clear()
    try:
        assert tiny.recipe_version() == shipped
        with open(example / tiny.TRAIN_FILES[1], "a", encoding="utf-8") as handle:
            handle.write("\n")
        tiny.recipe_version.cache_clear()
        assert tiny.recipe_version() != shipped
        assert tiny.recipe_version(seed=1) != tiny.recipe_version()
    finally:
        tiny.recipe_version.cache_clear()
    source = Path(tiny.__file__).read_text(encoding="utf-8")
    commented = source.replace("\nVOCAB_SIZE", "\n    # reworded explanation\nVOCAB_SIZE")
    assert tiny.code_meaning(commented) == tiny.code_meaning(source)
    assert tiny.code_meaning(source.replace("ANSWER_WEIGHT = 30.0", "ANSWER_WEIGHT = 31.0")) != tiny.code_meaning(
        source
    )


def test_the_recipe_hash_survives_moving_and_reformatting_the_code():
    # The version names the weights, not the text: a formatter, reworded docstrings or comments, and
    # imports from a module's new place leave every shipped model and tiny checkpoint valid.
    for module in (tiny, tiny.example_data):
        source = Path(module.__file__).read_text(encoding="utf-8")
        tree = ast.parse(source)
        reformatted = ast.unparse(tree)  # one statement a line, its own quotes and parentheses, no comments
        assert reformatted != source
        assert tiny.code_meaning(reformatted) == tiny.code_meaning(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.Module)) and ast.get_docstring(node) is not None:
                node.body[0].value.value = "Reworded."
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clara."):
                node.module = node.module.replace("clara.", "clara.moved.", 1)
        first_import = next(i for i, node in enumerate(tree.body) if isinstance(node, (ast.Import, ast.ImportFrom)))
        tree.body.insert(first_import, ast.Import(names=[ast.alias(name="os")]))
        assert tiny.code_meaning(ast.unparse(tree)) == tiny.code_meaning(source)
        indented = "class Holder:\n" + "".join(f"    {line}\n" for line in reformatted.splitlines())
        assert tiny.code_meaning(textwrap.dedent(indented.split("\n", 1)[1])) == tiny.code_meaning(source)
    assert tiny.code_meaning("x = f'{a:<{w}}'\n") == tiny.code_meaning('x = f"{a:<{w}}"  # the same\n')
    assert tiny.code_meaning("x = f'{a:<{w}}'\n") != tiny.code_meaning("x = f'{a:>{w}}'\n")


def test_rebuild_is_reproducible(model_dir, tmp_path):
    # A full rebuild takes about 10 minutes of one core; two short ones give the same files byte
    # for byte, and everything but the weights and the recipe record is what the shipped model has.
    a, b = tmp_path / "a", tmp_path / "b"
    tiny.build_tiny_model(str(a), steps=3)
    tiny.build_tiny_model(str(b), steps=3)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in Path(model_dir).iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        if name not in ("model.safetensors", tiny.RECIPE_FILE):
            assert (a / name).read_bytes() == (Path(model_dir) / name).read_bytes(), name
    assert tiny.read_recipe(str(a)) == {"version": tiny.recipe_version(0, 3), "seed": 0, "steps": 3}


def test_an_interrupted_build_leaves_no_recipe_record(tmp_path, monkeypatch):
    # recipe.json marks a complete build: an earlier one's record goes before training starts.
    out = tmp_path / "model"
    out.mkdir()
    (out / tiny.RECIPE_FILE).write_text('{"version": "tiny-000000000000", "seed": 0, "steps": 3}')

    def killed(out_dir, seed, steps):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "_train_tiny_model", killed)
    with pytest.raises(KeyboardInterrupt):
        tiny.build_tiny_model(str(out), steps=3)
    assert not (out / tiny.RECIPE_FILE).exists()


def test_importing_clara_needs_neither_the_example_data_nor_a_build(tmp_path):
    # An installed package: clara/ (with the shipped model) and no example/ beside it.
    shutil.copytree(REPO / "clara", tmp_path / "clara", ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import clara.model.checkpoint\nfrom clara import CLaRa\nfrom clara.training import tiny\n"
        "print(tiny.tiny_model_dir(), tiny.tiny_version())"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CLARA_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "clara" / "tiny_model"), tiny.tiny_version()]
    assert not (tmp_path / "home").exists()


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
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
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


def test_check_command_reads_held_out_questions_from_documents_in_the_prompt(model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "clara.tiny"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"the shipped model {tiny.recipe_version()} in {model_dir} matches the recipe" in result.stdout
    score = re.search(r"held-out exact match with the documents in the prompt: ([0-9.]+)%", result.stdout)
    assert score and float(score.group(1)) >= 90, result.stdout
