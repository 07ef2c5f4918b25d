"""The base model follows the checkpoint (README "Three stages"): a later stage with PRETRAIN_CHECKPOINT and no
MODEL_PATH trains on the base the checkpoint records, on any device, and a MODEL_PATH whose base-model key
(config.json and sampled weights) differs from the recorded one exits 2 with one line naming both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from clara.config import TrainConfig, recorded_base, resolve
from clara.data.fingerprint import base_model_key, check_base_model
from clara.errors import CheckpointError
from tests.end_to_end.test_launchers import QUICK, REPO, SINGLE, launcher_env, run
from tests.helpers import run_module

TINY = REPO / "clara" / "tiny_model"


def other_base(folder: Path) -> Path:
    """A small base of another shape than the built-in tiny model (same tokenizer, wider MLP, fresh weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY)
    config.intermediate_size = 128
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in TINY.iterdir():
        if name.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(name, folder / name.name)
    return folder


def native_checkpoint(folder: Path, base: str, key: dict | None) -> Path:
    folder.mkdir()
    config = {"format": "clara", "base_model": base, **({"base_model_key": key} if key else {})}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_later_stage_without_model_path_resolves_to_the_recorded_base_on_any_device(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(TINY, base)
    checkpoint = native_checkpoint(tmp_path / "ck", "relative/base", base_model_key(str(base)))
    assert recorded_base(str(checkpoint)) == str(base)  # the key's absolute path, from any directory
    for cuda in (False, True):
        cfg = resolve(TrainConfig(stage="stage1_2", pretrain_checkpoint=str(checkpoint)), has_cuda=cuda)
        assert cfg.model_path == str(base)
    assert resolve(TrainConfig(stage="stage1_2"), has_cuda=False).model_path == "tiny"
    given = resolve(TrainConfig(stage="stage1_2", pretrain_checkpoint=str(checkpoint), model_path="x"), has_cuda=False)
    assert given.model_path == "x"


def test_a_copy_of_the_base_passes_and_another_base_is_refused_naming_both(tmp_path):
    base, copy = tmp_path / "base", tmp_path / "copy"
    shutil.copytree(TINY, base)
    checkpoint = native_checkpoint(tmp_path / "ck", str(base), base_model_key(str(base)))
    shutil.copytree(base, copy)
    check_base_model(str(copy), str(checkpoint), warn=pytest.fail)  # the same config and weights elsewhere
    check_base_model("tiny", str(checkpoint), warn=pytest.fail)  # the shipped folder itself

    weights = load_file(copy / "model.safetensors")
    name = min(weights)
    weights[name] = weights[name] * 1.01  # retrained: same shape, other weights
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as refused:
        check_base_model(str(copy), str(checkpoint))
    line = str(refused.value)
    assert "\n" not in line and f"MODEL_PATH={copy}" in line and f"was trained on: {base}" in line, line
    assert f"PRETRAIN_CHECKPOINT={checkpoint}" in line and "leave MODEL_PATH unset" in line

    shutil.copy(copy / "model.safetensors", base / "model.safetensors")  # the recorded base retrained in place
    with pytest.raises(CheckpointError, match=f"MODEL_PATH={base} changed since PRETRAIN_CHECKPOINT"):
        check_base_model(str(base), str(checkpoint))


def test_python_m_clara_train_refuses_another_base_before_loading_it(tmp_path):
    other = other_base(tmp_path / "other")
    checkpoint = native_checkpoint(tmp_path / "ck", str(other), base_model_key(str(other)))
    args = ["clara.train", "--stage", "stage1_2", "--pretrain_checkpoint", str(checkpoint), "--model_path", "tiny"]
    refused = run_module([*args, "--save_path", str(tmp_path / "out")], timeout=120)
    assert refused.returncode == 2, refused.stderr
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert "MODEL_PATH=tiny" in line and f"was trained on: {other}" in line, line
    assert "Traceback" not in refused.stderr


def test_a_checkpoint_recording_only_a_name_is_compared_by_config_json_and_warned_about(tmp_path):
    base, other = tmp_path / "base", tmp_path / "other"
    shutil.copytree(TINY, base)
    shutil.copytree(TINY, other)
    checkpoint = native_checkpoint(tmp_path / "ck", str(base), None)  # an older checkpoint: no key
    warnings: list[str] = []
    check_base_model(str(other), str(checkpoint), warn=warnings.append)
    assert warnings == []  # the same config.json
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    check_base_model(str(other), str(checkpoint), warn=warnings.append)
    [warning] = warnings
    assert warning.startswith("Warning: ") and "intermediate_size" in warning and str(base) in warning, warning
    check_base_model("no/such-model-here", str(checkpoint), warn=warnings.append)
    assert "could not be compared" in warnings[-1]


@pytest.mark.slow
def test_stage1_2_trains_on_the_base_stage1_was_trained_on_and_refuses_another(tmp_path):
    base = other_base(tmp_path / "my-base")
    data = REPO / "example"
    stage1 = run(
        SINGLE,
        launcher_env(**QUICK, MODEL_PATH=base, SAVE_PATH=tmp_path / "s1", DATASET=data / "pretrain_data.jsonl"),
    )
    assert stage1.returncode == 0, stage1.output
    recorded = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert recorded["base_model_key"] == base_model_key(str(base))

    later = {**QUICK, "MAX_STEPS": "1", "STAGE": "stage1_2", "PRETRAIN_CHECKPOINT": tmp_path / "s1"}
    stage12 = run(SINGLE, launcher_env(**later, SAVE_PATH=tmp_path / "s12"))
    assert stage12.returncode == 0, stage12.output
    assert f"{base} (the base PRETRAIN_CHECKPOINT records)" in stage12.output, stage12.output
    assert json.loads((tmp_path / "s12" / "config.json").read_text())["base_model"] == str(base)

    refused = run(SINGLE, launcher_env(**later, MODEL_PATH="tiny", SAVE_PATH=tmp_path / "s12b"))
    assert refused.returncode == 2, refused.output
    [line] = [line for line in refused.output.splitlines() if line.startswith("error: ")]
    assert "MODEL_PATH=tiny" in line and f"was trained on: {base}" in line, line
    assert "Traceback" not in refused.output
