"""The real runs the documentation's pictures and performance pages are drawn from.

`python scripts/docs_runs.py [--only learning,serve,data,page]` runs, from the repository root, what a user
runs, and keeps the raw outputs in docs/assets/runs/ (the default --out), each beside a NAME.json that says
where it came from: the command, the commit, the date, the CPU and the load average before and after.

- learning: the CPU learning run of the docs (stage1_2 on the tiny model, 3,000 steps, evaluated every 500);
  keeps its metrics.jsonl and its console output with the debug print's colours (learning.ansi);
- serve: `python -m bench --serve --json` (throughput and latency against concurrent clients);
- data: `python -m bench --data --json` (data preparation against the number of records);
- steps: `python -m bench --sweep all --threads 1 --json` (what a training step costs, by setting);
- page: the page of `python -m clara.serve` asked one question in headless Chromium, as page.png.

`python scripts/make_figures.py` then draws the pictures and the performance tables from these files; it
runs nothing, so the pictures can be redrawn without measuring again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from clara.files import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402  (the repository on the path first)

RUNS = ("learning", "serve", "data", "steps", "page")
LEARNING_ENV = {
    "STAGE": "stage1_2",
    "ALLOW_NO_CHECKPOINT": "true",
    "MAX_STEPS": "3000",
    "DEBUG_EVERY_STEPS": "250",
    "EVAL_STEPS": "500",
    "EVAL_DATASET": "example/instruction_tuning_data_eval.jsonl",
    "LOGGING_STEPS": "10",
}
DATA_RECORDS = ("10000", "100000", "300000")
PAGE_QUESTION = "What is the sacred animal of Vorlan?"


def machine() -> str:
    """The CPU model and the cores this process may use, as lscpu names them."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    vector = " with AVX-512" if "avx512f" in flags else ""
    return f"{model}{vector}, {len(os.sched_getaffinity(0))} cores, no GPU"


def commit() -> str:
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return described.stdout.strip()


def record(out: Path, name: str, command: str, body) -> None:
    """Run body(), then write NAME.json with where its outputs came from (the commit as the run started)."""
    started, load_before, at_commit = time.time(), os.getloadavg(), commit()
    print(f"== {name}: {command}", flush=True)
    body()
    where = {
        "command": command,
        "commit": at_commit,
        "date": datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "seconds": round(time.time() - started, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    write_json_atomic(str(out / f"{name}.json"), where)


def run_learning(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **LEARNING_ENV, "SAVE_PATH": f"{tmp}/run"}
        with atomic_path(str(out / "learning.ansi")) as partial, open(partial, "w", encoding="utf-8") as console:
            subprocess.run(
                ["./train_single_gpu.sh"], cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT, check=True
            )
        metrics = Path(tmp, "run", "metrics.jsonl").read_text(encoding="utf-8")
        write_text_atomic(str(out / "learning-metrics.jsonl"), metrics)


def run_bench(arguments: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "bench", *arguments], cwd=REPO, check=True)


def run_page(out: Path) -> None:
    """The page of clara.serve (the tiny model, fresh adapters, 400 example documents) after one question."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bench.serve import make_model, start_server

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, index = make_model(Path(tmp), 400)
        server, url = start_server(checkpoint, index, 0, max_batch=16, max_wait_ms=10, max_tokens=32)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
            options.add_argument(flag)
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
        try:
            browser.get(f"{url}/")
            wait = WebDriverWait(browser, 120)
            browser.find_element(By.ID, "question").send_keys(PAGE_QUESTION)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: b.find_element(By.ID, "status").text == "Done.")
            with atomic_path(str(out / "page.png")) as partial:
                Path(partial).write_bytes(browser.get_screenshot_as_png())
        finally:
            browser.quit()
            server.terminate()
            server.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "assets" / "runs"), help="where the outputs go")
    parser.add_argument("--only", default=",".join(RUNS), help=f"some of {', '.join(RUNS)}")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in RUNS]
    if unknown:
        parser.error(f"--only: unknown run {unknown[0]!r}; expected some of {', '.join(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    learning = " ".join(f"{k}={v}" for k, v in LEARNING_ENV.items()) + " SAVE_PATH=... ./train_single_gpu.sh"
    serve_json, data_json = out / "serve-bench.json", out / "data-bench.json"
    steps = {
        "learning": (learning, lambda: run_learning(out)),
        "serve": (
            "python -m bench --serve --json serve-bench.json",
            lambda: run_bench(["--serve", "--json", str(serve_json)]),
        ),
        "data": (
            f"python -m bench --data --records {' '.join(DATA_RECORDS)} --num_gpus 1 --json data-bench.json",
            lambda: run_bench(["--data", "--records", *DATA_RECORDS, "--num_gpus", "1", "--json", str(data_json)]),
        ),
        "steps": (
            "python -m bench --sweep all --threads 1 --json steps-bench.json",
            lambda: run_bench(["--sweep", "all", "--threads", "1", "--json", str(out / "steps-bench.json")]),
        ),
        "page": (f"python scripts/docs_runs.py --only page (asks {PAGE_QUESTION!r})", lambda: run_page(out)),
    }
    for name in chosen:
        command, body = steps[name]
        record(out, name, command, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
