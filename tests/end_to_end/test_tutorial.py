"""docs/tutorial.md, run as written (scripts/run_tutorial.py: its command blocks verbatim, with the tiny model,
the stand-in LLM and two steps per stage set through the variables of its settings block): every step runs and
the served answer comes with passages of the example folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import EXAMPLE, REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_the_tutorial_runs_from_the_documents_to_an_answer(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "run_tutorial.py"), "--out", str(out), "--max_steps", "2"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [s["step"] for s in report["steps"]] == ["synthesize", "train", "index-and-evaluate", "ask"]
    assert all(s["returncode"] == 0 for s in report["steps"])
    folder = EXAMPLE / "documents"
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    served = re.findall(r"^  (\S+)  [-\d.]+$", report["steps"][-1]["output"], re.MULTILINE)
    assert served and all(re.sub(r"#\d+$", "", doc_id) in files for doc_id in served)
    assert 0 <= report["figures"]["open_recall@5"] <= 1 and report["held_out_questions"] > 0
    summary = json.loads((out / "data" / "summary.json").read_text(encoding="utf-8"))
    assert summary["corpus"]["read"] == len(files) and summary["corpus"]["skipped"] == {}
    assert set(summary["corpus"]["passages_per_document"]) == files
