"""bench.cli: the `python -m bench` options are BenchConfig's fields, each read back into the field it names."""

from __future__ import annotations

import dataclasses

import pytest

from bench.cli import build_parser, config_from_args, parse_args
from bench.config import BenchConfig


def test_every_documented_field_is_an_option_with_the_fields_default():
    options = {action.dest: action for action in build_parser()._actions}
    for field in dataclasses.fields(BenchConfig):
        if "help" not in field.metadata:
            assert field.name not in options  # the sweep's labels are set by bench.sweeps, not on the command line
            continue
        assert options[field.name].default == field.default, field.name
        assert options[field.name].help == field.metadata["help"]
    assert config_from_args(parse_args([])) == BenchConfig()


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--stage", "stage2", "--candidates", "20"], {"stage": "stage2", "candidates": 20}),
        (["--tie_word_embeddings", "true", "--profile", "false"], {"tie_word_embeddings": True, "profile": False}),
        (["--gradient_checkpointing", "auto"], {"gradient_checkpointing": None}),
        (["--gradient_checkpointing", "false", "--head_dim", "32"], {"gradient_checkpointing": False, "head_dim": 32}),
        (["--mse_weight", "0.5", "--peak_tflops", "989"], {"mse_weight": 0.5, "peak_tflops": 989.0}),
    ],
)
def test_options_read_into_the_fields_types(argv, expected):
    cfg = config_from_args(parse_args(argv))
    assert {name: getattr(cfg, name) for name in expected} == expected


@pytest.mark.parametrize("argv", [["--stage", "stage9"], ["--zero_stage", "4"], ["--profile", "maybe"]])
def test_a_value_outside_the_fields_choices_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    assert argv[0] in capsys.readouterr().err
