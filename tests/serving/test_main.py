"""clara.serving.__main__: the vLLM engine's flags are checked before anything loads (exit 2, one line)."""

from __future__ import annotations

import pytest

from tests.helpers import run_module

SERVE = ["clara", "serve", "--checkpoint", "no-such-checkpoint", "--index", "no-such-index"]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--engine", "vllm"],
            "error: --vllm_python=None: expected the python executable of an environment with "
            "vLLM (make one with scripts/make_vllm_env.sh), or --vllm_url of a running server",
        ),
        (["--engine", "vllm", "--vllm_python", "/no/such/python"], "error: --vllm_python='/no/such/python': expected"),
        (["--vllm_url", "http://127.0.0.1:9/v1"], "error: --vllm_url='http://127.0.0.1:9/v1': expected --engine vllm"),
    ],
)
def test_vllm_settings_that_cannot_work_are_refused_before_loading(flags, expected):
    done = run_module([*SERVE, *flags], timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith(expected), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
