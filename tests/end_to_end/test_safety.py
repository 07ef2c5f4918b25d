"""Runs that cannot be lost or hijacked (README "Runs you cannot lose"), tested the way users meet them:
the launcher as a subprocess on the tiny model, a few steps, and files planted, damaged or filled up.

One uninterrupted reference run (4 steps, a checkpoint every step) is shared: the damaged, planted and
diverging cases start from copies of its SAVE_PATH, and its exported weights are what the resumed and
restarted runs must end with.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from clara.config import TrainConfig, resolve
from clara.training.resumable import MANIFEST, manifest_problem
from tests.end_to_end.test_launchers import (
    QUICK,
    REPO,
    SINGLE,
    SITECUSTOMIZE,
    assert_exported,
    launcher_env,
    max_weight_difference,
    metrics,
    run,
)
from tests.training.test_resumable import plant_payload

# The reference run: 4 optimizer steps, every one saved and kept.
REFERENCE = {**QUICK, "MAX_STEPS": "4", "SAVE_STEPS": "1", "MAX_CKPT_NUM": "4"}
EXPORT_FILES = ("adapters.safetensors", "special_tokens.safetensors", "config.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("reference") / "out"
    result = run(SINGLE, launcher_env(**REFERENCE, SAVE_PATH=save))
    assert result.returncode == 0, result
    assert sorted(p.name for p in (save / "checkpoints").glob("step_*")) == ["step_1", "step_2", "step_3", "step_4"]
    return save


def copy_run(source: Path, target: Path, keep_export: bool = False) -> Path:
    shutil.copytree(source, target)
    if not keep_export:
        for name in EXPORT_FILES:
            (target / name).unlink()
    return target


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def loaded_the_model(output: str) -> bool:
    return "Trainable parameters" in output


def rewrite_manifest_entry(directory: Path, name: str) -> None:
    """What anyone who can plant a file can do too: make the manifest match it."""
    manifest = json.loads((directory / MANIFEST).read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / MANIFEST).write_text(json.dumps(manifest))


# -- 1. nothing read back runs code ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("how", ["auto", "RESUME=dir"])
def test_a_planted_checkpoint_is_refused_and_never_runs(reference, tmp_path, how):
    save = copy_run(reference, tmp_path / "out")
    newest = save / "checkpoints" / "step_4"
    marker = tmp_path / "pwned"
    plant_payload(newest / "mp_rank_00_model_states.pt", marker)
    rewrite_manifest_entry(newest, "mp_rank_00_model_states.pt")
    settings = {**REFERENCE, "MAX_STEPS": "5"}  # the run is not finished: the newest checkpoint is read
    if how != "auto":
        settings["RESUME"] = newest
    result = run(SINGLE, launcher_env(**settings, SAVE_PATH=save))
    assert result.returncode == 2, result
    assert not marker.exists()
    lines = error_lines(result.output)
    assert len(lines) == 1 and f"{newest / 'mp_rank_00_model_states.pt'}: refused to load" in lines[0], result
    assert not loaded_the_model(result.output)


# -- 2. a fresh start never mixes with an old run ----------------------------------------------------------
@pytest.mark.slow
def test_resume_false_moves_the_old_run_aside_and_a_plain_rerun_leaves_the_result_alone(reference, tmp_path):
    save = tmp_path / "out"
    # An older, longer run (other seed) in the same SAVE_PATH: higher-numbered checkpoints.
    old = run(SINGLE, launcher_env(**{**QUICK, "MAX_STEPS": "6", "SAVE_STEPS": "2", "SEED": "7"}, SAVE_PATH=save))
    assert old.returncode == 0, old

    fresh = run(SINGLE, launcher_env(**REFERENCE, RESUME="false", SAVE_PATH=save))
    assert fresh.returncode == 0, fresh
    assert "Resumed from" not in fresh.output
    moved = [line for line in fresh.output.splitlines() if line.startswith("RESUME=false: moved")]
    assert len(moved) == 1 and "step_2, step_4, step_6" in moved[0], fresh
    aside = Path(moved[0].rsplit(" aside to ", 1)[1])
    assert sorted(p.name for p in aside.glob("step_*")) == ["step_2", "step_4", "step_6"]
    assert sorted(p.name for p in (save / "checkpoints").glob("step_*")) == ["step_1", "step_2", "step_3", "step_4"]
    assert max_weight_difference(save, reference) < 1e-6
    assert [m["step"] for m in metrics(save)] == [1, 2, 3, 4]

    exported = {name: ((save / name).read_bytes(), (save / name).stat().st_mtime_ns) for name in EXPORT_FILES}
    again = run(SINGLE, launcher_env(**REFERENCE, SAVE_PATH=save))
    assert again.returncode == 0, again
    assert "Nothing to do" in again.output and "Resumed from" not in again.output
    assert not loaded_the_model(again.output)
    assert {name: ((save / name).read_bytes(), (save / name).stat().st_mtime_ns) for name in EXPORT_FILES} == exported


# -- 3. a damaged checkpoint is skipped ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_ends_as_if_uninterrupted(reference, tmp_path):
    save = copy_run(reference, tmp_path / "out")
    shutil.rmtree(save / "checkpoints" / "step_4")  # killed after step 3's checkpoint ...
    damaged = save / "checkpoints" / "step_3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # ... which the disk kept only in part
    assert manifest_problem(str(damaged.parent)) is not None

    result = run(SINGLE, launcher_env(**REFERENCE, SAVE_PATH=save))
    assert result.returncode == 0, result
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning: skipping checkpoint")]
    assert len(warnings) == 1 and str(damaged.parent) in warnings[0] and "bytes" in warnings[0], result
    assert f"Resumed from {save / 'checkpoints' / 'step_2'} at step 2." in result.output
    assert_exported(save)
    assert max_weight_difference(save, reference) < 1e-6
    # 8: the steps the killed run logged past the resumed one are not repeated.
    assert [m["step"] for m in metrics(save)] == [1, 2, 3, 4]


# -- 4. non-finite settings and weights ------------------------------------------------------------------
@pytest.mark.slow
def test_an_infinite_learning_rate_exits_2_before_the_model_loads(tmp_path):
    result = run(SINGLE, launcher_env(**QUICK, LEARNING_RATE="1e999", SAVE_PATH=tmp_path / "out"))
    assert result.returncode == 2, result
    lines = error_lines(result.output)
    assert len(lines) == 1 and "LEARNING_RATE=1e999" in lines[0] and "finite" in lines[0], result
    assert not loaded_the_model(result.output)


# Appended to test_launchers' hook: its finder calls _patch (looked up when clara.training.trainer is imported).
HOOKS = (
    SITECUSTOMIZE
    + """

_launcher_patch = _patch


def _patch(trainer):
    _launcher_patch(trainer)
    poison_after = os.environ.get("CLARA_TEST_INF_AFTER_STEPS")
    if poison_after:
        import torch

        step = trainer.optimizer_step
        done = []

        def diverging(engine, *args, **kwargs):
            result = step(engine, *args, **kwargs)
            done.append(1)
            if len(done) == int(poison_after):
                with torch.no_grad():
                    next(p for p in engine.module.parameters() if p.requires_grad).fill_(float("inf"))
            return result

        trainer.optimizer_step = diverging
    full_at = os.environ.get("CLARA_TEST_DISK_FULL_AT_SAVE")
    if full_at:
        import collections
        import shutil

        import torch

        save = torch.save
        calls = []

        def filling(obj, path, *args, **kwargs):
            calls.append(path)
            if len(calls) < int(full_at):
                return save(obj, path, *args, **kwargs)
            with open(path, "wb") as out:
                out.write(b"PK" + bytes(1000))
            usage = shutil.disk_usage(os.path.dirname(path))
            shutil.disk_usage = lambda _: type(usage)(usage.total, usage.total - 4096, 4096)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1000 vs 1002: "
                               "basic_ios::clear: iostream error")

        torch.save = filling
"""
)


def with_safety_hooks(env: dict, hook_dir: Path, **settings) -> dict:
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOKS)
    return {**env, "PYTHONPATH": str(hook_dir), **{k: str(v) for k, v in settings.items()}}


@pytest.mark.slow
def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path):
    save = copy_run(reference, tmp_path / "out", keep_export=True)
    exported = (save / "adapters.safetensors").read_bytes()
    env = with_safety_hooks(
        launcher_env(**{**REFERENCE, "MAX_STEPS": "6", "MAX_CKPT_NUM": "1"}, SAVE_PATH=save),
        tmp_path / "hooks",
        CLARA_TEST_INF_AFTER_STEPS=1,
    )
    result = run(SINGLE, env)
    assert result.returncode == 1, result
    lines = error_lines(result.output)
    assert len(lines) == 1 and "step 5: the trained weights became inf/NaN" in lines[0], result
    checkpoints = save / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(("step_", "tmp_"))) == [
        "step_1",
        "step_2",
        "step_3",
        "step_4",
    ]
    assert manifest_problem(str(checkpoints / "step_4")) is None
    assert (save / "adapters.safetensors").read_bytes() == exported


# -- 5. records that cannot be trained are found up front --------------------------------------------------
@pytest.mark.slow
def test_stage2_samples_with_different_candidate_counts_train(tmp_path):
    rows = [json.loads(line) for line in (REPO / "example" / "end_to_end_data.jsonl").read_text().splitlines()[:4]]
    rows[1]["docs"] = rows[1]["docs"][:19]
    rows[1]["pos_index"] = [i for i in rows[1]["pos_index"] if i < 19]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # One micro-batch of all four samples: 20, 19, 20 and 20 candidates side by side.
    env = launcher_env(
        **{**QUICK, "BATCH_SIZE": "4", "MICRO_BATCH_SIZE": "4", "MAX_STEPS": "1"},
        STAGE="stage2",
        ALLOW_NO_CHECKPOINT="true",
        DATASET=data,
        SAVE_PATH=tmp_path / "out",
    )
    result = run(SINGLE, env)
    assert result.returncode == 0, result
    assert_exported(tmp_path / "out")


def long_record(docs: int) -> dict:
    return {
        "question": "What is the chief metal of Shunster?",
        "answers": "silver",
        "docs": [f"Place {i} is a village. Its chief metal is tin." for i in range(docs)],
    }


@pytest.mark.slow
def test_a_record_over_max_len_is_named_before_the_model_loads(tmp_path):
    data = tmp_path / "long.jsonl"
    good = (REPO / "example" / "instruction_tuning_data.jsonl").read_text().splitlines()[:8]
    data.write_text("\n".join(good[:3] + [json.dumps(long_record(300))] + good[3:]) + "\n")
    env = launcher_env(**QUICK, STAGE="stage1_2", ALLOW_NO_CHECKPOINT="true", DATASET=data, SAVE_PATH=tmp_path / "out")
    result = run(SINGLE, env)
    assert result.returncode == 2, result
    named = [line for line in result.output.splitlines() if line.startswith(f"{data}:")]
    assert len(named) == 1 and named[0].startswith(f"{data}:4: decoder input of "), result
    assert "300 documents x 8 memory tokens" in named[0] and "MAX_LEN=2048" in named[0]
    assert not loaded_the_model(result.output)


def test_bad_samples_skip_drops_a_record_over_max_len(tmp_path):
    from clara.data.load import load_records
    from clara.data.spec import parse_source
    from clara.model.collate import Collator
    from clara.model.stage_model import stage_tokenizer
    from clara.stages import get_stage
    from clara.training.setup import model_settings

    cfg = resolve(TrainConfig(stage="stage1_2", max_len=600), has_cuda=False)
    tokenizer, tokens = stage_tokenizer(model_settings(cfg), cfg.pretrain_checkpoint)
    check = Collator(get_stage(cfg.stage), tokenizer, tokens, cfg.doc_max_length, cfg.max_len).length_problem
    data = tmp_path / "long.jsonl"
    good = (REPO / "example" / "instruction_tuning_data.jsonl").read_text().splitlines()[:3]
    data.write_text("\n".join([good[0], json.dumps(long_record(70)), *good[1:]]) + "\n")
    rejected = tmp_path / "rejected.jsonl"
    records = load_records(
        get_stage("stage1_2"),
        parse_source(str(data)),
        "skip",
        rejected_path=str(rejected),
        log=lambda *_: None,
        make_check=lambda: check,
    )
    assert [r["question"] for r in records] == [json.loads(line)["question"] for line in good]
    assert [json.loads(line)["line"] for line in rejected.read_text().splitlines()] == [2]


# -- 6. a full disk ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_full_disk_names_save_path_and_keeps_the_previous_checkpoint(tmp_path):
    save = tmp_path / "out"
    # The second checkpoint's optimizer file (the 4th torch.save) meets a full disk.
    env = with_safety_hooks(
        launcher_env(**{**QUICK, "MAX_STEPS": "3", "SAVE_STEPS": "1"}, SAVE_PATH=save),
        tmp_path / "hooks",
        CLARA_TEST_DISK_FULL_AT_SAVE=4,
    )
    result = run(SINGLE, env)
    assert result.returncode != 0, result
    lines = error_lines(result.output)
    assert len(lines) == 1, result
    assert f"SAVE_PATH={save}: no space for the resumable checkpoint step_2: it needs about" in lines[0]
    assert "the newest checkpoint" in lines[0] and "step_1 is intact" in lines[0]
    left = sorted(p.name for p in (save / "checkpoints").iterdir() if p.name.startswith(("step_", "tmp_")))
    assert left == ["step_1"]
    assert manifest_problem(str(save / "checkpoints" / "step_1")) is None
    assert not (save / "adapters.safetensors").exists()


# -- 8. RESUME= only a checkpoint; metrics.jsonl is JSON ---------------------------------------------------
@pytest.mark.slow
def test_resume_from_a_directory_that_is_not_a_checkpoint_exits_2(tmp_path):
    result = run(SINGLE, launcher_env(**QUICK, RESUME="/etc", SAVE_PATH=tmp_path / "out"))
    assert result.returncode == 2, result
    lines = error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith(
        "error: RESUME=/etc: expected auto, false, or a resumable checkpoint directory"
    ), result
    assert not loaded_the_model(result.output)


def test_metrics_write_null_for_nan_and_infinity(tmp_path):
    from clara.training.trainer import RunLog

    cfg = resolve(TrainConfig(save_path=str(tmp_path)), has_cuda=False)
    log = RunLog(cfg.save_path, rank=0)
    log.metrics({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}
    assert "NaN" not in line and "Infinity" not in line
