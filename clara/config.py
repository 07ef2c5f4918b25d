"""Training settings: one dataclass (each field with its help text), the defaults that depend on the stage,
the model and the device, validation, and the settings that decide which records a run trains on.

This module is light on purpose (no torch, no datasets): the launchers resolve and check the settings
through it before anything heavy starts (`python -m clara.launch`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from clara.errors import CheckpointError, ConfigError
from clara.stages import STAGES, Stage, get_stage

TINY_MODEL_NAME = "tiny"
# Files every resumable checkpoint directory holds (clara.training.resumable writes them).
CHECKPOINT_MANIFEST = "manifest.json"
CHECKPOINT_STATE = "trainer_state.json"
GPU_DEFAULT_MODEL = "Qwen/Qwen3-14B"
REPO_ROOT = Path(__file__).resolve().parent.parent


_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def hub_id_parts(path: str) -> tuple[str, str | None] | None:
    """(repo id, subfolder or None) when path reads as a Hugging Face Hub id `owner/name[/subfolder]`.

    None for anything that reads as a local path: an existing one, an absolute or ./ ~ path, or one
    whose first part is a local directory (a mistyped `checkpoints/stage1` stays a local path).
    """
    if os.path.exists(path) or path.startswith(("/", ".", "~")) or "\\" in path:
        return None
    parts = path.strip("/").split("/")
    if len(parts) < 2 or not all(_HUB_NAME.fullmatch(p) for p in parts[:2]) or os.path.isdir(parts[0]):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def official_base_name(name: str, path: str) -> str:
    """The base model an official config.json names, as something transformers can load.

    The release records the path of its authors' copy (e.g. /mnt/.../Mistral-7B-Instruct-v0.2); a path
    that does not exist here is replaced by the Hub id of the model it names.
    """
    if not os.path.isabs(name) or os.path.exists(name):
        return name
    base = os.path.basename(name.rstrip("/"))
    for prefix, owner in (("Mistral-", "mistralai"), ("Qwen", "Qwen"), ("Llama-", "meta-llama")):
        if base.startswith(prefix):
            return f"{owner}/{base}"
    raise CheckpointError(
        f"{path}/config.json: decoder_model_name {name!r} does not exist here; pass the base "
        "model (base_model= / --model_path)"
    )


def recorded_base(checkpoint: str | None) -> str | None:
    """The base model a local checkpoint folder records (native: the folder its base-model key names when
    that exists here, else `base_model`; official layout: decoder_model_name as official_base_name reads
    it); None for no checkpoint, a Hub id or a folder without a readable config.json."""
    config_path = Path(checkpoint or "") / "config.json"
    if not checkpoint or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if "decoder_model_name" in config:
            return official_base_name(config["decoder_model_name"], checkpoint)
    except (ValueError, OSError, CheckpointError):
        return None
    folder = (config.get("base_model_key") or {}).get("model")
    if folder and os.path.isdir(folder) and config.get("base_model") != TINY_MODEL_NAME:
        return folder  # the absolute path: a relative MODEL_PATH of stage 1 works from any directory
    return config.get("base_model")


# Past this many, preparing the data is bound by the disk more than by the CPUs.
MAX_DATA_WORKERS = 16


def default_data_workers() -> int:
    """The CPUs this process may use (its affinity, not OMP_NUM_THREADS), at most MAX_DATA_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_DATA_WORKERS))


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # What to train
    stage: str = setting("stage1", "training stage: " + ", ".join(STAGES))
    model_path: str | None = setting(
        None,
        "base model: hub id, local directory, or 'tiny' for the built-in model (default: the base "
        f"PRETRAIN_CHECKPOINT was trained on; without one, tiny without CUDA, {GPU_DEFAULT_MODEL} with it)",
    )
    pretrain_checkpoint: str | None = setting(
        None, "checkpoint of the previous stage (stage1_2 needs stage1's, stage2 needs stage1_2's)"
    )
    allow_no_checkpoint: bool = setting(False, "let stage1_2/stage2 start from the base model")
    dataset: str | None = setting(
        None,
        "training JSONL file(s) joined by commas, or a Hub data set "
        "hf:NAME:CONFIG[:SPLIT] (default: the stage's example file)",
    )
    eval_dataset: str | None = setting(
        None, "held-out data (JSONL files or hf:NAME:CONFIG[:SPLIT]) evaluated every --eval_steps and at the end"
    )
    save_path: str | None = setting(None, "output directory (default: checkpoints/clara_<stage>)")
    bad_samples: str = setting(
        "error", "error: stop on bad records; skip: train on the good ones, write the rest to rejected.jsonl"
    )
    data_workers: int | None = setting(
        None,
        "processes that prepare the data on its first use (default: the CPUs "
        f"this process may use, at most {MAX_DATA_WORKERS})",
    )
    # Model
    doc_max_length: int = setting(256, "max document tokens")
    compress_rate: int = setting(
        32, "document tokens per memory vector; memory tokens = doc_max_length / compress_rate"
    )
    generation_top_k: int = setting(5, "stage2: documents selected per question")
    max_len: int | None = setting(None, "max decoder tokens (default 2048, stage2 1024)")
    mse_weight: float | None = setting(
        None, "weight of the MSE alignment loss, 0 turns it off; stage1/stage1_2 (default 0.1; tiny model 0)"
    )
    retrieval_weight: float = setting(
        0.0,
        "stage2: weight of a cross-entropy loss that pulls the retrieval scores "
        "towards each record's pos_index; 0 (the official objective): the "
        "generator's loss alone trains retrieval",
    )
    dtype: str = setting(
        "auto",
        "auto: bf16 on a GPU that supports it, fp16 (DeepSpeed's dynamic loss scaling) on older "
        "GPUs such as V100 and T4, fp32 on the CPU; bf16; fp16; fp32",
    )
    flash_attn: str = setting("auto", "auto: FlashAttention-2 when installed and on CUDA, else SDPA; true; false")
    gradient_checkpointing: bool | None = setting(None, "recompute activations in backward (default: on with CUDA)")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha")
    lora_dropout: float = setting(0.1, "LoRA dropout")
    topk_temperature: float = setting(0.02, "stage2: softmax temperature of the differentiable top-k")
    candidate_chunk_size: int = setting(64, "stage2: candidates compressed per no-grad chunk (bounds peak memory)")
    # Optimisation
    learning_rate: float | None = setting(
        None, "peak learning rate (default 1e-4, stage2 5e-6; tiny model 2e-3, stage2 1e-3)"
    )
    batch_size: int | None = setting(
        None, "global batch size: samples per optimizer step (default 4; tiny model: micro_batch_size x processes)"
    )
    micro_batch_size: int | None = setting(None, "samples per process per forward (default 1; tiny model: 8)")
    max_epochs: int = setting(1, "epochs over the data")
    max_steps: int | None = setting(None, "stop after this many optimizer steps (default: the epochs decide)")
    max_samples: int | None = setting(None, "use at most this many training samples")
    warmup_ratio: float = setting(0.03, "share of steps warming the learning rate up")
    min_lr_ratio: float = setting(0.1, "floor of the cosine schedule, as a share of the peak")
    seed: int = setting(42, "random seed: same seed, data and world size give the same run")
    zero_stage: int = setting(
        2, "DeepSpeed ZeRO stage: 0, 1, 2, or 3 (3 also partitions the frozen base model over the processes)"
    )
    offload: str = setting(
        "none",
        "ZeRO-Offload to CPU memory: none; optimizer (the optimizer states, ZERO_STAGE "
        "1 to 3); all (also the parameters, ZERO_STAGE=3)",
    )
    # Output
    debug_mode: bool = setting(True, "colour-coded per-token confidence print")
    debug_every_steps: int = setting(5, "debug print every N optimizer steps")
    debug_max_print_tokens: int = setting(100, "answer tokens shown per debug print")
    logging_steps: int = setting(1, "write metrics.jsonl every N optimizer steps")
    eval_steps: int = setting(50, "evaluate every N optimizer steps (with --eval_dataset)")
    eval_max_samples: int = setting(100, "samples generated from per evaluation (stage1_2/stage2)")
    max_new_tokens: int = setting(64, "max generated tokens per answer in evaluation")
    save_steps: int = setting(100, "save a resumable checkpoint every N optimizer steps")
    max_ckpt_num: int = setting(3, "resumable checkpoints kept")
    resume: str = setting(
        "auto", "auto: continue from the newest checkpoint in save_path; false: start over; or a checkpoint directory"
    )
    resume_changed_inputs: bool = setting(
        False,
        "resume even though the data or the base model changed since the "
        "checkpoint (the epoch order is recomputed for the new data from the "
        "saved step on); false: such a resume stops with exit 2",
    )
    use_tensorboard: bool = setting(False, "log to save_path/tensorboard")
    use_wandb: bool = setting(False, "log to Weights & Biases")
    wandb_project: str = setting("clara", "W&B project")

    @property
    def n_mem_tokens(self) -> int:
        return self.doc_max_length // self.compress_rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The settings that decide which records a stage trains on, and how each is checked (the MAX_LEN check
# renders a record's decoder input with the memory tokens, documents and seed-picked instruction).
DATA_SETTINGS = ("max_len", "doc_max_length", "compress_rate", "generation_top_k", "seed", "bad_samples", "max_samples")


def data_settings(cfg: TrainConfig) -> dict:
    """The values of DATA_SETTINGS by name: part of the key of a run's data (clara.data.fingerprint)."""
    return {name: getattr(cfg, name) for name in DATA_SETTINGS}


def example_path(relative: str) -> str:
    """An example file as given when it exists from here, else inside the repository (any working directory)."""
    return relative if os.path.exists(relative) else str(REPO_ROOT / relative)


def resolve(
    cfg: TrainConfig, has_cuda: bool | None = None, world_size: int = 1, batch_defaults: tuple[int, int] = (4, 1)
) -> TrainConfig:
    """Fill the settings left at None with their stage-, model- and device-dependent defaults.

    batch_defaults: (batch_size, micro_batch_size) for a real model; each launcher has its own.
    """
    if has_cuda is None:
        import torch  # deferred: only the trainer's own call needs to look for CUDA

        has_cuda = torch.cuda.is_available()
    stage = STAGES.get(cfg.stage)  # an unknown name is validate()'s to report
    if cfg.model_path is None:
        # The base the previous stage's checkpoint was trained on, on any device (README: "Three stages").
        cfg.model_path = recorded_base(cfg.pretrain_checkpoint) or (GPU_DEFAULT_MODEL if has_cuda else TINY_MODEL_NAME)
    tiny = cfg.model_path == TINY_MODEL_NAME
    if stage is not None:
        if cfg.dataset is None:
            cfg.dataset = example_path(stage.default_dataset)
        if cfg.learning_rate is None:
            cfg.learning_rate = stage.tiny_learning_rate if tiny else stage.learning_rate
        if cfg.max_len is None:
            cfg.max_len = stage.max_len
    if cfg.save_path is None:
        cfg.save_path = f"./checkpoints/clara_{cfg.stage}"
    if cfg.micro_batch_size is None:
        cfg.micro_batch_size = 8 if tiny else batch_defaults[1]
    if cfg.batch_size is None:
        # The tiny model trains one micro-batch of 8 per process and step, so a CPU epoch takes minutes.
        cfg.batch_size = cfg.micro_batch_size * world_size if tiny else batch_defaults[0]
    if cfg.mse_weight is None:
        # The MSE loss keeps the tiny model from learning to read (README: "Tips").
        cfg.mse_weight = 0.0 if tiny else 0.1
    if cfg.gradient_checkpointing is None:
        cfg.gradient_checkpointing = has_cuda
    if cfg.data_workers is None:
        cfg.data_workers = default_data_workers()
    return cfg


POSITIVE_INTS = (
    "doc_max_length",
    "compress_rate",
    "generation_top_k",
    "batch_size",
    "micro_batch_size",
    "max_epochs",
    "max_len",
    "debug_every_steps",
    "debug_max_print_tokens",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "max_ckpt_num",
    "lora_r",
    "lora_alpha",
    "candidate_chunk_size",
    "eval_max_samples",
    "max_new_tokens",
    "max_steps",
    "max_samples",
    "data_workers",
)
# float() also reads "nan", "inf" and "1e999" (inf): a non-finite setting would poison the weights.
FLOAT_RANGES = {
    "learning_rate": (lambda v: v > 0, "a finite number > 0 (e.g. 1e-4)"),
    "topk_temperature": (lambda v: v > 0, "a finite number > 0 (e.g. 0.02)"),
    "mse_weight": (lambda v: v >= 0, "a finite number >= 0 (e.g. 0.1)"),
    "retrieval_weight": (lambda v: v >= 0, "a finite number >= 0 (e.g. 1)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
}
CHOICES = {
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "flash_attn": ("auto", "true", "false"),
    "bad_samples": ("error", "skip"),
    "zero_stage": (0, 1, 2, 3),
    "offload": ("none", "optimizer", "all"),
}


def validate(cfg: TrainConfig, world_size: int = 1, check_batch: bool = True) -> Stage:
    """The stage the settings name; ConfigError naming the first invalid setting. `cfg` has been through resolve().

    check_batch False leaves out BATCH_SIZE against MICRO_BATCH_SIZE x processes, for a check made before
    the device (and with it the default batch sizes) is known.
    """
    if cfg.stage not in STAGES:
        raise ConfigError("stage", cfg.stage, "one of " + ", ".join(STAGES))
    stage = get_stage(cfg.stage)
    for name in POSITIVE_INTS:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(name, value, "a positive integer")
    for name, (in_range, expected) in FLOAT_RANGES.items():
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and in_range(value)):
            raise ConfigError(name, value, expected)
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(name, getattr(cfg, name), "one of " + ", ".join(map(str, choices)))
    if cfg.offload == "all" and cfg.zero_stage != 3:
        raise ConfigError(
            "offload",
            cfg.offload,
            f"none or optimizer with ZERO_STAGE={cfg.zero_stage} (all also "
            "offloads the parameters, which only ZERO_STAGE=3 partitions)",
        )
    if cfg.offload == "optimizer" and cfg.zero_stage == 0:
        raise ConfigError(
            "offload",
            cfg.offload,
            "none with ZERO_STAGE=0 (offloading the optimizer states needs ZERO_STAGE 1, 2 or 3)",
        )
    if cfg.doc_max_length % cfg.compress_rate:
        raise ConfigError(
            "doc_max_length",
            cfg.doc_max_length,
            f"a multiple of COMPRESS_RATE={cfg.compress_rate} (memory tokens per document = "
            "DOC_MAX_LENGTH / COMPRESS_RATE)",
        )
    per_step = cfg.micro_batch_size * world_size
    if check_batch and cfg.batch_size % per_step:
        raise ConfigError(
            "batch_size",
            cfg.batch_size,
            f"a multiple of MICRO_BATCH_SIZE x processes = {cfg.micro_batch_size} x {world_size} = {per_step}",
        )
    resumable = any(os.path.isfile(os.path.join(cfg.resume, name)) for name in (CHECKPOINT_MANIFEST, CHECKPOINT_STATE))
    if cfg.resume not in ("auto", "false") and not resumable:
        raise ConfigError(
            "resume", cfg.resume, "auto, false, or a resumable checkpoint directory ($SAVE_PATH/checkpoints/step_N)"
        )
    _check_pretrain_checkpoint(cfg, stage)
    return stage


def _check_pretrain_checkpoint(cfg: TrainConfig, stage: Stage) -> None:
    if cfg.pretrain_checkpoint and hub_id_parts(cfg.pretrain_checkpoint) is not None:
        return  # a Hub id, resolved (and its errors reported) when the trainer loads it
    if cfg.pretrain_checkpoint:
        if not os.path.isdir(cfg.pretrain_checkpoint):
            raise ConfigError(
                "pretrain_checkpoint",
                cfg.pretrain_checkpoint,
                "the SAVE_PATH of a finished earlier stage (no such directory)",
            )
        if not os.path.isfile(os.path.join(cfg.pretrain_checkpoint, "config.json")):
            raise ConfigError(
                "pretrain_checkpoint",
                cfg.pretrain_checkpoint,
                "the SAVE_PATH of a finished earlier stage (not a checkpoint: no config.json inside)",
            )
    elif stage.previous and not cfg.allow_no_checkpoint:
        raise ConfigError(
            "pretrain_checkpoint",
            None,
            f"the {stage.previous} SAVE_PATH, since STAGE={stage.name} continues from a "
            f"{stage.previous} checkpoint; or ALLOW_NO_CHECKPOINT=true to start from the base model",
        )
