"""scripts/gpu_check.sh where there is no GPU: one line saying so, exit 0, nothing installed or written;
and the report's arithmetic (targets, the memory plan's comparison rows) on made-up measurements."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from bench.gpu_check import TARGET_MFU, bench_rows, targets
from tests.helpers import REPO


def gpu_check(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "report")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_said_no_cuda(proc: subprocess.CompletedProcess, tmp_path: Path) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), lines
    assert not (tmp_path / "report").exists()


def test_hidden_gpus_mean_one_line_and_exit_0(tmp_path):
    """CUDA_VISIBLE_DEVICES empty hides every GPU, on any machine."""
    assert_said_no_cuda(gpu_check(tmp_path, {**os.environ, "CUDA_VISIBLE_DEVICES": ""}), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_machine_without_cuda_means_one_line_and_exit_0(tmp_path):
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    assert_said_no_cuda(gpu_check(tmp_path, env), tmp_path)


def test_flash_attention_rows_only_with_its_wheel():
    without, with_fa2 = bench_rows(False), bench_rows(True)
    assert {cfg.flash_attn for cfg in without} == {"false"}
    assert [cfg.label for cfg in with_fa2 if cfg.flash_attn == "true"] == [
        "qwen3-1.7b stage1 no-gc FA2",
        "qwen3-1.7b stage1 gc FA2",
    ]
    assert without[0].label == "qwen3-1.7b stage1 no-gc SDPA" and without[0].profile
    labels = {cfg.label for cfg in without}
    for stage in ("stage1", "stage1_2", "stage2"):
        assert {f"qwen3-1.7b {stage} gc SDPA", f"qwen3-1.7b {stage} no-gc SDPA"} <= labels


def test_targets_from_measured_rows():
    def row(label: str, step: float, peak: float, mfu: float) -> dict:
        return {"label": label, "step_time_s": step, "peak_memory_mb": peak, "mfu": mfu}

    results = [
        row("qwen3-1.7b stage1 no-gc SDPA", 1.0, 40000, 0.45),
        row("qwen3-1.7b stage1 gc SDPA", 1.4, 16000, 0.32),
        {"label": "qwen3-1.7b stage1 no-gc FA2", "error": "failed"},
    ]
    found = {t["target"]: t for t in targets(results)}
    assert found[f"stage1 MFU >= {TARGET_MFU:.0%} (qwen3-1.7b stage1 no-gc SDPA)"]["met"] is True
    assert found[f"stage1 MFU >= {TARGET_MFU:.0%} (qwen3-1.7b stage1 gc SDPA)"]["met"] is False
    memory = found["checkpointing peak memory <= 0.5 x (SDPA)"]
    assert memory["value"] == pytest.approx(0.4) and memory["met"]
    time_ratio = found["checkpointing step time <= 1.35 x (SDPA)"]
    assert time_ratio["value"] == pytest.approx(1.4) and not time_ratio["met"]
    assert not any("FA2" in name for name in found)
