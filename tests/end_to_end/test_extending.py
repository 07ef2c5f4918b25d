"""A fourth stage and a new loss term, added the way docs/development/extending.md says: one stage module and
its line in `clara/stages/__init__.py`, one `LossTerm` in `clara/model/losses.py`, one weight setting in
`clara/config.py`, and nothing else. The edits go to a copy of `clara/`; the launcher, the evaluation
command and bench's memory plan then run on that copy (PYTHONPATH and the working directory name it) as
they would in a user's checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.end_to_end.test_launchers import QUICK, SINGLE, launcher_env, metrics, run
from tests.helpers import REPO

STAGE_MODULE = '''"""Stage 1 again, regularised: compression pretraining that also keeps the memory embeddings small."""

from __future__ import annotations

from clara.stages.stage import COMPRESSOR, GENERATOR, Stage, TypicalSample
from clara.stages.stage1 import example, header

STAGE = Stage(
    name="stage1_small",
    description="compression pretraining with small memory embeddings",
    new_adapters=(COMPRESSOR, GENERATOR),
    loaded_adapters=(),
    trained_adapters=(COMPRESSOR, GENERATOR),
    trains_memory_embeddings=True,
    loss_terms=("mse", "memory_norm"),
    uses_query=False,
    generates=False,
    previous=None,
    schema="stage1",
    default_dataset="example/pretrain_data.jsonl",
    learning_rate=1e-4,
    tiny_learning_rate=2e-3,
    max_len=2048,
    constant_schedule=True,
    example=example,
    header=header,
    typical_sample=TypicalSample(docs_per_sample=1, prompt_tokens=320, supervised_tokens=256),
)
'''

LOSS_FUNCTION = '''

def memory_norm(model, batch, out) -> torch.Tensor | None:
    """The mean square of the memory-token embeddings."""
    return model.mem_embeddings.float().pow(2).mean()
'''
LOSS_TERM = '    LossTerm("memory_norm", "memory_norm_loss", "mem_norm", memory_norm),\n'
WEIGHT_SETTING = '    memory_norm_weight: float = setting(0.0, "weight of the memory embeddings\' mean square")\n'


def edit(path: Path, anchor: str, text: str, before: bool = False) -> None:
    """Insert `text` after (or before) the one occurrence of `anchor` in the file."""
    source = path.read_text(encoding="utf-8")
    assert source.count(anchor) == 1, f"{path}: {anchor!r} is not there exactly once"
    path.write_text(source.replace(anchor, text + anchor if before else anchor + text), encoding="utf-8")


def add_stage_and_term(clara: Path) -> None:
    (clara / "stages" / "stage1_small.py").write_text(STAGE_MODULE, encoding="utf-8")
    edit(clara / "stages" / "__init__.py", "from clara.stages import stage1, stage1_2, stage2", ", stage1_small")
    edit(clara / "stages" / "__init__.py", "stage2.STAGE", ", stage1_small.STAGE")
    edit(
        clara / "model" / "losses.py",
        "\n\n# In the order they are added to the loss, and logged.",
        LOSS_FUNCTION,
        before=True,
    )
    edit(clara / "model" / "losses.py", ")\nWEIGHT_SETTINGS = ", LOSS_TERM, before=True)
    edit(clara / "config.py", "    dtype: str = setting(", WEIGHT_SETTING, before=True)


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """A working copy whose clara/ has the fourth stage and the new term, trained 2 steps by the launcher."""
    work = tmp_path_factory.mktemp("extended")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("clara", "example", "scripts"):
        shutil.copytree(REPO / name, work / name, ignore=ignore)
    shutil.copy2(REPO / SINGLE, work / SINGLE)
    add_stage_and_term(work / "clara")
    env = launcher_env(
        **QUICK, STAGE="stage1_small", MEMORY_NORM_WEIGHT="0.5", MSE_WEIGHT="0.1", SAVE_PATH=work / "out"
    )
    env["PYTHONPATH"] = os.pathsep.join((str(work), str(REPO)))  # clara from the copy; bench/ from here
    return work, env, run(SINGLE, env, cwd=work)


def run_in(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, check=False, timeout=600
    )


@pytest.mark.slow
def test_a_fourth_stage_trains_with_its_new_loss_term_through_the_launcher(extended):
    work, _, result = extended
    assert result.returncode == 0, result.output[-3000:]
    assert "CLaRa stage1_small: train_single_gpu.sh" in result.output
    steps = [m for m in metrics(work / "out") if "loss" in m]
    assert len(steps) == 2
    for step in steps:
        assert step["memory_norm_loss"] > 0 and step["mse_loss"] > 0
    assert json.loads((work / "out" / "config.json").read_text())["stage"] == "stage1_small"


@pytest.mark.slow
def test_the_fourth_stage_evaluates_and_has_a_memory_plan(extended):
    work, env, result = extended
    assert result.returncode == 0, result.output[-3000:]
    evaluated = run_in(
        work,
        env,
        "-m",
        "clara.evaluate",
        "--checkpoint",
        str(work / "out"),
        "--dataset",
        "example/pretrain_data_eval.jsonl",
        "--limit",
        "4",
        "--no_progress",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "stage1_small evaluation of" in evaluated.stdout
    plan = run_in(work, env, "-m", "bench.memory", "--model", "qwen3-14b", "--gpus", "1", "--json", "plan.json")
    assert plan.returncode == 0, plan.stderr[-3000:]
    rows = {row["stage"]: row for row in json.loads((work / "plan.json").read_text())}
    assert list(rows) == ["stage1", "stage1_2", "stage2", "stage1_small"]
    # Same adapters and sample as stage 1: the same plan.
    assert rows["stage1_small"]["peak_gib"] == rows["stage1"]["peak_gib"]
