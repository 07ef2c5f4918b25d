"""The input keys: a changed file, setting or weight file changes the key, and what_changed names it."""

from __future__ import annotations

import os

from clara.fingerprint import data_key, file_identity, key_digest, model_key, what_changed


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
