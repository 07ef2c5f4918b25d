"""One run per SAVE_PATH, and no silent resume onto changed inputs (README "Runs you cannot lose"), tested
as users meet them: launchers started twice, killed with -9, resumed after the data or the base model
changed; plus the lock file fallback, exports published in one step, and export / index refusing a held folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from clara.errors import FolderBusy
from clara.files import publish_files
from clara.locks import FALLBACK_NAME, LOCK_NAME, STALE_AFTER_S, holding, reading_export, take
from tests.end_to_end.test_launchers import (
    QUICK,
    REPO,
    RUN_TIMEOUT,
    SINGLE,
    kill_tree,
    launcher_env,
    max_weight_difference,
    metrics,
    run,
    start,
    wait_for,
)

RUN = {**QUICK, "MAX_STEPS": "4", "SAVE_STEPS": "1", "MAX_CKPT_NUM": "4"}


def holder(save: Path, name: str = LOCK_NAME) -> dict:
    try:
        return json.loads((save / name).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


# -- one run per SAVE_PATH ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_launch_into_a_running_save_path_exits_2_and_the_first_ends_as_if_alone(tmp_path):
    save = tmp_path / "out"
    first = start(SINGLE, launcher_env(**RUN, SAVE_PATH=save), output=tmp_path / "first.out")
    try:
        wait_for(lambda: holder(save).get("pid") == first.pid, first, what="the first run's lock")
        second = run(SINGLE, launcher_env(**RUN, SAVE_PATH=save), timeout=60)
        first.wait(timeout=RUN_TIMEOUT)
    finally:
        kill_tree(first)
    assert second.returncode == 2 and second.seconds < 30, second
    lines = error_lines(second.output)
    assert (
        len(lines) == 1
        and f"{save} is in use by another run: host {socket.gethostname()}, pid {first.pid} "
        f"(train_single_gpu.sh), started "
        in lines[0]
    ), second
    assert "Command:" not in second.output  # refused before anything started
    out = (tmp_path / "first.out").read_text()
    assert first.returncode == 0, out[-3000:]
    assert f"Lock on {save}: an OS lock (flock)" in out
    assert [m["step"] for m in metrics(save)] == [1, 2, 3, 4]
    assert holder(save)["run_id"]  # the trainer named its run in the lock file

    alone = run(SINGLE, launcher_env(**RUN, SAVE_PATH=tmp_path / "alone"))
    assert alone.returncode == 0, alone
    assert max_weight_difference(save, tmp_path / "alone") < 1e-6


@pytest.mark.slow
def test_the_lock_file_refuses_a_second_launch_and_after_kill_9_the_same_command_starts_at_once(tmp_path):
    """CLARA_LOCK=file, as on a filesystem without OS locks. (With the OS lock, kill -9 and the rerun at once
    are tests/end_to_end/test_launchers.py::test_kill_9_then_rerun_resumes_to_the_same_weights.)"""
    save = tmp_path / "out"
    env = launcher_env(**{**QUICK, "MAX_STEPS": "6", "SAVE_STEPS": "2"}, SAVE_PATH=save, CLARA_LOCK="file")
    first = start(SINGLE, env, output=tmp_path / "first.out")
    try:
        wait_for(lambda: holder(save, FALLBACK_NAME).get("pid") == first.pid, first, what="the first run's lock")
        second = run(SINGLE, env, timeout=60)
        assert second.returncode == 2 and second.seconds < 30, second
        assert (
            f"{save} is in use by another run: host {socket.gethostname()}, pid {first.pid} "
            in error_lines(second.output)[0]
        ), second
        wait_for(lambda: (save / "checkpoints" / "step_2").is_dir(), first, what="checkpoint step_2")
    finally:
        kill_tree(first)
    again = run(SINGLE, env)
    assert again.returncode == 0, again
    assert "Resumed from" in again.output
    assert (
        f"Lock on {save}: the lock file {save / FALLBACK_NAME} (host, pid, a heartbeat every 10 s; "
        "CLARA_LOCK=file)" in again.output
    )
    assert [m["step"] for m in metrics(save)] == [1, 2, 3, 4, 5, 6]


def test_a_lock_file_whose_holder_is_gone_is_taken_over(tmp_path):
    held = tmp_path / FALLBACK_NAME
    os.environ["CLARA_LOCK"] = "file"
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        for info, age, taken in [
            ({"host": socket.gethostname(), "pid": os.getpid()}, 0, False),  # alive here
            ({"host": socket.gethostname(), "pid": int(dead.stdout)}, 0, True),  # gone
            ({"host": "elsewhere", "pid": 1}, 0, False),  # beating on another host
            ({"host": "elsewhere", "pid": 1}, STALE_AFTER_S + 5, True),
        ]:  # silent
            held.write_text(json.dumps({**info, "started": time.time(), "what": "a test"}))
            os.utime(held, (time.time() - age, time.time() - age))
            if taken:
                lock = take(str(tmp_path), "the test")
                assert holder(tmp_path, FALLBACK_NAME)["pid"] == os.getpid()
                lock.release()
                assert not held.exists()
            else:
                with pytest.raises(FolderBusy, match=f"host {info['host']}, pid {info['pid']} "):
                    take(str(tmp_path), "the test")
    finally:
        del os.environ["CLARA_LOCK"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["clara.export", "--checkpoint", "nowhere", "--format", "native", "--out"],
        ["clara.index", "--checkpoint", "nowhere", "--corpus", "nothing.jsonl", "--out"],
    ],
)
def test_export_and_index_refuse_a_folder_another_process_holds(tmp_path, command):
    out = tmp_path / "target"
    with holding(str(out), "a training run"):
        proc = subprocess.run(
            [sys.executable, "-m", *command, str(out)], capture_output=True, text=True, cwd=REPO, timeout=300
        )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc.stderr) == [error_lines(proc.stderr)[0]]
    assert f"pid {os.getpid()} (a training run)" in proc.stderr


def test_a_reader_never_sees_half_an_export(tmp_path):
    names = ("adapters.safetensors", "config.json")

    def export(version: str):
        def write(folder: str) -> None:
            for name in names:
                Path(folder, name).write_text(version)

        return write

    publish_files(str(tmp_path), export("old"))
    with reading_export(str(tmp_path)):
        publisher = threading.Thread(target=publish_files, args=(str(tmp_path), export("new")))
        publisher.start()
        time.sleep(1.0)  # the new files are written aside by now; moving them in waits for the reader
        assert [(tmp_path / name).read_text() for name in names] == ["old", "old"]
    publisher.join()
    assert [(tmp_path / name).read_text() for name in names] == ["new", "new"]
    assert not list(tmp_path.glob(".export-*"))


# -- no silent resume onto changed inputs ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_resume_onto_changed_data_or_base_model_stops_and_the_setting_continues(tmp_path):
    data, base, save = tmp_path / "train.jsonl", tmp_path / "base", tmp_path / "out"
    lines = (REPO / "example" / "pretrain_data.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:24]))
    shutil.copytree(REPO / "clara" / "tiny_model", base)
    settings = {**QUICK, "SAVE_STEPS": "2", "DATASET": data, "MODEL_PATH": base, "SAVE_PATH": save}
    first = run(SINGLE, launcher_env(**settings))
    assert first.returncode == 0, first
    longer = {**settings, "MAX_STEPS": "4"}

    weights = load_file(base / "model.safetensors")
    name = min(weights)
    weights[name] = weights[name] * 1.01  # retrained in place, under the same path
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    refused = run(SINGLE, launcher_env(**longer))
    assert refused.returncode == 2, refused
    [line] = error_lines(refused.output)
    assert "MODEL_PATH.model.safetensors: " in line and "DATASET" not in line, line
    assert "RESUME=false starts over; RESUME_CHANGED_INPUTS=true continues" in line
    assert "Trainable parameters" not in refused.output  # before the model loads

    data.write_text("".join(lines[:12]))  # the file cut short
    refused = run(SINGLE, launcher_env(**longer))
    assert refused.returncode == 2, refused
    [line] = error_lines(refused.output)
    assert f"DATASET.{data}: " in line and "bytes, modified" in line, line

    continued = run(SINGLE, launcher_env(**longer, RESUME_CHANGED_INPUTS="true"))
    assert continued.returncode == 0, continued
    assert "Warning: resuming onto changed inputs (RESUME_CHANGED_INPUTS=true)" in continued.output
    assert "Resumed from" in continued.output and "of the new data's order" in continued.output
    assert [m["step"] for m in metrics(save)] == [1, 2, 3, 4]
    assert json.loads((save / "training_args.json").read_text())["resume_changed_inputs"] is True


def test_a_folder_created_for_a_command_that_failed_is_removed_again(tmp_path):
    with pytest.raises(RuntimeError), holding(str(tmp_path / "new"), "a failing export"):
        raise RuntimeError("the export failed")
    assert not (tmp_path / "new").exists()
    with holding(str(tmp_path / "kept"), "an export"):
        (tmp_path / "kept" / "config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [LOCK_NAME, "config.json"]
