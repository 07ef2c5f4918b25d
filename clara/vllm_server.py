"""A vLLM OpenAI server from a separate environment, started for one run and stopped with it, whatever ends it.

vLLM pins its own torch and transformers, so it lives in an environment of its own; `VLLMServer(python, model)`
runs `PYTHON -m vllm.entrypoints.openai.api_server --model MODEL --host 127.0.0.1 --port P ...` on a free loopback
port with a random API key (given through VLLM_API_KEY, so that it is not on the command line for `ps` to show),
waits for its `/health`, and stops it and every process it started when the `with` block ends: normally, on an
error or on Ctrl-C.

The parent may also die without running any code (SIGTERM's default action, `kill -9`, the OOM killer), and a
process group alone does not outlive that. So the server is started by a keeper: a small process of this file
(standard library only) that holds the read end of a pipe whose only write end is the parent's. When the parent
ends, however it ends, the kernel closes that end, the keeper reads EOF and stops the server: SIGTERM to the
server's process group and to every process below it (the keeper is a child subreaper, so the server's
children stay its descendants even after the server dies), SIGKILL to what is left after a grace period.
The server itself gets PR_SET_PDEATHSIG (SIGTERM) on the keeper, should the keeper be killed first. The keeper
and the server run in sessions of their own, so a terminal's Ctrl-C reaches only the parent, which stops them.
Linux: the subreaper and the death signal are Linux calls; elsewhere the pipe and the process group still hold.

Synthesis uses it (`--llm vllm:MODEL --vllm_python PATH`), and so does serving (`clara serve --engine vllm`,
clara.serving.vllm_engine), which passes the CPU build's environment through `env`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PORT_TRIES = 3  # a free port may be taken before the server binds it: try another


class VLLMStartError(RuntimeError):
    """The server exited or did not answer /health in time; the message names the log."""


def vllm_command(python: str, model: str, port: int, extra: list[str]) -> list[str]:
    return [python, "-m", VLLM_MODULE, "--model", model, "--host", "127.0.0.1", "--port", str(port), *extra]


class VLLMServer:
    """`with VLLMServer(python, model, log_path=...) as server:` then `server.url` (…/v1) and `server.api_key`."""

    def __init__(
        self,
        python: str,
        model: str,
        extra_args: list[str] | None = None,
        log_path: str | None = None,
        timeout: float = 1800.0,
        grace: float = 15.0,
        env: dict | None = None,
    ):
        self.python, self.model, self.extra = python, model, list(extra_args or [])
        self.log_path = log_path or os.path.join(os.getcwd(), "vllm.log")
        self.timeout, self.grace, self.env = timeout, grace, env
        self.api_key = secrets.token_urlsafe(24)
        self.port: int | None = None
        self.keeper: subprocess.Popen | None = None
        self.server_pid: int | None = None
        self._lifeline: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> VLLMServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        from clara.ports import free_port

        for attempt in range(PORT_TRIES):
            self.port = free_port()
            self._spawn()
            try:
                self._wait_healthy()
                return
            except VLLMStartError:
                self.stop()
                if attempt + 1 == PORT_TRIES or "address already in use" not in self.log_tail().lower():
                    raise

    def _spawn(self) -> None:
        read_end, write_end = os.pipe()  # both non-inheritable: only the keeper gets the read end (pass_fds)
        command = vllm_command(self.python, self.model, self.port, self.extra)
        env = dict(os.environ if self.env is None else self.env, VLLM_API_KEY=self.api_key)
        with open(self.log_path, "ab") as log:
            self.keeper = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    os.path.abspath(__file__),
                    "--keep",
                    str(read_end),
                    str(self.grace),
                    json.dumps(command),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                pass_fds=(read_end,),
                start_new_session=True,
            )
        os.close(read_end)
        self._lifeline = write_end
        line = self.keeper.stdout.readline()  # the keeper's first line: the server's pid (or nothing: it failed)
        if not line.strip():
            raise VLLMStartError(f"the vLLM keeper could not start {command[0]} (see {self.log_path}){self._tail()}")
        self.server_pid = int(line)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.keeper.poll() is not None:
                raise VLLMStartError(
                    f"vLLM ({self.python} -m {VLLM_MODULE} --model {self.model}) exited with status "
                    f"{self.keeper.returncode} before it answered /health; its log is {self.log_path}{self._tail()}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise VLLMStartError(
            f"vLLM did not answer /health within {self.timeout:.0f}s (see {self.log_path}){self._tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def _tail(self) -> str:
        tail = self.log_tail()
        return f"; its last lines:\n{tail}" if tail else ""

    def stop(self) -> None:
        """Close the lifeline (the keeper stops the server and its processes) and wait for the keeper."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self.keeper is not None:
            try:
                self.keeper.wait(timeout=self.grace + 10)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait()
            if self.keeper.stdout is not None:
                self.keeper.stdout.close()
            self.keeper = None


# -- the keeper (a process of its own: standard library only) ---------------------------------------------------
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _server_preexec(libc, keeper: int) -> None:
    """In the server, before exec: SIGTERM when the keeper dies (checked once more: it may be gone already)."""
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != keeper:
        os.kill(os.getpid(), signal.SIGTERM)


def descendants(root: int) -> set[int]:
    """The live (not zombie) pids below `root` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[tuple[int, bool]]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return set()
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as handle:
                state, parent = handle.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        children.setdefault(int(parent), []).append((int(name), state == "Z"))
    found, todo = set(), [root]
    while todo:
        for child, zombie in children.get(todo.pop(), []):
            if not zombie and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_all(group: int, signum: int) -> bool:
    """Signal the server's process group and every live process below the keeper; False when none is left."""
    try:
        os.killpg(group, signum)
    except OSError:
        pass
    left = descendants(os.getpid())
    for pid in left:
        try:
            os.kill(pid, signum)
        except OSError:
            pass
    return bool(left)


def _reap() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def keep(lifeline: int, grace: float, command: list[str]) -> int:
    """Start the server, report its pid, then stop everything when the lifeline closes (or a SIGTERM comes), or
    return the server's status when it ends by itself (after stopping what it left behind)."""
    import selectors

    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    keeper = os.getpid()
    server = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,
        stderr=sys.stderr,
        start_new_session=True,
        preexec_fn=lambda: _server_preexec(libc, keeper),
    )
    print(server.pid, flush=True)
    watch = selectors.DefaultSelector()
    watch.register(lifeline, selectors.EVENT_READ)
    status = None
    while not stopping:
        if watch.select(timeout=0.5) and not os.read(lifeline, 1024):  # EOF: the parent closed it or died
            break
        if (status := server.poll()) is not None:
            break
    deadline = time.monotonic() + grace
    left = _signal_all(server.pid, signal.SIGTERM)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        _reap()
        left = bool(descendants(keeper))
    while _signal_all(server.pid, signal.SIGKILL):
        time.sleep(0.05)
        _reap()
    _reap()
    return status if status is not None else 0


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--keep":
    sys.exit(keep(int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])))
