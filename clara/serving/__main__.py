"""python -m clara.serve --checkpoint CK --index IDX [--host 127.0.0.1] [--port 8000]: an OpenAI-compatible server.

Answers from a corpus index of `python -m clara.index` (README: "Serving a model"): any OpenAI client can
ask; the page at / tries it in a browser. Without an API key (--api_key or CLARA_API_KEY) it listens on
the loopback address only, unless --allow_remote_without_key says otherwise. `--engine vllm` has a vLLM server
generate the answers from the prompt embeddings clara builds (clara.serving.vllm_engine,
docs/guides/serving-vllm.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shlex
import signal
import sys

from clara.cli import add_model_flags, positive_int
from clara.errors import ConfigError, exit_status

LOOPBACK_NAMES = ("localhost",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clara.serve",
        description="Serve a trained CLaRa model over the OpenAI chat API, answering "
        "from a corpus index built by python -m clara.index.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="stage2 checkpoint (or stage1_2: its compressor as reasoner)"
    )
    parser.add_argument("--index", required=True, help="index folder of python -m clara.index")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--api_key",
        default=None,
        help="key every request must carry (Authorization: Bearer KEY); default $CLARA_API_KEY",
    )
    parser.add_argument(
        "--allow_remote_without_key",
        action="store_true",
        help="listen on a non-loopback --host without an API key (for a trusted network only)",
    )
    parser.add_argument(
        "--model_name",
        action="append",
        default=None,
        help="a model name clients may use; give it several times for several names, all listed by /v1/models "
        "(default: the checkpoint's folder name)",
    )
    parser.add_argument(
        "--k",
        type=positive_int,
        default=None,
        help="documents retrieved per question when a request names none (default: generation_top_k)",
    )
    parser.add_argument("--max_k", type=positive_int, default=64, help="largest k a request may ask (default 64)")
    parser.add_argument(
        "--max_tokens", type=positive_int, default=64, help="answer tokens when a request names none (default 64)"
    )
    parser.add_argument(
        "--max_tokens_limit",
        type=positive_int,
        default=1024,
        help="largest max_tokens a request may ask (default 1024)",
    )
    parser.add_argument(
        "--max_batch", type=positive_int, default=16, help="requests answered in one forward (default 16)"
    )
    parser.add_argument(
        "--max_wait_ms",
        type=float,
        default=10.0,
        help="how long the first request of a batch waits for others (default 10)",
    )
    parser.add_argument(
        "--window_tokens",
        type=positive_int,
        default=16,
        help="answer tokens decoded before requests that arrived meanwhile join the batch (default 16)",
    )
    parser.add_argument(
        "--max_body_bytes", type=positive_int, default=1 << 20, help="request body limit (default 1 MiB)"
    )
    add_model_flags(parser)
    parser.add_argument("--model_path", default=None, help="base model to use instead of the one the checkpoint names")
    vllm = parser.add_argument_group("the vLLM engine (--engine vllm; docs/guides/serving-vllm.md)")
    vllm.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="hf: this process decodes (transformers, in windows of --window_tokens); vllm: a vLLM server "
        "generates from the prompt embeddings clara builds, with its paged KV cache and per-token batching",
    )
    vllm.add_argument(
        "--vllm_python",
        default=None,
        help="the python of an environment with vLLM (scripts/make_vllm_env.sh makes one and prints it); "
        "clara starts vLLM with it on a free loopback port with a random key, and stops it on exit",
    )
    vllm.add_argument(
        "--vllm_model",
        default=None,
        help="the generator's export for vLLM (clara export --format vllm); default: made on first use in "
        "$CLARA_HOME/vllm-exports/FINGERPRINT (~/.cache/clara)",
    )
    vllm.add_argument(
        "--vllm_url",
        default=None,
        help="instead of starting one: a running vLLM server (its /v1 URL) serving the export as clara-generator "
        "with --enable-prompt-embeds; it must be reachable by clara only (key: $VLLM_API_KEY)",
    )
    vllm.add_argument(
        "--vllm_args", default="", help="more arguments for vLLM's server, as one string (e.g. GPU memory settings)"
    )
    vllm.add_argument(
        "--vllm_timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for vLLM's /health, and for each piece of an answer (a hung vLLM fails the request "
        "with a 500) (default 1800)",
    )
    vllm.add_argument("--vllm_log", default="vllm.log", help="vLLM's log file (default ./vllm.log)")
    return parser


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_settings(args: argparse.Namespace, api_key: str | None) -> None:
    """Refuse settings that expose the server or cannot work, before loading anything."""
    if not api_key and not is_loopback(args.host) and not args.allow_remote_without_key:
        raise ConfigError(
            "host",
            args.host,
            "a loopback address without an API key (set --api_key or CLARA_API_KEY, "
            "or pass --allow_remote_without_key on a trusted network)",
        )
    if args.max_wait_ms < 0:
        raise ConfigError("max_wait_ms", args.max_wait_ms, "0 or more milliseconds")
    if not 0 < args.port < 65536:
        raise ConfigError("port", args.port, "1 to 65535")
    if args.max_tokens > args.max_tokens_limit:
        raise ConfigError("max_tokens", args.max_tokens, f"at most --max_tokens_limit={args.max_tokens_limit}")
    if args.engine == "vllm" and args.vllm_url is None:
        python = args.vllm_python
        if not python or not os.path.isfile(python) or not os.access(python, os.X_OK):
            raise ConfigError(
                "vllm_python",
                python,
                "the python executable of an environment with vLLM (make one with scripts/make_vllm_env.sh), "
                "or --vllm_url of a running server",
            )
    vllm_only = ("vllm_python", "vllm_model", "vllm_url")
    if args.engine != "vllm" and (given := [f for f in vllm_only if getattr(args, f) is not None]):
        raise ConfigError(given[0], getattr(args, given[0]), "--engine vllm as well")


def build_app(args: argparse.Namespace, api_key: str | None, stack: contextlib.ExitStack):
    # Deferred: --help and the settings checks answer without loading torch.
    from clara.evaluation.inference import CLaRa
    from clara.index.passages import describe_longer
    from clara.index.store import check_index_matches, load_index
    from clara.model.stage_model import ensure_query_reasoner
    from clara.serving.app import Limits, create_app
    from clara.serving.engine import Engine

    clara = CLaRa.from_pretrained(
        args.checkpoint, dtype=args.dtype, flash_attn=args.flash_attn, base_model=args.model_path
    )
    index = load_index(args.index)
    ensure_query_reasoner(clara.model)
    check_index_matches(index, clara.model, args.checkpoint)
    length = clara.model.settings.doc_max_length
    truncated = describe_longer(
        index.meta.get("longer_than_read", 0), len(index.ids), length, f"documents of {args.index}"
    )
    if truncated:
        print(truncated, flush=True)
    top_k = clara.model.settings.generation_top_k
    if args.k is not None and not top_k <= args.k <= min(args.max_k, index.documents):
        raise ConfigError(
            "k",
            args.k,
            f"{top_k} (the checkpoint's generation_top_k) to "
            f"{min(args.max_k, index.documents)} (--max_k, documents in the index)",
        )
    names = args.model_name or [os.path.basename(os.path.normpath(args.checkpoint))]
    name = names[0]
    if args.engine == "vllm":
        engine = vllm_engine(args, clara, index, names, stack)
    else:
        engine = Engine(
            clara,
            index,
            names,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            window_tokens=args.window_tokens,
        )
    limits = Limits(
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        default_k=args.k,
        max_k=args.max_k,
        default_max_tokens=args.max_tokens,
        max_tokens=args.max_tokens_limit,
    )
    return create_app(engine, limits), name, index.documents, clara.device


def vllm_engine(args: argparse.Namespace, clara, index, names: list[str], stack: contextlib.ExitStack):
    """The vLLM engine over a server that this process starts (stopped when `stack` closes) or finds."""
    from clara.serving.engine import ANSWERING
    from clara.serving.vllm_engine import VLLMEngine, vllm_endpoint

    max_len = clara.max_len or ANSWERING.max_len
    positions = clara.model.causal_lm.config.max_position_embeddings
    url, key = stack.enter_context(
        vllm_endpoint(
            clara,
            python=args.vllm_python,
            model_dir=args.vllm_model,
            url=args.vllm_url,
            api_key=os.environ.get("VLLM_API_KEY"),
            extra_args=shlex.split(args.vllm_args),
            max_model_len=min(max_len + args.max_tokens_limit, positions),
            timeout=args.vllm_timeout,
            log_path=args.vllm_log,
        )
    )
    return VLLMEngine(
        clara,
        index,
        names,
        url,
        key,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_len=max_len,
        read_timeout=args.vllm_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get("CLARA_API_KEY") or None
    return exit_status(lambda: serve(args, api_key))


def serve(args: argparse.Namespace, api_key: str | None) -> None:
    """Check the settings, load the model and the index (a user error: exit 2 before anything listens), serve."""
    check_settings(args, api_key)
    # SIGTERM (a service manager's stop) ends the server as Ctrl-C does: uvicorn shuts down and passes the signal
    # on, and this handler turns it into an exit that unwinds, so that a vLLM server started here is stopped.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    with contextlib.ExitStack() as stack:
        app, name, documents, device = build_app(args, api_key, stack)
        run_app(app, args, api_key, f"{name!r} ({documents} documents, {device}, engine {args.engine})")


def stop_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(0)


def run_app(app, args: argparse.Namespace, api_key: str | None, what: str) -> None:
    import uvicorn

    if api_key:
        access = "every request must carry the API key"
    elif is_loopback(args.host):
        access = f"no API key: listening on {args.host} only; set --api_key or CLARA_API_KEY to serve other machines"
    else:
        access = "no API key, on a non-loopback address (--allow_remote_without_key): anyone who reaches it may ask"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {what} on http://{host}:{args.port}/ ({access})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    sys.exit(main())
