"""The GPU check's measuring and reporting half (scripts/gpu_check.sh installs the carried wheels, then runs this).

`python -m bench.gpu_check --out DIR` runs, each part under its own time limit and each whatever became of
the one before: `bench` at the Qwen3-1.7B shape per stage with and without gradient checkpointing, SDPA and
(when its wheel installed) FlashAttention-2, then the GPU-marked tests (tests/test_gpu.py) and the launcher
end to end on the GPU with a resume. It writes DIR/gpu_report.json and DIR/gpu_report.txt (also printed):
what ran, what passed, the measured figures, the issue's targets met or missed, and bench.memory's computed
peaks next to the measured ones. Exit status 0 when every part passed, else 1.

`python -m bench.gpu_check --cpu-rehearsal --out DIR` proves, on a machine without a GPU, that an
environment set up like the GPU machine's reaches the GPU code: it imports the check's tests, steps each
stage once through the bench's child process, and runs the launcher for one step, all on CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from bench.__main__ import run_config
from bench.config import SHAPES, BenchConfig
from bench.gpu_rehearsal import rehearse
from bench.machine import machine_info
from bench.memory import Workload, step_memory
from bench.memory_parts import dims_of

REPO = Path(__file__).resolve().parent.parent
MB = 2**20

# Seconds per part. The bench part runs first and gets what --budget_s leaves after the two test parts'
# limits (scripts/gpu_check.sh passes what is left of its 5 minutes), at least BENCH_MIN_S.
LIMITS = {"tests": 100, "launcher": 90}
BENCH_MIN_S = 60
BENCH_CONFIG_LIMIT = 60

# The targets, at the 1.7B shape in bf16.
TARGET_MFU = 0.40
TARGET_MEMORY_RATIO = 0.5
TARGET_TIME_RATIO = 1.35

# The benchmark's workload at the 1.7B shape: eight samples of four 256-token documents per step (stage2:
# twenty candidates, five read), enough tokens per step for the matrix multiplies to fill the GPU.
BENCH_SETTINGS = dict(
    micro_batch_size=8,
    docs=4,
    candidates=20,
    top_k=5,
    doc_max_length=256,
    compress_rate=32,
    question_tokens=24,
    answer_tokens=16,
    warmup_steps=2,
    steps=5,
    zero_stage=2,
)


def bench_rows(flash_attn_installed: bool) -> list[BenchConfig]:
    """The rows to measure, most wanted first (a row the time limit cuts off is reported as not run)."""
    rows = []

    def add(shape: str, stage: str, checkpointing: bool, attention: str, profile: bool = False) -> None:
        label = f"{shape} {stage} {'gc' if checkpointing else 'no-gc'} {'FA2' if attention == 'true' else 'SDPA'}"
        rows.append(
            BenchConfig(
                **SHAPES[shape],
                **BENCH_SETTINGS,
                stage=stage,
                gradient_checkpointing=checkpointing,
                flash_attn=attention,
                profile=profile,
                group=shape,
                label=label,
            )
        )

    add("qwen3-1.7b", "stage1", False, "false", profile=True)
    add("qwen3-1.7b", "stage1", True, "false")
    if flash_attn_installed:
        add("qwen3-1.7b", "stage1", False, "true", profile=True)
        add("qwen3-1.7b", "stage1", True, "true")
    for stage in ("stage1_2", "stage2"):
        for checkpointing in (True, False):
            add("qwen3-1.7b", stage, checkpointing, "false")
    for checkpointing in (True, False):
        add("qwen3-0.6b", "stage1", checkpointing, "false")
    # ZeRO-3 on one GPU: the 1.7B stage1 row again with the base partitioned over one rank. It shows what
    # gathering the parameters costs per step; its memory saving needs several GPUs.
    zero3 = BenchConfig.from_dict({**rows[1].to_dict(), "zero_stage": 3})
    zero3.label = rows[1].label + " ZeRO-3"
    rows.append(zero3)
    return rows


# -- the parts -------------------------------------------------------------------------------------------------
def run_pytest(out: Path, name: str, selection: str, limit: float) -> dict:
    """`pytest -m gpu tests/test_gpu.py -k SELECTION`; outcomes, times and recorded properties from its JUnit XML."""
    xml = out / f"pytest_{name}.xml"
    log = out / f"pytest_{name}.log"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests/test_gpu.py",
        "-n",
        "0",  # one process: the tests share the GPU and its process group
        "-k",
        selection,
        "-q",
        "-rA",
        f"--junitxml={xml}",
        "-o",
        "junit_logging=no",
    ]
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = None
    part = {
        "command": " ".join(command),
        "seconds": round(time.monotonic() - started, 1),
        "log": log.name,
        "exit_code": code,
        "tests": junit_cases(xml) if xml.is_file() else [],
    }
    passed = code == 0 and part["tests"] and all(case["outcome"] == "passed" for case in part["tests"])
    part["status"] = "timed out" if code is None else "passed" if passed else "failed"
    return part


def junit_cases(xml: Path) -> list[dict]:
    cases = []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        message = None
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (found.get("message") or "")[:500]
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "seconds": float(case.get("time", 0)),
                "message": message,
                "properties": properties,
            }
        )
    return cases


def run_bench(rows: list[BenchConfig], limit: float) -> dict:
    deadline = time.monotonic() + limit
    results = []
    for cfg in rows:
        left = deadline - time.monotonic()
        if left < 20:
            results.append({"label": cfg.label, "config": cfg.to_dict(), "not_run": "the bench part's time limit"})
            continue
        result = run_config(cfg, min(BENCH_CONFIG_LIMIT, left), exact_memory=False)
        result["label"] = cfg.label
        results.append(result)
    measured = [r for r in results if "step_time_s" in r]
    status = "passed" if len(measured) == len(results) else "partial" if measured else "failed"
    return {"status": status, "results": results}


# -- figures, targets, memory check ------------------------------------------------------------------------
def find(results: list[dict], label: str) -> dict | None:
    return next((r for r in results if r.get("label") == label and "step_time_s" in r), None)


def targets(results: list[dict]) -> list[dict]:
    """Stage1 MFU at 1.7B, and gradient checkpointing's memory and time against the step without it."""
    found = []
    for attention in ("SDPA", "FA2"):
        plain = find(results, f"qwen3-1.7b stage1 no-gc {attention}")
        checkpointed = find(results, f"qwen3-1.7b stage1 gc {attention}")
        for row in (plain, checkpointed):
            if row and row.get("mfu") is not None:
                found.append(
                    {
                        "target": f"stage1 MFU >= {TARGET_MFU:.0%} ({row['label']})",
                        "value": row["mfu"],
                        "met": row["mfu"] >= TARGET_MFU,
                    }
                )
        if plain and checkpointed:
            memory = checkpointed["peak_memory_mb"] / plain["peak_memory_mb"]
            slower = checkpointed["step_time_s"] / plain["step_time_s"]
            found.append(
                {
                    "target": f"checkpointing peak memory <= {TARGET_MEMORY_RATIO} x ({attention})",
                    "value": memory,
                    "met": memory <= TARGET_MEMORY_RATIO,
                }
            )
            found.append(
                {
                    "target": f"checkpointing step time <= {TARGET_TIME_RATIO} x ({attention})",
                    "value": slower,
                    "met": slower <= TARGET_TIME_RATIO,
                }
            )
    return found


def predicted_peak(result: dict) -> float:
    """bench.memory's peak for a measured bench row, from the batch it collated."""
    cfg = result["config"]
    shapes = result["batch_shapes"]
    samples = shapes["dec"][0]
    n_mem = cfg["doc_max_length"] // cfg["compress_rate"]
    stage = BenchConfig.from_dict(cfg).stage_spec
    slots = cfg["top_k"] if stage.uses_query else shapes["enc"][0] // samples
    work = Workload(
        stage=stage,
        micro_batch_size=samples,
        docs_per_sample=shapes["enc"][0] // samples,
        doc_max_length=cfg["doc_max_length"],
        compress_rate=cfg["compress_rate"],
        top_k=cfg["top_k"],
        prompt_tokens=shapes["dec"][1] - slots * n_mem,
        supervised_tokens=max(1, shapes["supervised"] // samples),
        question_tokens=(shapes["query"][1] - n_mem) if shapes["query"] else 0,
        candidate_chunk_size=cfg["candidate_chunk_size"],
    )
    shape = next(name for name, dims in SHAPES.items() if all(cfg[k] == v for k, v in dims.items()))
    return step_memory(
        dims_of(shape),
        work,
        gpus=1,
        zero_stage=cfg["zero_stage"],
        gradient_checkpointing=result["gradient_checkpointing"],
        lora_r=cfg["lora_r"],
    )["peak"]


def memory_check(results: list[dict]) -> list[dict]:
    rows = []
    for result in results:
        if "step_time_s" in result and result.get("memory_kind") == "cuda_allocated":
            predicted = predicted_peak(result) / MB
            rows.append(
                {
                    "label": result["label"],
                    "measured_mb": result["peak_memory_mb"],
                    "predicted_mb": predicted,
                    "predicted_over_measured": predicted / result["peak_memory_mb"],
                }
            )
    return rows


# -- the report ------------------------------------------------------------------------------------------------
def summary_text(report: dict) -> str:
    lines = [
        f"CLaRa GPU check: {report['device']} | torch {report['machine'].get('torch')} "
        f"(CUDA {report.get('cuda_version')}) | flash-attn: {report['flash_attn']}",
        f"overall: {report['status']} in {report['seconds']:.0f} s",
        "",
    ]
    for name in ("tests", "launcher"):
        part = report["parts"].get(name, {})
        lines.append(f"[{name}] {part.get('status')} ({part.get('seconds')} s)")
        for case in part.get("tests", []):
            extra = "; ".join(f"{k}={v}" for k, v in case["properties"].items())
            lines.append(
                f"  {case['outcome']:7} {case['name']} ({case['seconds']:.1f} s){' | ' + extra if extra else ''}"
            )
            if case["message"]:
                lines.append(f"          {case['message'][:300]}")
    bench = report["parts"].get("bench", {})
    lines += [
        "",
        f"[bench] {bench.get('status')}",
        f"{'row':34} {'step s':>7} {'tokens/s':>9} {'peak MiB':>9} {'MFU':>6} attention",
    ]
    for row in bench.get("results", []):
        if "step_time_s" in row:
            mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
            lines.append(
                f"{row['label']:34} {row['step_time_s']:7.3f} {row['tokens_per_s']:9.0f} "
                f"{row['peak_memory_mb']:9.0f} {mfu:>6} {row['attn_implementation']}"
            )
        else:
            lines.append(f"{row['label']:34} {row.get('error') or 'not run: ' + row.get('not_run', '')}")
    for row in bench.get("results", []):
        profile = row.get("profile")
        if profile:
            kinds = ", ".join(f"{k} {v:.3f} s" for k, v in profile["by_kind_s"].items())
            lines.append(
                f"profile of {row['label']}: step {profile['step_s']:.3f} s, kernels {profile['busy_s']:.3f} s "
                f"({kinds}), GPU waiting on the host {profile['waiting_s'] or 0:.3f} s; busiest: "
                + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in profile["top_operators_s"][:5])
            )
    lines += ["", "targets:"]
    for target in report["targets"] or [{"target": "none measured", "value": None, "met": None}]:
        value = "-" if target["value"] is None else f"{target['value']:.3f}"
        lines.append(
            f"  {'met' if target['met'] else 'MISSED' if target['met'] is False else '-':6} {target['target']}: {value}"
        )
    lines += ["", "memory plan check (bench.memory computed vs measured peak):"]
    for row in report["memory_check"]:
        lines.append(
            f"  {row['label']:34} measured {row['measured_mb']:8.0f} MiB, computed {row['predicted_mb']:8.0f} "
            f"MiB ({row['predicted_over_measured']:.2f} x)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_report.json, gpu_report.txt and the logs")
    parser.add_argument("--installs", default="", help="what scripts/gpu_check.sh's installs said (one line each)")
    for name, seconds in LIMITS.items():
        parser.add_argument(f"--{name}_s", type=float, default=seconds, help=f"time limit of the {name} part")
    parser.add_argument(
        "--budget_s",
        type=float,
        default=300,
        help=f"seconds for all three parts; the bench part gets what the others' limits leave (at least {BENCH_MIN_S})",
    )
    parser.add_argument(
        "--cpu-rehearsal",
        action="store_true",
        help="on CPU: import the GPU tests, step each stage once and run the launcher for one step",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu_rehearsal:
        return rehearse(out)
    started = time.monotonic()
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; nothing measured")
        return 1
    try:
        import flash_attn

        flash = f"installed {flash_attn.__version__} (FA2 rows measured)"
    except ImportError:
        flash = "not installed: no wheel for this torch/CUDA (building it from source takes too long); SDPA only"
    report = {
        "device": torch.cuda.get_device_name(0),
        "cuda_version": torch.version.cuda,
        "machine": machine_info(),
        "flash_attn": flash,
        "installs": args.installs.splitlines(),
        "parts": {},
    }

    def write() -> None:
        report["seconds"] = time.monotonic() - started
        statuses = [part.get("status") for part in report["parts"].values()]
        report["status"] = "passed" if statuses and all(s == "passed" for s in statuses) else "not all passed"
        results = report["parts"].get("bench", {}).get("results", [])
        report["targets"] = targets(results)
        report["memory_check"] = memory_check(results)
        (out / "gpu_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (out / "gpu_report.txt").write_text(summary_text(report) + "\n", encoding="utf-8")

    print("gpu_check: bench ...", file=sys.stderr, flush=True)
    bench_limit = max(BENCH_MIN_S, args.budget_s - args.tests_s - args.launcher_s)
    report["parts"]["bench"] = run_bench(bench_rows(flash.startswith("installed")), bench_limit)
    write()
    for name, selection in (("tests", "not launcher"), ("launcher", "launcher")):
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        report["parts"][name] = run_pytest(out, name, selection, getattr(args, f"{name}_s"))
        write()
    print(summary_text(report))
    return 0 if report["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
