"""`clara` (python -m clara): one command whose subcommands are exactly the `python -m` forms."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from clara.__main__ import SUBCOMMANDS
from tests.helpers import REPO, run_module, subprocess_env


def test_help_lists_every_subcommand_with_one_line_and_loads_no_torch():
    probe = (
        "import sys, runpy; sys.argv = ['clara', '--help']\n"
        "try:\n    runpy.run_module('clara', run_name='__main__')\n"
        "except SystemExit as stop:\n    assert stop.code == 0, stop.code\n"
        "assert 'torch' not in sys.modules, 'clara --help imported torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    shown = run_module(["clara", "--help"])
    assert shown.returncode == 0, shown.stderr
    listed = [line.split()[0] for line in shown.stdout.split("subcommands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == list(SUBCOMMANDS) == [
        "train", "synthesize", "index", "ask", "evaluate", "benchmark", "export", "serve", "bench"
    ]  # fmt: skip


def test_version_is_the_package_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    shown = run_module(["clara", "--version"])
    assert (shown.returncode, shown.stdout) == (0, f"clara {version}\n"), shown


def test_the_console_script_is_this_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["clara"] == "clara.__main__:main"


def test_a_subcommand_is_its_python_m_form_in_help_output_and_exit_status():
    for name in ("index", "bench"):
        module = SUBCOMMANDS[name][0]
        ours, theirs = run_module(["clara", name, "--help"]), run_module([module, "--help"])
        assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
        assert ours.returncode == 0 and ours.stdout
    # A bad argument: the same one-line error and exit status 2.
    ours, theirs = run_module(["clara", "ask", "--no_such_flag"]), run_module(["clara.ask", "--no_such_flag"])
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr) and ours.returncode == 2


def test_no_or_an_unknown_subcommand_exits_2_saying_what_there_is():
    bare = run_module(["clara"])
    assert bare.returncode == 2 and "subcommands:" in bare.stderr
    wrong = run_module(["clara", "trian"])
    assert wrong.returncode == 2 and "unknown subcommand 'trian'" in wrong.stderr and "train" in wrong.stderr
