"""clara.training.resumable's units on files made here: the safe load, the manifest, the background publisher, where a
run resumes, and the metrics rewound to it. No trainer runs (tests/end_to_end/test_safety.py runs the trainer)."""

from __future__ import annotations

import builtins
import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch

from clara.config import TrainConfig, resolve
from clara.data.fingerprint import train_inputs
from clara.errors import ResumeError
from clara.model.checkpoint import resolve_base_path
from clara.training.resumable import (
    MANIFEST,
    RESUME_FREE_SETTINGS,
    STATE_FILE,
    BackgroundPublisher,
    TrainState,
    changed_settings,
    complete_checkpoints,
    manifest_problem,
    plan_run,
    rewind_metrics,
    safe_torch_load,
    use_safe_loading,
    write_manifest,
)
from clara.training.trainer import checkpoint_settings
from tests.helpers import run_data_key


class Payload:
    """Unpickled with full pickle, this creates the marker file: what a planted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def plant_payload(path: Path, marker: Path) -> None:
    torch.save({"module": {}, "note": Payload(marker)}, path)


# -- 1. nothing read back runs code ------------------------------------------------------------------------
def test_the_payload_is_real_and_the_safe_load_refuses_it(tmp_path):
    marker = tmp_path / "pwned"
    plant_payload(tmp_path / "model_states.pt", marker)
    torch.load(tmp_path / "model_states.pt", weights_only=False)  # what DeepSpeed's own loader would do
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ResumeError, match="model_states.pt: refused to load"):
        safe_torch_load(str(tmp_path / "model_states.pt"))
    # DeepSpeed's reads go through engine.checkpoint_engine.load, replaced by the safe one.
    engine = type("Engine", (), {"checkpoint_engine": type("TorchCheckpointEngine", (), {})()})()
    use_safe_loading(engine)
    with pytest.raises(ResumeError):
        engine.checkpoint_engine.load(str(tmp_path / "model_states.pt"), map_location="cpu")
    assert not marker.exists()


# -- the files of a checkpoint ---------------------------------------------------------------------------------
def fake_checkpoint(root: Path, step: int, run_id: str) -> Path:
    """A published checkpoint directory as save_resumable leaves it, with a tensor file instead of DeepSpeed's."""
    directory = root / f"step_{step}"
    directory.mkdir(parents=True)
    torch.save({"weights": torch.ones(3)}, directory / "mp_rank_00_model_states.pt")
    state = {
        "run_id": run_id,
        "train_state": dataclasses.asdict(TrainState(global_step=step)),
        "settings": {},
        "inputs": None,
    }
    (directory / STATE_FILE).write_text(json.dumps(state))
    write_manifest(str(directory))
    return directory


def test_the_manifest_names_a_changed_missing_or_unlisted_file(tmp_path):
    directory = fake_checkpoint(tmp_path, 3, "run")
    assert manifest_problem(str(directory)) is None
    (directory / "mp_rank_00_model_states.pt").write_bytes(b"other")
    assert "mp_rank_00_model_states.pt has 5 bytes" in manifest_problem(str(directory))
    (directory / "mp_rank_00_model_states.pt").unlink()
    assert manifest_problem(str(directory)) == "mp_rank_00_model_states.pt is missing"
    (directory / MANIFEST).write_text(json.dumps({"files": {}}))
    assert manifest_problem(str(directory)) == f"the manifest does not list {STATE_FILE}"
    (directory / MANIFEST).unlink()
    assert manifest_problem(str(directory)).startswith(f"no {MANIFEST}")


def test_only_published_checkpoints_count_in_step_order(tmp_path):
    for name in ("step_10", "step_9", "tmp_step_11", "step_x", "previous"):
        (tmp_path / name).mkdir()
    assert complete_checkpoints(str(tmp_path)) == [(9, "step_9"), (10, "step_10")]
    assert complete_checkpoints(str(tmp_path / "missing")) == []


# -- publishing in the background ---------------------------------------------------------------------------
def test_the_publisher_runs_in_the_background_and_join_raises_its_failure_once():
    publisher = BackgroundPublisher()
    publisher.join()  # nothing started: nothing to wait for
    release, ran = threading.Event(), []
    publisher.start(lambda: (release.wait(10), ran.append("first")), name="publish step_1")
    assert ran == []  # start() returned while the publishing waits
    release.set()
    publisher.join()
    assert ran == ["first"] and publisher.thread is None

    def full_disk():
        raise OSError(28, "No space left on device")

    publisher.start(full_disk, name="publish step_2")
    with pytest.raises(OSError, match="No space left"):
        publisher.join()
    publisher.join()  # reported once


def test_a_new_start_waits_for_the_previous_publishing():
    publisher, order = BackgroundPublisher(), []
    release = threading.Event()
    publisher.start(lambda: (release.wait(10), order.append(1)), name="publish step_1")
    threading.Timer(0.2, release.set).start()
    publisher.start(lambda: order.append(2), name="publish step_2")
    publisher.join()
    assert order == [1, 2]


def test_two_publishers_keep_their_own_failures():
    first, second = BackgroundPublisher(), BackgroundPublisher()
    first.start(lambda: (_ for _ in ()).throw(RuntimeError("first failed")), name="publish a")
    second.start(lambda: None, name="publish b")
    second.join()
    with pytest.raises(RuntimeError, match="first failed"):
        first.join()


# -- where a run starts ---------------------------------------------------------------------------------------
def settings(save: Path, resume: str = "auto") -> TrainConfig:
    return resolve(
        TrainConfig(dataset="example/pretrain_data.jsonl", save_path=str(save), resume=resume), has_cuda=False
    )


def inputs(cfg: TrainConfig) -> dict:
    """The run's input keys, as the trainer reads them on rank 0."""
    return train_inputs(run_data_key(cfg), resolve_base_path(cfg.model_path), cfg.pretrain_checkpoint)


def test_auto_resumes_the_newest_intact_checkpoint_of_the_run(tmp_path):
    cfg = settings(tmp_path / "out")
    root = Path(cfg.save_path) / "checkpoints"
    fake_checkpoint(root, 2, "run-a")
    (fake_checkpoint(root, 4, "run-a") / STATE_FILE).write_text("{}")  # no longer what the manifest lists
    (root / "run.json").write_text(json.dumps({"run_id": "run-a", "finished_step": None}))
    warnings: list[str] = []
    plan = plan_run(checkpoint_settings(cfg), inputs(cfg), total_steps=10, rank=0, world=1, log=warnings.append)
    assert (plan.run_id, plan.directory, plan.state.global_step) == ("run-a", str(root / "step_2"), 2)
    assert not plan.finished
    assert len(warnings) == 1 and "skipping checkpoint" in warnings[0] and "step_4" in warnings[0]


def test_resume_false_moves_the_previous_run_aside(tmp_path):
    cfg = settings(tmp_path / "out", resume="false")
    root = Path(cfg.save_path) / "checkpoints"
    fake_checkpoint(root, 2, "run-a")
    (root / "run.json").write_text(json.dumps({"run_id": "run-a", "finished_step": None}))
    (Path(cfg.save_path) / "metrics.jsonl").write_text('{"step": 1}\n')
    said: list[str] = []
    plan = plan_run(checkpoint_settings(cfg), inputs(cfg), total_steps=10, rank=0, world=1, log=said.append)
    assert plan.directory is None and plan.run_id != "run-a"
    assert complete_checkpoints(str(root)) == []
    moved = Path(cfg.save_path) / "previous_runs" / "run-a"
    assert (moved / "step_2" / STATE_FILE).is_file() and (moved / "metrics.jsonl").is_file()
    assert json.loads((root / "run.json").read_text()) == {"run_id": plan.run_id, "finished_step": None}
    assert said and said[0].startswith("RESUME=false: moved the previous run's resumable checkpoints (step_2)")


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    cfg = settings(tmp_path / "out", resume=str(tmp_path))
    with pytest.raises(ResumeError, match="not a resumable checkpoint directory"):
        plan_run(checkpoint_settings(cfg), inputs(cfg), total_steps=10, rank=0, world=1, log=print)


# -- what a resume may change -----------------------------------------------------------------------------
def test_metrics_are_rewound_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    rewind_metrics(str(tmp_path), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    rewind_metrics(str(tmp_path / "elsewhere"), 2)  # no metrics yet: nothing to do


def test_changed_settings_name_only_what_changes_the_training():
    saved = {"learning_rate": 1e-4, "max_steps": 10, "seed": 42}
    current = {"learning_rate": 2e-4, "max_steps": 20, "seed": 42}
    assert "max_steps" in RESUME_FREE_SETTINGS
    assert changed_settings(saved, current) == ["learning_rate 0.0001 -> 0.0002"]
