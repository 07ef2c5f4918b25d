"""`clara` (and `python -m clara`): one command with a subcommand for each command line.

`clara SUBCOMMAND ARGS...` is exactly `python -m MODULE ARGS...`: the module runs as __main__ with the same
arguments and ends with the same exit status. Nothing is imported before a subcommand is chosen, so
`clara --help` starts at once (no torch). The bash launchers stay the way to train on GPUs and nodes.
"""

from __future__ import annotations

import runpy
import sys

import clara

# subcommand -> (the module `python -m` runs, one line of help)
SUBCOMMANDS = {
    "train": ("clara.train", "train one stage in this process (launchers: train_single_gpu.sh, train_8gpu.sh)"),
    "synthesize": ("clara.synthesize", "training data for the three stages from a corpus, with an LLM"),
    "index": ("clara.index", "compress a corpus into a searchable index"),
    "ask": ("clara.ask", "answer questions from a corpus index"),
    "evaluate": ("clara.evaluate", "evaluate a checkpoint on held-out records (EM, F1, recall)"),
    "benchmark": ("clara.benchmark", "answer quality on the paper's benchmark sets"),
    "export": ("clara.export", "export a checkpoint in the official release layout, or to the Hub"),
    "serve": ("clara.serve", "serve a checkpoint over an OpenAI-compatible HTTP API"),
    "bench": ("bench", "measure a training step's cost (memory, time, FLOPs)"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS)) + 2
    lines = [
        "usage: clara [-h] [--version] SUBCOMMAND [ARGS...]",
        "",
        "CLaRa: train, evaluate and serve compressed-retrieval models. `clara SUBCOMMAND ARGS...` is",
        "`python -m MODULE ARGS...`; `clara SUBCOMMAND --help` lists its arguments.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}{line}" for name, (_, line) in SUBCOMMANDS.items()),
        "",
        "options:",
        "  -h, --help  show this help and exit",
        "  --version   show the package version and exit",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    first = args[0]
    if first in ("-h", "--help"):
        print(usage())
        return 0
    if first == "--version":
        print(f"clara {clara.__version__}")
        return 0
    if first not in SUBCOMMANDS:
        print(
            f"clara: error: unknown subcommand {first!r}; expected one of {', '.join(SUBCOMMANDS)} (clara --help)",
            file=sys.stderr,
        )
        return 2
    module = SUBCOMMANDS[first][0]
    # As `python -m MODULE` runs it: as __main__, sys.argv[0] its file, the exit status its own.
    sys.argv = [module, *args[1:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
