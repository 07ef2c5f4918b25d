"""What a run trains with (README: "Models larger than one GPU"): DeepSpeed's configuration for ZERO_STAGE
and OFFLOAD, the learning-rate schedule, and `setup_training`, which builds the seeded stage model, its
collator, AdamW and the DeepSpeed engine around them (the trainer's and bench/'s set-up).

Its pieces read no TrainConfig: `training_settings` builds the TrainingSettings they read from the settings,
once, at the entry point (the trainer, bench/).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from clara.config import TrainConfig
from clara.model.collate import Collator
from clara.model.losses import WEIGHT_SETTINGS, stage_weights
from clara.model.model import ModelSettings
from clara.parallel.zero3 import gathering_limits, keep_gathered_until_step, release_after_each_use
from clara.stages import Stage
from clara.training.schedule import cosine_with_warmup


# -- settings ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """The learning rate: its peak, the warmup's share of the steps and the cosine's floor (a multiple of the peak)."""

    learning_rate: float
    warmup_ratio: float
    min_lr_ratio: float


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What DeepSpeed's configuration is made of: the global and per-process batch, ZERO_STAGE and OFFLOAD."""

    batch_size: int
    micro_batch_size: int
    zero_stage: int
    offload: str  # none, optimizer or all


@dataclass(frozen=True)
class TrainingSettings:
    """The settings setup_training reads."""

    deepspeed: DeepSpeedSettings
    schedule: Schedule
    # Each loss weight setting (mse_weight, ...: clara.model.losses.WEIGHT_SETTINGS) as configured; the stage
    # decides which of them apply.
    loss_weights: dict[str, float]
    seed: int
    gradient_checkpointing: bool
    doc_max_length: int
    max_len: int
    generation_top_k: int


def training_settings(cfg: TrainConfig) -> TrainingSettings:
    """What setup_training reads of the settings: the one mapping, shared by the trainer and bench/ (which
    must not import the trainer: its data stack would count in bench's CPU memory figures)."""
    return TrainingSettings(
        deepspeed=DeepSpeedSettings(cfg.batch_size, cfg.micro_batch_size, cfg.zero_stage, cfg.offload),
        schedule=Schedule(cfg.learning_rate, cfg.warmup_ratio, cfg.min_lr_ratio),
        loss_weights={name: getattr(cfg, name) for name in WEIGHT_SETTINGS},
        seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing,
        doc_max_length=cfg.doc_max_length,
        max_len=cfg.max_len,
        generation_top_k=cfg.generation_top_k,
    )


# -- schedule ---------------------------------------------------------------------------------------------
def lr_lambda(schedule: Schedule, stage: Stage, total_steps: int) -> Callable[[int], float]:
    """Cosine with warmup and a floor (a constant for stages that ask for one), as a multiple of the peak."""
    warmup = max(1, math.ceil(schedule.warmup_ratio * total_steps))
    if stage.constant_schedule:
        return lambda step: 1.0
    return functools.partial(
        cosine_with_warmup, total_steps=total_steps, warmup_steps=warmup, floor=schedule.min_lr_ratio
    )


def zero_config(settings: DeepSpeedSettings) -> dict:
    """DeepSpeed's zero_optimization section for ZERO_STAGE and OFFLOAD."""
    zero: dict = {"stage": settings.zero_stage}
    pinned = torch.cuda.is_available()  # page-locked CPU memory speeds up copies to and from a GPU
    if settings.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pinned}
    if settings.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pinned}
    if settings.zero_stage == 3:
        # Every parameter is partitioned, the small ones too (LoRA matrices, norms): each rank holds
        # 1/world of the model, at the cost of a few small gathers per layer.
        zero["stage3_param_persistence_threshold"] = 0
    return zero


def deepspeed_config(settings: DeepSpeedSettings, world: int, dtype: torch.dtype) -> dict:
    return {
        "train_batch_size": settings.batch_size,
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.batch_size // (settings.micro_batch_size * world),
        "gradient_clipping": 1.0,
        "zero_optimization": zero_config(settings),
        "bf16": {"enabled": dtype == torch.bfloat16},
        # Dynamic loss scaling (loss_scale 0): overflowing fp16 steps are skipped by DeepSpeed's scaler.
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # With OFFLOAD, torch's AdamW steps the fp32 master weights in CPU memory (README: "Models larger
        # than one GPU") instead of DeepSpeedCPUAdam, which needs a C++ build at start-up.
        "zero_force_ds_cpu_optimizer": False,
    }


# -- set-up -----------------------------------------------------------------------------------------------
def model_settings(cfg: TrainConfig) -> ModelSettings:
    """The settings that define the model a run trains (the one place they are read for clara.model)."""
    return ModelSettings(
        base_model=cfg.model_path,
        n_mem_tokens=cfg.n_mem_tokens,
        compress_rate=cfg.compress_rate,
        doc_max_length=cfg.doc_max_length,
        generation_top_k=cfg.generation_top_k,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        topk_temperature=cfg.topk_temperature,
        candidate_chunk_size=cfg.candidate_chunk_size,
    )


@dataclass
class TrainingSetup:
    """What a run trains with: the model, its stage's collator and the DeepSpeed engine around both."""

    model: object  # ClaraModel
    collator: object  # Collator
    trainable: list
    engine: object
    optimizer: object
    scheduler: object
    # Each loss term's weight by its setting (mse_weight, ...: clara.model.losses), 0 for a stage without it.
    weights: dict[str, float]
    # ZeRO-3: transformers' HfDeepSpeedConfig, kept alive for as long as the partitioned model is used.
    zero3_config: object = None


def setup_training(
    settings: TrainingSettings,
    build_model: Callable[[], torch.nn.Module],
    stage: Stage,
    total_steps: int,
    world: int,
    device: torch.device,
    dtype: torch.dtype,
) -> TrainingSetup:
    """Seeded model, collator, AdamW, the learning-rate schedule and deepspeed.initialize (also used by bench/).

    `build_model` makes the ClaraModel of `stage` (clara.model.stage_model.build_stage_model with its
    settings); it is called here, after the seed is set and, with ZERO_STAGE=3, while the base model is
    created partitioned (each rank loads only its share) through transformers' DeepSpeed integration:
    from_pretrained sees a live HfDeepSpeedConfig of stage 3.
    """
    config = deepspeed_config(settings.deepspeed, world, dtype)
    zero3_config = HfDeepSpeedConfig(config) if settings.deepspeed.zero_stage == 3 else None
    torch.manual_seed(settings.seed)
    model = build_model()
    if zero3_config is not None:
        config["zero_optimization"].update(gathering_limits(model, device.type == "cuda"))
    if settings.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device)
    model.train()
    collator = Collator(
        stage,
        model.tokenizer,
        model.tokens,
        settings.doc_max_length,
        settings.max_len,
        settings.generation_top_k,
        settings.seed,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.schedule.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings.schedule, stage, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    if zero3_config is not None:
        keep_gathered_until_step(model, model.mem_embeddings)
        release_after_each_use(model, optimizer)
    return TrainingSetup(
        model,
        collator,
        trainable,
        engine,
        optimizer,
        scheduler,
        stage_weights(stage, settings.loss_weights),
        zero3_config,
    )
