"""clara.data.spec: a data setting read into its sources, checked where it comes in (one ConfigError naming
the setting)."""

from __future__ import annotations

import re

import pytest

from clara.config import TrainConfig, validate
from clara.data.spec import HubSource, JsonlFiles, check_data_settings, parse_source
from clara.errors import ConfigError


def test_settings_accept_hub_data_sets():
    good = TrainConfig(
        dataset="hf:apple/CLaRa_multi_stage:pretraining",
        eval_dataset="hf:some/dir:cfg:validation",
        batch_size=1,
        micro_batch_size=1,
        max_len=64,
    )
    validate(good)
    check_data_settings(good.dataset, good.eval_dataset)
    for dataset, message in (
        ("hf:apple/CLaRa_multi_stage", "expected hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT"),
        ("hf:a:b:c:d", "expected hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT"),
        ("hf:a:b,example/pretrain_data.jsonl", "expected one hf: data set on its own"),
        ("missing.jsonl", "'missing.jsonl' does not exist"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_data_settings(dataset, None)


def test_a_setting_reads_into_typed_sources_that_print_as_written():
    hub = parse_source("hf:apple/CLaRa_multi_stage:instruction_tuning:validation")
    assert hub == HubSource("apple/CLaRa_multi_stage", "instruction_tuning", "validation")
    assert str(hub) == "hf:apple/CLaRa_multi_stage:instruction_tuning:validation"
    files = parse_source("a.jsonl, b.jsonl")
    assert files == JsonlFiles(("a.jsonl", "b.jsonl")) and str(files) == "a.jsonl,b.jsonl"
    with pytest.raises(ConfigError, match="--eval_dataset=.*an empty entry"):
        parse_source("a.jsonl,,b.jsonl", "eval_dataset")
