"""`python -m clara.launch`: the launchers' settings resolved and checked in one call, before anything heavy.

train_single_gpu.sh and train_8gpu.sh read environment variables (the trainer's flags in upper case, plus
NUM_GPUS, NUM_NODES, NODE_RANK, MASTER_ADDR, MASTER_PORT and DRY_RUN) and call this module, which

- parses and validates every setting (exit 2 and one line naming the variable, its value and what is
  expected), with the same resolve() and validate() that the trainer runs again on its flags;
- finds the devices (CUDA or CPU) and the defaults that depend on them;
- prints, for the script to `eval`, bash assignments: the torchrun command and its environment, the log
  file, and the summary of the resolved settings.

Bash keeps what bash must do: each script's block of defaults, the log, running torchrun, signals.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

from clara.cli import build_parser, parse_value, value_type
from clara.config import TINY_MODEL_NAME, ConfigError, TrainConfig, recorded_base, resolve, validate
from clara.data.fingerprint import check_base_model
from clara.data.spec import check_data_settings
from clara.errors import FolderBusy, exit_status
from clara.locks import take
from clara.stages import Stage
from clara.training.launch_env import (
    LaunchError,
    Processes,
    env_bool,
    processes_from_env,
    usage,
)

# torchrun kills workers that have not exited this long after it passed a signal on; saving a large
# model's resumable checkpoint can take longer than its default of 30 s.
SHUTDOWN_TIMEOUT_S = 300
# Left out of the command when unset, so that the trainer stays the one place that decides them.
TRAINER_DECIDES = ("learning_rate", "mse_weight", "max_len")
# How the summary shows a setting the trainer chose.
AUTO = "auto: {} (the trainer's default for this {})"
KINDS = {int: "an integer", float: "a number (e.g. 1e-4)", bool: "true or false"}


def settings_from_env(extra: list[str]) -> tuple[TrainConfig, dict[str, str]]:
    """TrainConfig from the environment (empty means unset), with the extra trainer arguments on top;
    and the text of each variable that was set, for the error messages."""
    values, texts = {}, {}
    for field in dataclasses.fields(TrainConfig):
        text = os.environ.get(field.name.upper(), "")
        if not text.strip():
            continue
        texts[field.name] = text
        try:
            values[field.name] = parse_value(field, text)
        except (ValueError, argparse.ArgumentTypeError):
            raise LaunchError(f"{field.name.upper()}={text}: expected {KINDS.get(value_type(field), 'text')}") from None
    parser = build_parser()
    parser.set_defaults(**values)
    return TrainConfig(**vars(parser.parse_args(extra))), texts


def cuda_devices() -> int:
    try:
        import torch  # deferred: the only heavy import, after every setting that can be checked without it
    except ImportError as error:
        raise LaunchError(f"cannot import torch ({error}); expected the packages of requirements.txt") from None
    return torch.cuda.device_count()


def check_devices(procs: Processes, devices: int, dtype: str) -> None:
    if devices and procs.num_gpus > devices:
        raise LaunchError(
            f"NUM_GPUS={procs.num_gpus}: expected at most {devices} (the CUDA devices visible on this node)"
        )
    if not devices and dtype == "fp16":
        raise LaunchError(
            "DTYPE=fp16: expected auto, bf16 or fp32 without a CUDA device (fp16 loss scaling needs CUDA)"
        )
    cores = os.cpu_count() or 1
    if not devices and procs.num_gpus > cores:
        raise LaunchError(
            f"NUM_GPUS={procs.num_gpus}: expected at most {cores} (no CUDA device: one CPU "
            "process per core of this node)"
        )


def thread_setting(cfg: TrainConfig, procs: Processes) -> tuple[str | None, str]:
    """OMP_NUM_THREADS to set (None: keep the environment's) and how it was chosen."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None, f"{os.environ['OMP_NUM_THREADS']} (from the environment)"
    if cfg.model_path == TINY_MODEL_NAME:
        return "1", "1 (the tiny model is faster on one thread)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // procs.num_gpus)
    return str(threads), f"{threads} ({cores} cores / {procs.num_gpus} process(es) on this node)"


def trainer_flags(cfg: TrainConfig, given: TrainConfig) -> list[str]:
    flags = []
    for field in dataclasses.fields(TrainConfig):
        value = getattr(given if field.name in TRAINER_DECIDES else cfg, field.name)
        if value is not None:
            flags += [f"--{field.name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def short_rate(rate: float) -> str:
    """1e-4 rather than 0.0001."""
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def summary(
    script: str,
    cfg: TrainConfig,
    stage: Stage,
    given: TrainConfig,
    procs: Processes,
    device: str,
    model_note: str,
    threads: str,
    extra: list[str],
) -> str:
    """The block the launcher prints before training: every resolved setting, and where a default came from."""
    rows = [
        *model_rows(cfg, stage, device, model_note),
        *schedule_rows(cfg, given, procs),
        *process_rows(cfg, given, procs, threads, extra),
    ]
    lines = [f"==================== CLaRa {stage.name}: {script} ===================="]
    lines += [f"  {key:<30} {value}" for key, value in rows]
    return "\n".join(lines)


def model_rows(cfg: TrainConfig, stage: Stage, device: str, model_note: str) -> list[tuple[str, str]]:
    """The summary's device, model, data and memory-token rows."""
    return [
        ("device", device),
        ("MODEL_PATH", cfg.model_path + model_note),
        ("PRETRAIN_CHECKPOINT", cfg.pretrain_checkpoint or "(none: adapters start fresh)"),
        ("DATASET", cfg.dataset),
        ("EVAL_DATASET", cfg.eval_dataset or "(none)"),
        ("SAVE_PATH", cfg.save_path),
        (
            "DOC_MAX_LENGTH / COMPRESS_RATE",
            f"{cfg.doc_max_length} / {cfg.compress_rate} = {cfg.n_mem_tokens} memory tokens per document",
        ),
        *(
            [
                ("GENERATION_TOP_K", str(cfg.generation_top_k)),
                (
                    "RETRIEVAL_WEIGHT",
                    f"{cfg.retrieval_weight:g}"
                    + ("" if cfg.retrieval_weight else " (the official objective: the generator's loss only)"),
                ),
            ]
            if stage.uses_query
            else []
        ),
    ]


def schedule_rows(cfg: TrainConfig, given: TrainConfig, procs: Processes) -> list[tuple[str, str]]:
    """The summary's learning-rate, batch, length, debug-print and step-interval rows."""
    return [
        (
            "LEARNING_RATE",
            short_rate(cfg.learning_rate)
            if given.learning_rate is not None
            else AUTO.format(short_rate(cfg.learning_rate), "model and stage"),
        ),
        (
            "BATCH_SIZE",
            f"{cfg.batch_size} = MICRO_BATCH_SIZE {cfg.micro_batch_size} x {procs.world_size} process(es) "
            f"x gradient accumulation {cfg.batch_size // (cfg.micro_batch_size * procs.world_size)}",
        ),
        ("MAX_EPOCHS", str(cfg.max_epochs)),
        ("MAX_STEPS", str(cfg.max_steps) if cfg.max_steps else "(unset: the epochs decide)"),
        ("MAX_SAMPLES", str(cfg.max_samples) if cfg.max_samples else "(unset: all)"),
        ("MAX_LEN", str(cfg.max_len) if given.max_len is not None else AUTO.format(cfg.max_len, "stage")),
        (
            "DEBUG_MODE",
            f"{str(cfg.debug_mode).lower()} (every {cfg.debug_every_steps} steps, up to "
            f"{cfg.debug_max_print_tokens} tokens)",
        ),
        ("LOGGING/EVAL/SAVE_STEPS", f"{cfg.logging_steps} / {cfg.eval_steps} / {cfg.save_steps}"),
    ]


def process_rows(
    cfg: TrainConfig, given: TrainConfig, procs: Processes, threads: str, extra: list[str]
) -> list[tuple[str, str]]:
    """The summary's process, memory, precision, resume, data-worker and logging rows."""
    return [
        (
            "processes",
            f"NUM_NODES {procs.num_nodes} x NUM_GPUS {procs.num_gpus} = world size {procs.world_size}; "
            f"NODE_RANK {procs.node_rank}; rendezvous {procs.master_addr}:{procs.master_port}",
        ),
        ("ZERO_STAGE / OFFLOAD", f"{cfg.zero_stage} / {cfg.offload}"),
        ("GRADIENT_CHECKPOINTING", str(cfg.gradient_checkpointing).lower()),
        ("DTYPE / FLASH_ATTN", f"{cfg.dtype} / {cfg.flash_attn}"),
        (
            "MSE_WEIGHT",
            f"{cfg.mse_weight:g}" if given.mse_weight is not None else AUTO.format(f"{cfg.mse_weight:g}", "model"),
        ),
        ("SEED", str(cfg.seed)),
        ("RESUME / MAX_CKPT_NUM", f"{cfg.resume} / {cfg.max_ckpt_num}"),
        (
            "RESUME_CHANGED_INPUTS",
            str(cfg.resume_changed_inputs).lower()
            + ("" if cfg.resume_changed_inputs else " (a resume onto changed data or base model stops)"),
        ),
        ("BAD_SAMPLES", cfg.bad_samples),
        (
            "DATA_WORKERS",
            f"{cfg.data_workers}"
            + ("" if given.data_workers is not None else " (auto: the CPUs this process may use, at most 16)"),
        ),
        (
            "USE_TENSORBOARD/WANDB",
            f"{str(cfg.use_tensorboard).lower()} / {str(cfg.use_wandb).lower()} (project {cfg.wandb_project})",
        ),
        ("OMP_NUM_THREADS", threads),
        *([("extra trainer arguments", shlex.join(extra))] if extra else []),
    ]


def log_file(cfg: TrainConfig, procs: Processes, dry_run: bool) -> str:
    """Where the script appends everything printed; created here, so that a bad SAVE_PATH is one clear line."""
    name = "train.log" if procs.node_rank == 0 else f"train_node{procs.node_rank}.log"
    path = os.path.join(cfg.save_path, name)
    if not dry_run:
        try:
            os.makedirs(cfg.save_path, exist_ok=True)
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as error:
            raise LaunchError(
                f"SAVE_PATH={cfg.save_path}: cannot write {path} ({error.strerror}); expected a writable directory"
            ) from error
    return path


def check_not_in_use(save_path: str) -> None:
    """A SAVE_PATH another run holds is refused here, before torch loads; the script then takes the lock."""
    if not os.path.isdir(save_path):
        return
    try:
        take(save_path, "a check").release()
    except FolderBusy as error:
        raise LaunchError(str(error)) from None


def checked(
    given: TrainConfig,
    texts: dict[str, str],
    has_cuda: bool,
    world: int,
    batch_defaults: tuple[int, int],
    check_batch: bool = True,
) -> tuple[TrainConfig, Stage]:
    """The resolved settings and their stage, or LaunchError naming the variable as the user wrote it."""
    cfg = resolve(dataclasses.replace(given), has_cuda=has_cuda, world_size=world, batch_defaults=batch_defaults)
    try:
        stage = validate(cfg, world, check_batch)
        check_data_settings(cfg.dataset, cfg.eval_dataset)
    except ConfigError as error:
        shown = texts.get(error.name, "" if error.value is None else str(error.value))
        raise LaunchError(f"{error.name.upper()}={shown}: expected {error.expected}") from None
    return cfg, stage


def plan(
    script: str, extra: list[str], batch_defaults: tuple[int, int], default_port: int
) -> dict[str, str | list[str]]:
    """Everything the script needs, as bash variables; raises LaunchError on a bad setting."""
    dry_run = env_bool("DRY_RUN") if os.environ.get("DRY_RUN", "").strip() else False
    given, texts = settings_from_env(extra)
    procs = processes_from_env(default_port)
    # Everything that does not depend on the device is checked before torch is imported; the default
    # batch sizes do (the tiny model without CUDA, the script's with it).
    both_batch_sizes = given.batch_size is not None and given.micro_batch_size is not None
    early, _ = checked(given, texts, False, procs.world_size, batch_defaults, check_batch=both_batch_sizes)
    if not dry_run and procs.node_rank == 0:
        check_not_in_use(early.save_path)
    devices = cuda_devices()
    check_devices(procs, devices, given.dtype)
    cfg, stage = checked(given, texts, devices > 0, procs.world_size, batch_defaults)
    if devices:
        device = f"CUDA: {devices} device(s) visible, {procs.num_gpus} process(es) per node (DTYPE {given.dtype}, NCCL)"
    else:
        device = f"no CUDA device found: {procs.num_gpus} CPU process(es) per node (float32, gloo, SDPA)"
    model_note = ""
    if given.model_path is None and cfg.model_path == recorded_base(cfg.pretrain_checkpoint):
        model_note = " (the base PRETRAIN_CHECKPOINT records)"
    elif given.model_path is None:
        model_note = " (default with CUDA)" if devices else " (the built-in tiny model: default without CUDA)"
    check_base_model(cfg.model_path, cfg.pretrain_checkpoint)
    threads, threads_note = thread_setting(cfg, procs)
    env = [f"OMP_NUM_THREADS={threads}"] if threads else []
    if not os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        env.append(f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT_S}")
    command = torchrun_command(procs, [*trainer_flags(cfg, given), *extra])
    return {
        "CLARA_ENV": env,
        "CLARA_CMD": command,
        "CLARA_COMMAND_LINE": shlex.join(env + command),
        "CLARA_LOG": log_file(cfg, procs, dry_run),
        "CLARA_SAVE_PATH": cfg.save_path,
        "CLARA_STAGE": cfg.stage,
        "CLARA_NODE_RANK": str(procs.node_rank),
        "CLARA_DRY_RUN": str(dry_run).lower(),
        "CLARA_SUMMARY": summary(script, cfg, stage, given, procs, device, model_note, threads_note, extra),
    }


def torchrun_command(procs: Processes, trainer_args: list[str]) -> list[str]:
    """The command that starts this node's processes of `python -m clara.train trainer_args...`."""
    # torchrun through clara.training.run_workers: a worker's own exit status (2: bad data or settings) reaches
    # the script.
    runner = [sys.executable, "-m", "clara.training.run_workers"]
    return [
        *runner,
        "--nproc_per_node",
        str(procs.num_gpus),
        "--nnodes",
        str(procs.num_nodes),
        "--node_rank",
        str(procs.node_rank),
        "--master_addr",
        procs.master_addr,
        "--master_port",
        str(procs.master_port),
        "-m",
        "clara.train",
        *trainer_args,
    ]


def as_bash(variables: dict[str, str | list[str]]) -> str:
    lines = []
    for name, value in variables.items():
        if isinstance(value, list):
            lines.append(f"{name}=({' '.join(shlex.quote(v) for v in value)})")
        else:
            lines.append(f"{name}={shlex.quote(value)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clara.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--script", required=True, help="the launcher's name, shown in the summary")
    parser.add_argument("--batch_size", type=int, required=True, help="the script's default BATCH_SIZE")
    parser.add_argument("--micro_batch_size", type=int, required=True, help="the script's default MICRO_BATCH_SIZE")
    parser.add_argument("--master_port", type=int, required=True, help="the rendezvous port of several nodes")
    parser.add_argument("--usage", action="store_true", help="print the settings the script reads, and exit")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="trainer arguments, after --")
    args = parser.parse_args(argv)
    if args.usage:
        print(usage(args.script))
        return 0
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    def body() -> None:
        print(as_bash(plan(args.script, extra, (args.batch_size, args.micro_batch_size), args.master_port)))

    return exit_status(body, also=(LaunchError,))


if __name__ == "__main__":
    sys.exit(main())
