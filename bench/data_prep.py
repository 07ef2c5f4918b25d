"""Preparing the training data at scale: the rows of `python -m bench --data`.

Writes N synthetic stage-1 records like a real corpus's (a 200-word document each; half QA records with
three questions, half paraphrases of about 180 words; about 2 KB a line), then runs the launcher as a
user would (tiny model, MAX_STEPS=2) and reports, for an empty and a warm prepared-data cache and for
NUM_GPUS 1 and 2: launch to step 1, to the end of step 2 and to exit, the first preparation's records/s,
and the peak resident memory of the largest process (preparation workers included), against a run on
the first 2,000 records of the same file. Each file and NUM_GPUS pair has its own Hugging Face and
prepared-data cache folders: empty for the first run, warm for the second; DeepSpeed's compiled ops stay
built.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from clara.stages import STAGES

REPO = Path(__file__).resolve().parent.parent
LAUNCHERS = {1: "train_single_gpu.sh", 2: "train_8gpu.sh"}
# The stage trained: the first that learns from documents alone (the "stage1" record schema, no checkpoint before).
STAGE = next(stage for stage in STAGES.values() if stage.schema == "stage1" and stage.previous is None)
SMALL = 2000  # the reference run's records, for the memory comparison
POOL = 1000  # distinct texts of each kind; records combine them with their number, so no two are equal
PREPARED = re.compile(r"Prepared .*: ([\d,]+) records, .* \(\d+ process\(es\), ([\d,]+) records/s\)")


def _texts(rng: random.Random, words: list[str], length: int, count: int) -> list[str]:
    return [" ".join(rng.choices(words, k=length)) + "." for _ in range(count)]


def write_records(path: Path, count: int, seed: int = 0) -> None:
    """`count` records of the "stage1" schema: even ones QA with three questions, odd ones a paraphrase."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    docs, paraphrases = _texts(rng, words, 200, POOL), _texts(rng, words, 180, POOL)
    questions, answers = _texts(rng, words, 10, POOL), _texts(rng, words, 4, POOL)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            doc = f"Record {i}. {docs[i % POOL]}"
            if i % 2 == 0:
                picks = [(i * 7 + j) % POOL for j in range(3)]
                record = {
                    "data_type": "qa",
                    "question": [questions[p] for p in picks],
                    "answers": [answers[p] for p in picks],
                    "docs": [doc],
                }
            else:
                record = {"data_type": "paraphrase", "docs": [doc], "answers": [paraphrases[(i * 3) % POOL]]}
            out.write(json.dumps(record) + "\n")


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _peak_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            return next((int(line.split()[1]) for line in handle if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def launch(data: Path, num_gpus: int, save: Path, cache: Path, workers: int | None) -> dict:
    """One launcher run: seconds from launch to step 1, to step 2 and to exit; the largest process's peak RSS."""
    env = dict(
        os.environ,
        STAGE=STAGE.name,
        DATASET=str(data),
        SAVE_PATH=str(save),
        MAX_STEPS="2",
        NUM_GPUS=str(num_gpus),
        DEBUG_MODE="false",
        RESUME="false",
        CLARA_DATA_CACHE=str(cache / "prepared"),
        HF_DATASETS_CACHE=str(cache / "hf"),
        PYTHONPATH=str(REPO),
    )
    if workers:
        env["DATA_WORKERS"] = str(workers)
    metrics = save / "metrics.jsonl"
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(REPO / LAUNCHERS[num_gpus])],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = _start_reader(proc, output)
    steps: dict[int, float] = {}
    peak = 0
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            peak = max(peak, _peak_kb(pid))
        done = sum(1 for _ in open(metrics, encoding="utf-8")) if metrics.exists() else 0
        for step in range(1, done + 1):
            steps.setdefault(step, time.monotonic() - started)
        time.sleep(0.2)
    ended = time.monotonic() - started
    reader.join()
    text = "".join(output)
    if proc.returncode != 0:
        raise RuntimeError(f"the launcher exited {proc.returncode}:\n{text[-3000:]}")
    match = PREPARED.search(text)
    return {
        "num_gpus": num_gpus,
        "step1_s": round(steps.get(1, ended), 1),
        "step2_s": round(steps.get(2, ended), 1),
        "exit_s": round(ended, 1),
        "peak_rss_mb": round(peak / 1024),
        "records_per_s": int(match.group(2).replace(",", "")) if match else None,
        "from_cache": "from the cache" in text,
    }


def _start_reader(proc: subprocess.Popen, output: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    thread.start()
    return thread


def measure(records: int, gpus: list[int], workers: int | None, folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{STAGE.name}_{records}.jsonl"
    write_records(data, records)
    small = folder / f"{STAGE.name}_{SMALL}.jsonl"
    with open(data, encoding="utf-8") as source, open(small, "w", encoding="utf-8") as out:
        out.writelines(line for line, _ in zip(source, range(SMALL)))
    rows = []
    reference = launch(small, 1, folder / "small_run", folder / "small_cache", workers)
    rows.append({"records": SMALL, "cache": "empty", **reference})
    for num_gpus in gpus:
        cache = folder / f"cache_{num_gpus}"
        for state in ("empty", "warm"):
            row = launch(data, num_gpus, folder / f"run_{num_gpus}_{state}", cache, workers)
            rows.append({"records": records, "cache": state, **row})
            print(_row_text(rows[-1]), flush=True)
    return rows


def _row_text(row: dict) -> str:
    rate = f"{row['records_per_s']:,} records/s" if row.get("records_per_s") else "from the cache"
    return (
        f"{row['records']:>9,} records  NUM_GPUS {row['num_gpus']}  cache {row['cache']:<5}  step 1 "
        f"{row['step1_s']:6.1f} s  step 2 {row['step2_s']:6.1f} s  exit {row['exit_s']:6.1f} s  "
        f"peak RSS {row['peak_rss_mb']:,} MB  ({rate})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench --data", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000], help="records per measured file")
    parser.add_argument(
        "--num_gpus",
        type=int,
        nargs="+",
        choices=(1, 2),
        default=[1, 2],
        help="processes of the launcher (CPU processes without CUDA)",
    )
    parser.add_argument("--data_workers", type=int, default=None, help="DATA_WORKERS (default: the launcher's)")
    parser.add_argument(
        "--dir", default=None, help="where the temporary working folder is made (removed after; default: the system's)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for records in args.records:
            rows += measure(records, args.num_gpus, args.data_workers, Path(folder) / str(records))
    print("\n".join(_row_text(row) for row in rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": len(os.sched_getaffinity(0)), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
