"""The launchers, run the way users run them: as subprocesses with environment overrides, on the CPU.

Every run uses the built-in tiny model, real torchrun processes (gloo) and writes only under tmp_path.
Runs are kept to a few optimizer steps on a few samples; the whole file takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import psutil  # a DeepSpeed dependency
import pytest
import torch
from safetensors.torch import load_file

from clara.training.trainer import micro_batch_indices
from tests.helpers import REPO

SINGLE = "train_single_gpu.sh"
EIGHT = "train_8gpu.sh"

# Every variable the launchers read, cleared so that a developer's shell cannot change a test.
LAUNCHER_VARS = (
    "STAGE MODEL_PATH PRETRAIN_CHECKPOINT ALLOW_NO_CHECKPOINT DATASET EVAL_DATASET EVAL_MAX_SAMPLES SAVE_PATH "
    "BAD_SAMPLES DOC_MAX_LENGTH COMPRESS_RATE GENERATION_TOP_K MAX_LEN MSE_WEIGHT RETRIEVAL_WEIGHT FLASH_ATTN "
    "GRADIENT_CHECKPOINTING LEARNING_RATE BATCH_SIZE MICRO_BATCH_SIZE MAX_EPOCHS MAX_STEPS MAX_SAMPLES SEED "
    "ZERO_STAGE OFFLOAD DEBUG_MODE DEBUG_EVERY_STEPS DEBUG_MAX_PRINT_TOKENS LOGGING_STEPS EVAL_STEPS SAVE_STEPS "
    "MAX_CKPT_NUM RESUME RESUME_CHANGED_INPUTS DATA_WORKERS USE_TENSORBOARD USE_WANDB WANDB_PROJECT NUM_GPUS "
    "NUM_NODES NODE_RANK MASTER_ADDR MASTER_PORT DRY_RUN DTYPE PYTHON"
).split()

# A short run: 2 samples per optimizer step, no debug print.
QUICK = {"DEBUG_MODE": "false", "BATCH_SIZE": "2", "MICRO_BATCH_SIZE": "1", "MAX_SAMPLES": "16", "MAX_STEPS": "2"}
# The same for two processes: one sample per process per step.
QUICK_2RANK = {**QUICK, "NUM_GPUS": "2", "OMP_NUM_THREADS": "1", "MAX_STEPS": "3"}

# Generous: a 2-core machine may be busy with other work.
RUN_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launcher_env(**settings) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARS}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a machine with a GPU
    env["NO_COLOR"] = "1"
    env.setdefault("MASTER_PORT", str(free_port()))
    env.update({key: str(value) for key, value in settings.items()})
    return env


def start(script: str, env: dict, args=(), cwd: Path = REPO, output: Path | None = None) -> subprocess.Popen:
    """Start a launcher in a session of its own (so that its process group can be signalled)."""
    out = open(output, "wb") if output else subprocess.PIPE
    try:
        return subprocess.Popen(
            ["bash", f"./{script}", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if output:
            out.close()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher's process group and every process below it.

    torchrun starts each trainer in a session of its own, so killing the launcher's process group alone
    would leave the trainers running; a machine failure takes them all.
    """
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in below:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    # Gone, not just signalled: a process still dying keeps its ports and files.
    psutil.wait_procs(below, timeout=60)


class Result:
    def __init__(self, returncode: int, output: str, seconds: float):
        self.returncode, self.output, self.seconds = returncode, output, seconds

    def __repr__(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.1f}s; output tail:\n{self.output[-4000:]}"


def run(script: str, env: dict, args=(), cwd: Path = REPO, timeout: float = RUN_TIMEOUT) -> Result:
    started = time.monotonic()
    proc = start(script, env, args, cwd)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    return Result(proc.returncode, out.decode(errors="replace"), time.monotonic() - started)


def metrics(save_path: Path) -> list[dict]:
    lines = (save_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def final_loss(save_path: Path) -> float:
    return [m for m in metrics(save_path) if "loss" in m][-1]["loss"]


def assert_exported(save_path: Path) -> None:
    for name in ("config.json", "adapters.safetensors", "special_tokens.safetensors", "training_args.json"):
        assert (save_path / name).is_file(), f"{save_path} lacks {name}"


def max_weight_difference(a: Path, b: Path) -> float:
    worst = 0.0
    for name in ("adapters.safetensors", "special_tokens.safetensors"):
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys()
        for key in left:
            worst = max(worst, (left[key] - right[key]).abs().max().item())
    return worst


# A sitecustomize module, put first on PYTHONPATH, reaches into the trainer processes without test hooks in
# clara/: when clara.training.trainer is imported it wraps micro_batch_indices (to record each rank's samples) and/or
# optimizer_step (to fail in one rank), as the environment asks.
SITECUSTOMIZE = textwrap.dedent("""
    import json
    import os
    import sys
    import time


    def _patch(trainer):
        rank = os.environ.get("RANK")
        record_dir = os.environ.get("CLARA_TEST_RECORD_DIR")
        if record_dir and rank is not None:
            choose = trainer.micro_batch_indices

            def recorded(order, step_in_epoch, micro, *args, **kwargs):
                indices = choose(order, step_in_epoch, micro, *args, **kwargs)
                with open(os.path.join(record_dir, f"rank{rank}.jsonl"), "a") as out:
                    out.write(json.dumps({"step": step_in_epoch, "micro": micro, "indices": indices}) + "\\n")
                return indices

            trainer.micro_batch_indices = recorded
        if rank is not None and rank == os.environ.get("CLARA_TEST_CRASH_RANK"):
            def crash(*args, **kwargs):
                with open(os.environ["CLARA_TEST_CRASH_MARK"], "w") as out:
                    out.write(str(time.time()))
                raise RuntimeError(f"injected failure in rank {rank}")

            trainer.optimizer_step = crash


    class _AfterTrainerImport:
        def find_spec(self, name, path=None, target=None):
            if name != "clara.training.trainer":
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec


    sys.meta_path.insert(0, _AfterTrainerImport())
""")


def with_hooks(env: dict, hook_dir: Path, **settings) -> dict:
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook_dir), env.get("PYTHONPATH", "")) if p)
    env.update({key: str(value) for key, value in settings.items()})
    return env


# -- shared runs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`./train_single_gpu.sh` with nothing set but MAX_STEPS, from a working copy of the repository."""
    work = tmp_path_factory.mktemp("workcopy")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("clara", "example", "scripts"):
        shutil.copytree(REPO / name, work / name, ignore=ignore)
    for name in (SINGLE, EIGHT):
        shutil.copy2(REPO / name, work / name)
    env = launcher_env(MAX_STEPS=2)
    if port_is_free(29501):
        del env["MASTER_PORT"]  # the script's own default
    return work, run(SINGLE, env, cwd=work)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """train_8gpu.sh with NUM_GPUS=2 (stage1), recording the samples each rank reads."""
    tmp = tmp_path_factory.mktemp("two_rank")
    env = with_hooks(launcher_env(**QUICK_2RANK, SAVE_PATH=tmp / "out"), tmp / "hooks", CLARA_TEST_RECORD_DIR=tmp)
    result = run(EIGHT, env)
    print(f"two-rank run (train_8gpu.sh NUM_GPUS=2, 3 steps): {result.seconds:.1f}s wall")
    return tmp, result


# -- 1. the defaults -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_single_gpu_run_trains_stage1_on_the_tiny_model(default_run):
    from clara.model.checkpoint import load_model

    work, result = default_run
    assert result.returncode == 0, result
    out = result.output
    assert "no CUDA device found" in out
    assert re.search(r"MODEL_PATH\s+tiny", out)
    assert re.search(r"DATASET\s+example/pretrain_data.jsonl", out)
    assert re.search(r"SAVE_PATH\s+\./checkpoints/clara_stage1", out)
    assert re.search(r"LEARNING_RATE\s+auto: 2e-3", out)
    assert "--nproc_per_node 1" in out and "-m clara.train" in out
    assert re.search(r"stage1: 100%\|.*\| 2/2 \[", out), "no progress bar"
    assert "[Debug] CLaRa Training Debug" in out  # DEBUG_MODE defaults to true
    save = work / "checkpoints" / "clara_stage1"
    assert_exported(save)
    assert len(metrics(save)) == 2
    log = (save / "train.log").read_text()
    assert "CLaRa stage1: train_single_gpu.sh" in log and "Saved the stage1 model" in log
    model = load_model(str(save))
    assert model is not None


# -- 2. the three stages chained ---------------------------------------------------------------------------
@pytest.mark.slow
def test_three_stages_chain_through_pretrain_checkpoint(default_run, tmp_path):
    work, first = default_run
    assert first.returncode == 0, first
    stage1 = work / "checkpoints" / "clara_stage1"
    stage1_2 = tmp_path / "stage1_2"
    result = run(SINGLE, launcher_env(**QUICK, STAGE="stage1_2", PRETRAIN_CHECKPOINT=stage1, SAVE_PATH=stage1_2))
    assert result.returncode == 0, result
    assert "encoder_adapter loaded from" in result.output
    assert_exported(stage1_2)
    assert json.loads((stage1_2 / "config.json").read_text())["stage"] == "stage1_2"

    stage2 = tmp_path / "stage2"
    # Extra arguments go to the trainer unchanged and win over the variables.
    env = launcher_env(**{**QUICK, "MAX_STEPS": 5}, STAGE="stage2", PRETRAIN_CHECKPOINT=stage1_2, SAVE_PATH=stage2)
    result = run(SINGLE, env, args=("--max_steps", "2"))
    assert result.returncode == 0, result
    assert_exported(stage2)
    assert json.loads((stage2 / "config.json").read_text())["stage"] == "stage2"
    assert [m["step"] for m in metrics(stage2)] == [1, 2]

    # Stage 2 keeps the compressor frozen, memory embeddings included: a document compressed before
    # stage 2 has the same vectors after it.
    from clara import CLaRa

    document = ["Povai is a city. Its national flower is violet."]
    before, _ = CLaRa.from_pretrained(str(stage1_2), device="cpu").compress_documents(documents=document)
    after, _ = CLaRa.from_pretrained(str(stage2), device="cpu").compress_documents(documents=document)
    assert torch.equal(before, after)


@pytest.mark.slow
def test_stage1_to_stage1_2_with_two_processes(two_rank_run, tmp_path):
    tmp, first = two_rank_run
    assert first.returncode == 0, first
    save = tmp_path / "stage1_2"
    env = launcher_env(
        **{**QUICK_2RANK, "MAX_STEPS": 2}, STAGE="stage1_2", PRETRAIN_CHECKPOINT=tmp / "out", SAVE_PATH=save
    )
    result = run(EIGHT, env)
    assert result.returncode == 0, result
    assert "world size 2" in result.output
    assert_exported(save)
    assert json.loads((save / "config.json").read_text())["stage"] == "stage1_2"


# -- 3. several processes and nodes -------------------------------------------------------------------------
def test_ranks_read_disjoint_parts_of_each_batch():
    order = list(range(100, 140))
    batch, micro_size, world = 8, 2, 2
    for step in range(3):
        seen = {
            rank: [
                i
                for micro in range(batch // (micro_size * world))
                for i in micro_batch_indices(order, step, micro, rank, world, batch, micro_size)
            ]
            for rank in range(world)
        }
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == order[step * batch : (step + 1) * batch]


@pytest.mark.slow
def test_two_processes_train_with_zero2_on_different_data(two_rank_run):
    tmp, result = two_rank_run
    assert result.returncode == 0, result
    assert "--nproc_per_node 2" in result.output
    assert "world size 2" in result.output
    args = json.loads((tmp / "out" / "training_args.json").read_text())
    assert args["zero_stage"] == 2
    assert len(metrics(tmp / "out")) == 3
    assert_exported(tmp / "out")
    # What each rank read, recorded inside the trainer processes: disjoint, and together the whole batch.
    reads = {
        rank: [json.loads(line) for line in (tmp / f"rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)
    }
    assert len(reads[0]) == len(reads[1]) == 3  # 3 steps x 1 micro-batch
    for left, right in zip(reads[0], reads[1]):
        assert left["step"] == right["step"]
        assert left["indices"] and right["indices"] and not set(left["indices"]) & set(right["indices"])


@pytest.mark.slow
def test_two_nodes_on_loopback_match_two_processes(two_rank_run, tmp_path):
    tmp, reference = two_rank_run
    assert reference.returncode == 0, reference
    save = tmp_path / "out"  # one directory for both nodes, like a shared file system
    port = free_port()
    nodes = [
        start(
            EIGHT,
            launcher_env(
                **{**QUICK_2RANK, "NUM_GPUS": 1},
                NUM_NODES=2,
                NODE_RANK=rank,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                SAVE_PATH=save,
            ),
            output=tmp_path / f"node{rank}.out",
        )
        for rank in (0, 1)
    ]
    try:
        codes = [node.wait(timeout=RUN_TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_tree(node)
    outputs = [(tmp_path / f"node{rank}.out").read_text(errors="replace") for rank in (0, 1)]
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world size 2" in outputs[0]
    assert (save / "train.log").is_file() and (save / "train_node1.log").is_file()
    assert_exported(save)
    assert len(metrics(save)) == 3
    assert final_loss(save) == pytest.approx(final_loss(tmp / "out"), rel=1e-6, abs=1e-7)


# -- 4. preemption -------------------------------------------------------------------------------------------
def wait_for(condition, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_to_the_same_weights(tmp_path):
    """The same command right after kill -9 resumes, as a scheduler's automatic restart would: with
    MASTER_PORT unset, each run picks a free port, so the dying workers' port does not block it."""
    settings = {**QUICK, "MAX_STEPS": 6, "SAVE_STEPS": 2}
    save = tmp_path / "interrupted"
    env = launcher_env(**settings, SAVE_PATH=save)
    del env["MASTER_PORT"]
    proc = start(SINGLE, env, output=tmp_path / "first.out")
    try:
        wait_for(lambda: (save / "checkpoints" / "step_2").is_dir(), proc, what="checkpoint step_2")
        below = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and torchrun; the workers die with their agent
        proc.wait()
        resumed = run(SINGLE, env)  # at once, while the workers may still be dying
    finally:
        kill_tree(proc)
    psutil.wait_procs(below, timeout=60)
    assert not (tmp_path / "first.out").read_text().count("Saved the stage1 model"), "the run finished first"
    assert resumed.returncode == 0, resumed
    assert "Resumed from" in resumed.output
    assert_exported(save)

    reference = tmp_path / "uninterrupted"
    straight = run(SINGLE, launcher_env(**settings, SAVE_PATH=reference))
    assert straight.returncode == 0, straight
    assert "Resumed from" not in straight.output
    assert max_weight_difference(save, reference) < 1e-6


@pytest.mark.slow
def test_resuming_with_other_settings_names_them(tmp_path):
    save = tmp_path / "out"
    first = run(SINGLE, launcher_env(**QUICK, SAVE_PATH=save, SAVE_STEPS=2))
    assert first.returncode == 0, first
    # A longer run with another learning rate resumes from step 2 and says what changed;
    # the longer run alone (MAX_STEPS) is a change that resuming is for, and goes unmentioned.
    second = run(SINGLE, launcher_env(**{**QUICK, "MAX_STEPS": "3"}, SAVE_PATH=save, LEARNING_RATE="0.001"))
    assert second.returncode == 0, second
    assert "Resumed from" in second.output
    warning = next(line for line in second.output.splitlines() if line.startswith("Warning: the run that saved"))
    assert "learning_rate 0.002 -> 0.001" in warning and "max_steps" not in warning
    # ... and the new rate is the one used: after the last of 3 steps the cosine is at its floor, 0.1 x peak.
    assert metrics(save)[-1]["lr"] == pytest.approx(0.1 * 0.001)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["process_group", "launcher_only"])
def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tmp_path, target):
    """SIGTERM to the run's process group (Ctrl-C, a scheduler), or to the launcher alone (a container's PID 1)."""
    save = tmp_path / "out"
    env = launcher_env(**{**QUICK, "MAX_STEPS": 500, "MAX_SAMPLES": 1000}, SAVE_PATH=save, SAVE_STEPS=400)
    proc = start(SINGLE, env, output=tmp_path / "run.out")
    try:
        wait_for(
            lambda: (save / "metrics.jsonl").is_file() and (save / "metrics.jsonl").stat().st_size > 0,
            proc,
            what="the first optimizer step",
        )
        if target == "process_group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    out = (tmp_path / "run.out").read_text(errors="replace")
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "Received SIGTERM: saved a resumable checkpoint" in out
    steps = [int(p.name.split("_")[1]) for p in (save / "checkpoints").glob("step_*")]
    assert steps and max(steps) < 500
    assert not (save / "adapters.safetensors").exists()
    assert "Received SIGTERM" in (save / "train.log").read_text()  # the log kept the trainer's last words


# -- 5. validation ------------------------------------------------------------------------------------------
INVALID = [
    # (script, settings, variable named in the message)
    (SINGLE, {"BATCH_SIZE": "four"}, "BATCH_SIZE"),
    (SINGLE, {"MICRO_BATCH_SIZE": "1.5"}, "MICRO_BATCH_SIZE"),
    (SINGLE, {"MAX_STEPS": "1e3"}, "MAX_STEPS"),
    (SINGLE, {"LEARNING_RATE": "fast"}, "LEARNING_RATE"),
    (SINGLE, {"LEARNING_RATE": "0"}, "LEARNING_RATE"),
    (SINGLE, {"MSE_WEIGHT": "-0.1"}, "MSE_WEIGHT"),
    (SINGLE, {"STAGE": "stage2", "RETRIEVAL_WEIGHT": "nan"}, "RETRIEVAL_WEIGHT"),
    (SINGLE, {"MASTER_PORT": "70000"}, "MASTER_PORT"),
    (SINGLE, {"STAGE": "stage3"}, "STAGE"),
    (SINGLE, {"DATASET": "no/such/file.jsonl"}, "DATASET"),
    (SINGLE, {"DATASET": "example/pretrain_data.jsonl,missing.jsonl"}, "DATASET"),
    (SINGLE, {"DATASET": "example"}, "DATASET"),
    (SINGLE, {"EVAL_DATASET": "missing_eval.jsonl"}, "EVAL_DATASET"),
    (EIGHT, {"NUM_GPUS": "2", "MICRO_BATCH_SIZE": "2", "BATCH_SIZE": "6"}, "BATCH_SIZE"),
    (EIGHT, {"NUM_GPUS": "2", "NUM_NODES": "2", "BATCH_SIZE": "4", "MICRO_BATCH_SIZE": "2"}, "BATCH_SIZE"),
    (SINGLE, {"DOC_MAX_LENGTH": "100"}, "DOC_MAX_LENGTH"),
    (EIGHT, {"NUM_NODES": "2", "NODE_RANK": "2"}, "NODE_RANK"),
    (SINGLE, {"STAGE": "stage1_2", "PRETRAIN_CHECKPOINT": "example"}, "PRETRAIN_CHECKPOINT"),
    (SINGLE, {"STAGE": "stage2", "PRETRAIN_CHECKPOINT": "./no/such/dir"}, "PRETRAIN_CHECKPOINT"),  # not a Hub id
    (SINGLE, {"STAGE": "stage2", "PRETRAIN_CHECKPOINT": "example/no_such_dir"}, "PRETRAIN_CHECKPOINT"),
    (SINGLE, {"STAGE": "stage1_2"}, "PRETRAIN_CHECKPOINT"),
    (EIGHT, {"STAGE": "stage2"}, "PRETRAIN_CHECKPOINT"),
    (SINGLE, {"DEBUG_MODE": "yes"}, "DEBUG_MODE"),
    (SINGLE, {"ALLOW_NO_CHECKPOINT": "1", "STAGE": "stage2"}, "ALLOW_NO_CHECKPOINT"),
    (SINGLE, {"DRY_RUN": "maybe"}, "DRY_RUN"),
    (SINGLE, {"ZERO_STAGE": "4"}, "ZERO_STAGE"),
    (SINGLE, {"OFFLOAD": "gpu"}, "OFFLOAD"),
    (EIGHT, {"OFFLOAD": "all", "ZERO_STAGE": "2"}, "OFFLOAD"),
    (SINGLE, {"OFFLOAD": "optimizer", "ZERO_STAGE": "0"}, "OFFLOAD"),
    (SINGLE, {"RESUME": "sometimes"}, "RESUME"),
    (SINGLE, {"DTYPE": "fp8"}, "DTYPE"),
    (SINGLE, {"LEARNING_RATE": "1e999"}, "LEARNING_RATE"),
]


@pytest.mark.parametrize(
    "script,settings,variable", INVALID, ids=[f"{v}={s[v] if v in s else 'unset'}" for _, s, v in INVALID]
)
@pytest.mark.slow
def test_invalid_setting_exits_2_with_one_line(tmp_path, script, settings, variable):
    env = launcher_env(**settings, SAVE_PATH=tmp_path / "out")
    started = time.monotonic()
    proc = subprocess.run(["bash", f"./{script}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and variable in lines[0] and "expected" in lines[0]
    if variable in settings:
        assert f"{variable}={settings[variable]}" in lines[0]
    assert seconds < 5, f"validation took {seconds:.1f}s: something heavy ran first"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "settings,variable",
    [
        ({"DTYPE": "fp16"}, "DTYPE"),  # fp16 loss scaling needs CUDA
        ({"NUM_GPUS": "4294967296", "MICRO_BATCH_SIZE": "4294967296"}, "NUM_GPUS"),  # more processes than cores
    ],
)
@pytest.mark.slow
def test_settings_known_bad_once_the_devices_are_known_are_one_line(tmp_path, settings, variable):
    """Checked once the launcher has looked for CUDA (after importing torch), so not timed as above."""
    env = launcher_env(**settings, SAVE_PATH=tmp_path / "out")
    proc = subprocess.run(["bash", f"./{EIGHT}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith(f"error: {variable}={settings[variable]}: expected"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_an_unwritable_save_path_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    env = launcher_env(**QUICK, SAVE_PATH=blocker / "out")
    proc = subprocess.run(["bash", f"./{SINGLE}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: SAVE_PATH={blocker / 'out'}: cannot write") and "expected" in proc.stderr


@pytest.mark.slow
def test_bad_data_keeps_the_trainers_exit_status_2(tmp_path):
    """Records are checked by the trainer (through torchrun, which itself exits 1): the launcher keeps its 2."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": ["q"], "answers": ["a"], "docs": ["d"]}\nnot json\n')
    result = run(SINGLE, launcher_env(**QUICK, DATASET=data, SAVE_PATH=tmp_path / "out"))
    assert result.returncode == 2, result
    assert f"{data}:2: not valid JSON" in result.output
    assert "training failed (exit 2)" in (tmp_path / "out" / "train.log").read_text()


@pytest.mark.slow
def test_allow_no_checkpoint_lets_stage2_start_from_the_base_model(tmp_path):
    env = launcher_env(STAGE="stage2", ALLOW_NO_CHECKPOINT="true", DRY_RUN="true", SAVE_PATH=tmp_path / "out")
    result = run(SINGLE, env, timeout=60)
    assert result.returncode == 0, result
    assert "--allow_no_checkpoint true" in result.output
    assert "--dataset example/end_to_end_data.jsonl" in result.output


# -- 6. a failing rank ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_crash_in_one_rank_ends_the_job_and_names_the_rank(tmp_path):
    mark = tmp_path / "crashed_at"
    env = with_hooks(
        launcher_env(**QUICK_2RANK, SAVE_PATH=tmp_path / "out"),
        tmp_path / "hooks",
        CLARA_TEST_CRASH_RANK=1,
        CLARA_TEST_CRASH_MARK=mark,
    )
    result = run(EIGHT, env)
    ended = time.time()
    assert result.returncode != 0, result
    assert mark.is_file(), result
    assert ended - float(mark.read_text()) < 30, f"the job took {ended - float(mark.read_text()):.0f}s to end"
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", result.output), result
    assert "injected failure in rank 1" in result.output
    assert "training failed" in result.output
    assert "injected failure in rank 1" in (tmp_path / "out" / "train.log").read_text()


# -- 7. DRY_RUN ---------------------------------------------------------------------------------------------
def command_words(output: str) -> list[str]:
    line = output.strip().splitlines()[-1]
    words = shlex.split(line)
    while re.fullmatch(r"[A-Z_]+=.*", words[0]):
        words.pop(0)
    return words


def flag_value(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


@pytest.mark.slow
def test_dry_run_prints_the_exact_command_and_runs_nothing(tmp_path):
    save = tmp_path / "out"
    port = str(free_port())
    env = launcher_env(
        NUM_GPUS=2,
        BATCH_SIZE=8,
        MICRO_BATCH_SIZE=2,
        DRY_RUN="true",
        SAVE_PATH=save,
        MASTER_PORT=port,
        LEARNING_RATE="3e-4",
    )
    env.pop("OMP_NUM_THREADS", None)  # the launcher shares the cores among the processes
    extra = ("--max_new_tokens", "16", "--wandb_project", "two words")
    result = run(EIGHT, env, args=extra, timeout=60)
    assert result.returncode == 0, result
    assert result.seconds < 20
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"OMP_NUM_THREADS={threads} " in result.output.strip().splitlines()[-1]
    words = command_words(result.output)
    # torchrun, through clara.training.run_workers (which returns the failed worker's own exit status)
    assert words[1:3] == ["-m", "clara.training.run_workers"] and words[words.index("clara.train") - 1] == "-m"
    for flag, value in [
        ("--nproc_per_node", "2"),
        ("--nnodes", "1"),
        ("--node_rank", "0"),
        ("--master_addr", "127.0.0.1"),
        ("--master_port", port),
        ("--stage", "stage1"),
        ("--model_path", "tiny"),
        ("--batch_size", "8"),
        ("--micro_batch_size", "2"),
        ("--zero_stage", "2"),
        ("--save_path", str(save)),
        ("--dataset", "example/pretrain_data.jsonl"),
        ("--debug_every_steps", "10"),
        ("--save_steps", "500"),
    ]:
        assert flag_value(words, flag) == value, flag
    assert float(flag_value(words, "--learning_rate")) == 3e-4
    assert "--max_len" not in words  # unset: the trainer's own per-stage default applies
    assert tuple(words[-len(extra) :]) == extra  # passed on unchanged, last so that they win
    assert not save.exists()  # nothing ran: no log, no output directory


@pytest.mark.slow
def test_dry_run_with_cuda_defaults_to_the_large_model(tmp_path):
    # A stand-in torch that reports 8 CUDA devices; only the launcher's device probe imports it.
    fake = tmp_path / "fake_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("class cuda:\n    @staticmethod\n    def device_count():\n        return 8\n")
    env = launcher_env(DRY_RUN="true", SAVE_PATH=tmp_path / "out", PYTHONPATH=fake.parent)
    result = run(EIGHT, env, timeout=60)
    assert result.returncode == 0, result
    words = command_words(result.output)
    assert flag_value(words, "--model_path") == "Qwen/Qwen3-14B"
    assert flag_value(words, "--gradient_checkpointing") == "true"
    assert flag_value(words, "--nproc_per_node") == "8"
    assert re.search(r"LEARNING_RATE\s+auto: 1e-4", result.output)

    too_many = run(EIGHT, {**env, "NUM_GPUS": "16", "BATCH_SIZE": "32"}, timeout=60)
    assert too_many.returncode == 2, too_many
    assert "NUM_GPUS=16" in too_many.output and "8" in too_many.output
