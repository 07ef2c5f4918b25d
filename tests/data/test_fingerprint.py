"""The input keys: a changed file, setting or weight file changes the key, and what_changed names it."""

from __future__ import annotations

import os

from clara.config import TrainConfig, resolve
from clara.data.fingerprint import (
    data_key,
    file_identity,
    input_changes,
    key_digest,
    model_key,
    train_inputs,
    what_changed,
)
from tests.helpers import run_data_key


def test_a_changed_file_or_setting_changes_the_data_key(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n')
    key = data_key([file_identity(str(data))], "stage1", "tiny", {"max_len": 2048})
    assert key_digest(key) == key_digest(data_key([file_identity(str(data))], "stage1", "tiny", {"max_len": 2048}))
    data.write_text('{"a": 1}\n{"a": 2}\n')
    grown = data_key([file_identity(str(data))], "stage1", "tiny", {"max_len": 2048})
    assert key_digest(grown) != key_digest(key)
    assert any(line.startswith("sources: ") for line in what_changed(key, grown))
    shorter = data_key([file_identity(str(data))], "stage1", "tiny", {"max_len": 1024})
    assert what_changed(grown, shorter) == ["settings.max_len: 2048 -> 1024"]


def test_a_changed_weight_file_changes_the_model_key(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(3 << 20))
    before = model_key(str(tmp_path))
    with open(weights, "r+b") as handle:
        handle.seek((3 << 20) - 10)
        handle.write(b"0123456789")
    after = model_key(str(tmp_path))
    assert what_changed(before, after)[0].startswith("weights.model.safetensors: ")
    assert model_key("Qwen/Qwen3-0.6B") == {"model": "Qwen/Qwen3-0.6B"}


def test_the_training_data_key_reads_the_files_the_tokenizer_and_the_settings_that_pick_records(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n')
    cfg = resolve(TrainConfig(dataset=str(data), model_path="tiny"), has_cuda=False)
    key = run_data_key(cfg)
    assert key["sources"] == [file_identity(str(data))] and key["stage"] == "stage1"
    assert key["tokenizer"]["tokenizer"].endswith("tiny_model") and "tokenizer.json" in key["tokenizer"]["files"]
    assert key["settings"]["max_len"] == 2048 and "learning_rate" not in key["settings"]
    assert (
        run_data_key(resolve(TrainConfig(dataset=str(data), model_path="tiny", max_samples=5), has_cuda=False)) != key
    )


def test_input_changes_name_the_file_and_the_weight_file_that_changed(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n')
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "base" / "model.safetensors").write_bytes(b"1234")
    cfg = resolve(TrainConfig(dataset=str(data), model_path=str(tmp_path / "base")), has_cuda=False)
    before = train_inputs(run_data_key(cfg), cfg.model_path, cfg.pretrain_checkpoint)
    assert input_changes(None, before) == []  # a checkpoint written before the keys existed
    data.write_text('{"a": 1}\n{"a": 2}\n')
    (tmp_path / "base" / "model.safetensors").write_bytes(b"5678")
    changes = input_changes(before, train_inputs(run_data_key(cfg), cfg.model_path, cfg.pretrain_checkpoint))
    assert [line.split(":")[0] for line in changes] == [f"DATASET.{data}", "MODEL_PATH.model.safetensors"]
    assert '"9 bytes, modified ' in changes[0] and '-> "18 bytes, modified ' in changes[0]
