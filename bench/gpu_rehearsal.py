"""The GPU check rehearsed on CPU (`python -m bench.gpu_check --cpu-rehearsal`): the GPU tests import, each
stage steps once in bench's child process, and the launcher trains one step of the built-in tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.__main__ import REPO, run_config
from bench.config import BenchConfig
from bench.machine import machine_info
from clara.stages import STAGES

REHEARSAL_ROW = dict(
    warmup_steps=0,
    steps=1,
    micro_batch_size=2,
    docs=2,
    candidates=6,
    top_k=2,
    doc_max_length=64,
    compress_rate=16,
    flash_attn="false",
)


def rehearse_launcher(out: Path, limit: float) -> dict:
    """train_single_gpu.sh for one step of stage1 on the built-in tiny model, on CPU."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "NO_COLOR": "1",
        "SAVE_PATH": str(out / "rehearsal_run"),
        "MAX_STEPS": "1",
        "MAX_SAMPLES": "8",
        "BATCH_SIZE": "2",
        "MICRO_BATCH_SIZE": "2",
        "DEBUG_MODE": "false",
    }
    log = out / "rehearsal_launcher.log"
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        try:
            code = subprocess.run(
                ["bash", "train_single_gpu.sh"],
                cwd=REPO,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=limit,
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    status = "timed out" if code is None else "passed" if code == 0 else "failed"
    return {"status": status, "exit_code": code, "seconds": round(time.monotonic() - started, 1), "log": log.name}


def rehearse(out: Path) -> int:
    """Import the GPU tests, step each stage once in bench's child process and run the launcher, on CPU."""
    report = {"machine": machine_info(), "parts": {}}
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-n", "0", "--collect-only", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report["parts"]["import tests/test_gpu.py"] = {
        "status": "passed" if collect.returncode == 0 else "failed",
        "output": collect.stdout[-2000:] + collect.stderr[-2000:],
    }
    for stage in STAGES:
        row = run_config(BenchConfig(stage=stage, **REHEARSAL_ROW, label=f"tiny {stage}"), 300, exact_memory=False)
        report["parts"][f"bench step {stage}"] = {
            "status": "passed" if "step_time_s" in row else "failed",
            "detail": f"loss {row.get('loss')}, step {row.get('step_time_s')} s"
            if "step_time_s" in row
            else row.get("error_detail", row.get("error")),
        }
    report["parts"]["launcher"] = rehearse_launcher(out, 300)
    report["status"] = "passed" if all(p["status"] == "passed" for p in report["parts"].values()) else "failed"
    (out / "rehearsal_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(
        f"gpu_check rehearsal on CPU: Python {report['machine']['python']}, torch {report['machine']['torch']}, "
        f"transformers {report['machine']['transformers']}, peft {report['machine']['peft']}, "
        f"deepspeed {report['machine']['deepspeed']}"
    )
    for name, part in report["parts"].items():
        detail = part.get("detail") or part.get("log") or ""
        print(f"  {part['status']:9} {name}" + (f": {str(detail)[-600:]}" if detail else ""))
    print(f"rehearsal: {report['status']}")
    return 0 if report["status"] == "passed" else 1
