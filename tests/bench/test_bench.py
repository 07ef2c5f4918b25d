"""The benchmark (README: "What a step costs"): `python -m bench` runs at the smallest size and its JSON holds sane
numbers; the FLOP count treats the frozen base and LoRA as the issue describes; the sweep plans the
scaling rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from bench.cli import build_parser, config_from_args, parse_args
from bench.config import SHAPES, BenchConfig
from bench.flops import ModelShape, pass_flops, peak_flops, step_flops
from bench.machine import wait_for_load
from bench.sweeps import SWEEPS, sweep_configs
from clara.stages import get_stage
from tests.helpers import REPO

DOC_MAX_LENGTH = 32
COMPRESS_RATE = 8
N_MEM = DOC_MAX_LENGTH // COMPRESS_RATE


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def small_args() -> list[str]:
    """The smallest model: one layer of width 32, the vocabulary just large enough for the tokenizer."""
    from clara.training.tiny import build_tokenizer

    vocab = len(build_tokenizer()) + N_MEM + 3
    return [
        "--hidden_size",
        "32",
        "--num_layers",
        "1",
        "--num_heads",
        "2",
        "--num_kv_heads",
        "1",
        "--intermediate_size",
        "64",
        "--vocab_size",
        str(vocab),
        "--doc_max_length",
        str(DOC_MAX_LENGTH),
        "--compress_rate",
        str(COMPRESS_RATE),
        "--question_tokens",
        "8",
        "--answer_tokens",
        "4",
        "--warmup_steps",
        "1",
        "--steps",
        "2",
        "--threads",
        "1",
    ]


def small_run(small_args: list[str], out, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """`python -m bench` at the smallest size with `args`, its JSON written to `out`; and the vocabulary size."""
    vocab = int(small_args[small_args.index("--vocab_size") + 1])
    return bench(*small_args, *args, "--json", str(out)), vocab


def check_result(result: dict, stage: str, docs: int, micro_batch: int, vocab: int) -> None:
    assert "error" not in result, result.get("error_detail")
    assert result["stage"] == stage and result["device"] in ("cpu", "cuda")
    assert result["steps_timed"] == 2 and len(result["step_times_s"]) == 2
    for key in (
        "step_time_s",
        "samples_per_s",
        "tokens_per_s",
        "tokens_per_step",
        "peak_memory_mb",
        "base_memory_mb",
        "model_flops_per_step",
        "achieved_tflops",
    ):
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, key
    assert 0 <= result["step_memory_mb"] <= result["peak_memory_mb"]
    assert result["peak_memory_mb"] == pytest.approx(result["base_memory_mb"] + result["step_memory_mb"])
    assert result["samples_per_s"] == pytest.approx(micro_batch / result["step_time_s"])
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["step_time_s"])
    assert result["step_time_min_s"] <= result["step_time_s"] <= result["step_time_max_s"]
    # Every synthetic document fills DOC_MAX_LENGTH (+ <ENC>, BOS, EOS) and carries the memory tokens.
    assert result["tokens_per_step"] > micro_batch * docs * (DOC_MAX_LENGTH + 3 + N_MEM)
    assert result["vocab_size"] == vocab
    assert 0 < result["params_trainable"] < result["params_total"]
    assert result["losses_finite"] and 0 < result["loss"] < 2 * math.log(vocab)
    parts = result["model_flops_parts"]
    assert parts["total"] == pytest.approx(result["model_flops_per_step"])
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    if result["device"] == "cpu":
        assert result["mfu"] is None and result["memory_kind"] in ("rss", "rss_sampled")
    elif result["mfu"] is not None:
        assert 0 < result["mfu"] < 1


def test_help_documents_every_option():
    proc = bench("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    parser = build_parser()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in proc.stdout, option
        assert action.help, action.option_strings
    for group in SWEEPS:
        assert group in proc.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--doc_max_length", "100", "--compress_rate", "32"], "--doc_max_length=100"),
        (["--stage", "stage2", "--candidates", "3", "--top_k", "5"], "--candidates=3"),
        (["--sweep", "nonsense"], "nonsense"),
    ],
)
def test_bad_settings_stop_before_measuring(args, expected):
    proc = bench(*args, timeout=120)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_stage2_run_reports_sane_numbers(small_args, tmp_path):
    out = tmp_path / "bench.json"
    proc, vocab = small_run(
        small_args, out, "--stage", "stage2", "--candidates", "6", "--top_k", "2", "--candidate_chunk_size", "4"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step s" in proc.stdout and "stage2" in proc.stdout  # the table
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] > 0 and report["machine"]["torch"]
    (result,) = report["results"]
    check_result(result, "stage2", docs=6, micro_batch=1, vocab=vocab)
    assert result["candidate_compression_memory_mb"] >= 0
    assert set(result["model_flops_parts"]) == {"query", "candidates", "decoder", "lm_head", "total"}
    assert result["config"]["candidate_chunk_size"] == 4


@pytest.mark.slow
def test_stage1_run_with_gradient_checkpointing(small_args, tmp_path):
    out = tmp_path / "bench.json"
    options = ["--docs", "2", "--micro_batch_size", "2", "--gradient_checkpointing", "true", "--profile", "true"]
    proc, vocab = small_run(small_args, out, "--stage", "stage1", *options)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads(out.read_text())["results"]
    check_result(result, "stage1", docs=2, micro_batch=2, vocab=vocab)
    assert result["gradient_checkpointing"] is True
    assert result["candidate_compression_memory_mb"] is None
    assert set(result["model_flops_parts"]) == {"documents", "decoder", "lm_head", "total"}
    # The batch as collated (two documents per sample, each filling DOC_MAX_LENGTH) and the profiled step.
    shapes = result["batch_shapes"]
    assert shapes["enc"] == [4, DOC_MAX_LENGTH + 3 + N_MEM] and shapes["dec"][0] == 2 and shapes["query"] is None
    assert 0 < shapes["supervised"] < 2 * shapes["dec"][1]
    profile = result["profile"]
    assert profile["clock"] == "cpu" and 0 < profile["busy_s"] and profile["step_s"] > 0
    assert set(profile["by_kind_s"]) <= {"matmul", "attention", "communication", "other"}
    assert "matmul" in profile["by_kind_s"]


def test_named_shape_sets_the_shape_and_given_options_win():
    cfg = config_from_args(parse_args(["--shape", "qwen3-1.7b", "--num_layers", "2"]))
    assert cfg.num_layers == 2
    assert {k: getattr(cfg, k) for k in SHAPES["qwen3-1.7b"] if k != "num_layers"} == {
        k: v for k, v in SHAPES["qwen3-1.7b"].items() if k != "num_layers"
    }
    assert config_from_args(parse_args([])).hidden_size == BenchConfig().hidden_size


# -- the FLOP count ----------------------------------------------------------------------------------------
SHAPE = ModelShape(layers=2, hidden=8, vocab=100, attention_width=0, linear_params=1000, lora_params=10)


def test_frozen_base_backward_counts_activation_gradients_only():
    n, r, tokens = SHAPE.linear_params, SHAPE.lora_params, 7
    forward = pass_flops(SHAPE, [tokens], grad=False, adapter_trained=False)
    assert forward == 2 * (n + r) * tokens
    # Frozen base: 4 N per token (not 6 N); LoRA weight gradients only where the adapter trains.
    assert pass_flops(SHAPE, [tokens], grad=True, adapter_trained=True) == 4 * (n + r) * tokens + 2 * r * tokens
    assert pass_flops(SHAPE, [tokens], grad=True, adapter_trained=False) == 4 * (n + r) * tokens


def test_causal_attention_and_lm_head():
    shape = ModelShape(layers=3, hidden=8, vocab=100, attention_width=16, linear_params=0, lora_params=0)
    s = 5
    forward = pass_flops(shape, [s], grad=False, adapter_trained=False)
    assert forward == 2 * 3 * 16 * s * (s + 1)  # Q K^T and A V over the s (s + 1) / 2 causal pairs
    assert pass_flops(shape, [s], grad=True, adapter_trained=True) == 3 * forward
    parts = step_flops(shape, get_stage("stage1"), [s], [s], supervised=4)
    assert parts["lm_head"] == 4 * 100 * 8 * 4


def test_stage2_candidates_are_forward_only():
    docs, dec, query = [40] * 6, [30], [12]
    parts = step_flops(SHAPE, get_stage("stage2"), docs, dec, supervised=3, query_lengths=query)
    assert parts["candidates"] == pass_flops(SHAPE, docs, grad=False, adapter_trained=False)
    assert parts["query"] == pass_flops(SHAPE, query, grad=True, adapter_trained=True)
    assert parts["total"] == pytest.approx(parts["query"] + parts["candidates"] + parts["decoder"] + parts["lm_head"])
    assert "documents" not in parts


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert peak_flops("Tesla T4") is None


# -- the sweep plan ----------------------------------------------------------------------------------------
def test_sweep_rows_cover_the_scaling_settings():
    rows = sweep_configs(BenchConfig(), "all")
    assert all(not cfg.problems() for cfg in rows)
    by_group = {}
    for cfg in rows:
        by_group.setdefault(cfg.group, []).append(cfg)
    assert [c.candidates for c in by_group["candidates"]] == [5, 10, 20, 40]
    assert all(c.stage == "stage2" for c in by_group["candidates"] + by_group["chunk"])
    assert [(c.candidates, c.candidate_chunk_size) for c in by_group["chunk"]] == [(20, 8), (40, 8), (40, 40)]
    assert [c.micro_batch_size for c in by_group["micro_batch"]] == [1, 2, 4]
    assert [c.compress_rate for c in by_group["compress_rate"]] == [4, 16, 32, 128]
    assert [c.zero_stage for c in by_group["zero"]] == [2, 3]
    only = sweep_configs(BenchConfig(stage="stage1_2"), "micro_batch")
    assert {c.stage for c in only} == {"stage1_2"}
    with pytest.raises(ValueError):
        sweep_configs(BenchConfig(), "micro_batch,bogus")


def test_load_gate_gives_up_after_its_timeout():
    started = time.monotonic()
    load = wait_for_load(max_load=0.0, timeout=0)  # the load is never below 0: waits at most the timeout
    assert time.monotonic() - started < 5
    assert load is None or load >= 0
