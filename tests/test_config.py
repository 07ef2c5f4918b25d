"""clara.config's units: TrainConfig resolved (defaults that depend on the stage, the model and the device) and
validated (one ConfigError naming the setting). The launchers' own check runs these too
(tests/end_to_end/test_launchers.py)."""

from __future__ import annotations

import math

import pytest

from clara.config import TrainConfig, hub_id_parts, resolve, validate
from clara.errors import ConfigError


@pytest.mark.parametrize(
    "name,value",
    [
        ("learning_rate", math.inf),
        ("learning_rate", math.nan),
        ("learning_rate", -1e-4),
        ("mse_weight", math.inf),
        ("topk_temperature", 0.0),
        ("lora_dropout", 1.0),
        ("warmup_ratio", math.nan),
    ],
)
def test_non_finite_or_out_of_range_numbers_are_refused(name, value):
    cfg = resolve(TrainConfig(dataset="example/pretrain_data.jsonl", save_path="unused"), has_cuda=False)
    setattr(cfg, name, value)
    with pytest.raises(ConfigError, match=f"--{name}="):
        validate(cfg)


def test_data_workers_is_a_validated_setting():
    from clara.config import TrainConfig, resolve, validate

    cfg = resolve(TrainConfig(), has_cuda=False)
    assert 1 <= cfg.data_workers <= 16
    with pytest.raises(ConfigError, match="data_workers"):
        validate(resolve(TrainConfig(data_workers=0), has_cuda=False))


def test_unset_settings_take_the_stage_and_model_defaults():
    tiny = resolve(TrainConfig(), has_cuda=False, world_size=2)
    assert (tiny.model_path, tiny.dataset, tiny.save_path) == (
        "tiny",
        "example/pretrain_data.jsonl",
        "./checkpoints/clara_stage1",
    )
    assert (tiny.micro_batch_size, tiny.batch_size, tiny.mse_weight, tiny.max_len) == (8, 16, 0.0, 2048)
    large = resolve(TrainConfig(stage="stage2", allow_no_checkpoint=True), has_cuda=True)
    assert (large.model_path, large.learning_rate, large.max_len, large.gradient_checkpointing) == (
        "Qwen/Qwen3-14B",
        5e-6,
        1024,
        True,
    )
    given = resolve(TrainConfig(learning_rate=3e-4, max_len=512), has_cuda=False)
    assert (given.learning_rate, given.max_len) == (3e-4, 512)


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    cfg = resolve(TrainConfig(batch_size=6, micro_batch_size=2), has_cuda=False, world_size=2)
    with pytest.raises(ConfigError, match="--batch_size=6"):
        validate(cfg, 2)
    validate(resolve(TrainConfig(batch_size=8, micro_batch_size=2), has_cuda=False, world_size=2), 2)


def test_an_unknown_stage_is_named_with_the_known_ones():
    with pytest.raises(ConfigError, match="--stage=.stage3.: expected one of stage1, stage1_2, stage2"):
        validate(resolve(TrainConfig(stage="stage3"), has_cuda=False))


def test_hub_ids_are_told_from_local_paths(tmp_path):
    assert hub_id_parts("apple/CLaRa-7B-Instruct/compression-16") == ("apple/CLaRa-7B-Instruct", "compression-16")
    assert hub_id_parts("Qwen/Qwen3-14B") == ("Qwen/Qwen3-14B", None)
    for local in ("./model", "/abs/model", "~/model", "model", str(tmp_path)):
        assert hub_id_parts(local) is None
