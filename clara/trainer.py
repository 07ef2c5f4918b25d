"""The DeepSpeed training loop (README: "Outputs, checkpoints and resuming"), read top to bottom like a
recipe: `Trainer.setup()` (process group, data, model, resume), then `Trainer.train()`, one optimizer step at
a time (its micro-batches, the reduced step metrics, evaluation, saving), then the export. Every step
boundary is a resumable point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, field, fields

import datasets
import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.integrations import HfDeepSpeedConfig

from clara.checkpoint import export_parameters, save_model
from clara.collate import Batch, Collator
from clara.config import ConfigError, TrainConfig
from clara.data import load_records
from clara.debug import DebugPrinter
from clara.distributed import gathered, init_distributed, local_shard, rank_zero_first, resolve_dtype
from clara.errors import RunFailure
from clara.evaluate import evaluate_model
from clara.files import json_safe, write_json_atomic
from clara.fingerprint import train_data_key
from clara.metrics import retrieval_summary
from clara.model import StepOutput, attention_implementation
from clara.resumable import (
    TrainState,
    changed_settings,
    load_resumable,
    mark_finished,
    nonfinite_parameters,
    plan_run,
    rewind_metrics,
    save_resumable,
)
from clara.schedule import cosine_with_warmup
from clara.stage_model import build_stage_model, length_check
from clara.stages import get_stage
from clara.zero3 import release_after_each_use

MAX_NONFINITE_IN_A_ROW = 10


class Stop(Exception):
    """A signal asked the run to stop after saving."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- data order -------------------------------------------------------------------------------------------
def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def micro_batch_indices(order: list[int], step_in_epoch: int, micro: int, rank: int, world: int,
                        batch_size: int, micro_batch_size: int) -> list[int]:
    """The samples of one rank's micro-batch: each optimizer step takes the next batch_size of the order."""
    start = step_in_epoch * batch_size + (micro * world + rank) * micro_batch_size
    return order[start:start + micro_batch_size]


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    # Dropout is seeded from the position in the run, so a resumed run draws what the uninterrupted one drew.
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank) % (2**63)


# -- schedule ---------------------------------------------------------------------------------------------
def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Cosine with warmup and a floor (a constant for stages that ask for one), as a multiple of the peak."""
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))
    if get_stage(cfg.stage).constant_schedule:
        return lambda step: 1.0
    return functools.partial(cosine_with_warmup, total_steps=total_steps, warmup_steps=warmup, floor=cfg.min_lr_ratio)


def zero_config(cfg: TrainConfig) -> dict:
    """DeepSpeed's zero_optimization section for ZERO_STAGE and OFFLOAD."""
    zero: dict = {"stage": cfg.zero_stage}
    pinned = torch.cuda.is_available()  # page-locked CPU memory speeds up copies to and from a GPU
    if cfg.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pinned}
    if cfg.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pinned}
    if cfg.zero_stage == 3:
        # Every parameter is partitioned, the small ones too (LoRA matrices, norms): each rank holds
        # 1/world of the model, at the cost of a few small gathers per layer.
        zero["stage3_param_persistence_threshold"] = 0
    return zero


def deepspeed_config(cfg: TrainConfig, world: int, dtype: torch.dtype) -> dict:
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch_size // (cfg.micro_batch_size * world),
        "gradient_clipping": 1.0,
        "zero_optimization": zero_config(cfg),
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


# -- logging ----------------------------------------------------------------------------------------------
class RunLog:
    """Rank-0 output: console lines, metrics.jsonl and the optional TensorBoard / W&B sinks."""

    def __init__(self, cfg: TrainConfig, rank: int):
        self.enabled = rank == 0
        self.cfg = cfg
        self.tensorboard = None
        self.wandb = None
        if not self.enabled:
            return
        os.makedirs(cfg.save_path, exist_ok=True)
        self.metrics_path = os.path.join(cfg.save_path, "metrics.jsonl")
        if cfg.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("use_tensorboard", True, "the tensorboard package installed: pip install tensorboard") from None
            self.tensorboard = SummaryWriter(os.path.join(cfg.save_path, "tensorboard"))
        if cfg.use_wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("use_wandb", True, "the wandb package installed: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), dir=cfg.save_path)

    def print(self, *parts) -> None:
        if self.enabled:
            tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)
            sys.stdout.flush()

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as out:
            out.write(json.dumps(json_safe(record)) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb:
            self.wandb.log(numbers, step=record["step"])

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class TrainingSetup:
    """What a run trains with: the model, its stage's collator and the DeepSpeed engine around both."""

    model: object  # ClaraModel
    collator: object  # Collator
    trainable: list
    engine: object
    optimizer: object
    scheduler: object
    mse_weight: float  # the configured weight, or 0 for a stage without the MSE loss
    retrieval_weight: float  # the configured weight, or 0 for a stage without retrieval
    # ZeRO-3: transformers' HfDeepSpeedConfig, kept alive for as long as the partitioned model is used.
    zero3_config: object = None


def setup_training(cfg: TrainConfig, total_steps: int, world: int, device: torch.device, dtype: torch.dtype,
                   attn: str, log=print) -> TrainingSetup:
    """Seeded model, collator, AdamW, the learning-rate schedule and deepspeed.initialize (also used by bench/).

    With ZERO_STAGE=3 the base model is created partitioned (each rank loads only its share), through
    transformers' DeepSpeed integration: from_pretrained sees a live HfDeepSpeedConfig of stage 3.
    """
    config = deepspeed_config(cfg, world, dtype)
    zero3_config = HfDeepSpeedConfig(config) if cfg.zero_stage == 3 else None
    torch.manual_seed(cfg.seed)
    model = build_stage_model(cfg, dtype, attn, log=log)
    if zero3_config is not None:
        config["zero_optimization"].update(gathering_limits(model, device.type == "cuda"))
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device)
    model.train()
    stage = get_stage(cfg.stage)
    collator = Collator(stage, model.tokenizer, model.tokens, cfg.doc_max_length, cfg.max_len,
                        cfg.generation_top_k, cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=config)
    if zero3_config is not None:
        keep_gathered_until_step(model, model.mem_embeddings)
        release_after_each_use(model, optimizer)
    mse_weight = cfg.mse_weight if stage.uses_mse else 0.0
    retrieval_weight = cfg.retrieval_weight if stage.uses_query else 0.0
    return TrainingSetup(model, collator, trainable, engine, optimizer, scheduler, mse_weight, retrieval_weight,
                         zero3_config)


def gathering_limits(model, on_cuda: bool) -> dict:
    """ZeRO-3: how many parameters may stay gathered. DeepSpeed's defaults keep up to 1e9 gathered, and
    keep any that the backward uses again within 1e9 others: a model of fewer parameters stays whole on
    every rank, and ZeRO-3 saves nothing. Here: at most two of the largest unit a forward gathers (a
    transformer layer with its adapters, or the embedding matrix), gathered again for the backward.
    Prefetching overlaps the gathers with compute on CUDA; with gloo on the CPU it measured slower.
    """
    def size(module) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    unit = max(max(size(layer) for layer in model.backbone.layers), size(model.causal_lm.get_input_embeddings()))
    return {"stage3_max_live_parameters": min(2 * unit, 10**9), "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": min(unit, 5 * 10**7) if on_cuda else 0}


def keep_gathered_until_step(module: torch.nn.Module, param: torch.nn.Parameter) -> None:
    """ZeRO-3: gather `param` with `module`'s forward and keep it whole until the optimizer step.

    ZeRO-3 gathers a module's parameters before its forward, frees them after it and gathers them again
    before the module's backward, which it finds through the tensors the forward returns. The memory
    embeddings belong to ClaraModel itself, whose forward returns a StepOutput that DeepSpeed cannot
    look into: freed after the forward, they would be missing in the backward. As an "external
    parameter" they are gathered with the forward and freed only by the step, which repartitions all.
    """
    deepspeed.zero.register_external_parameter(module, param)
    param.is_external_param = True  # what DeepSpeed's own detection of such parameters sets


# -- one optimizer step -----------------------------------------------------------------------------------
@dataclass
class StepSums:
    """What a step adds up over its micro-batches (and, all-reduced, over the ranks)."""

    lm_loss: float = 0.0
    mse: float = 0.0
    retrieval: float = 0.0
    retrieval_batches: float = 0.0  # micro-batches with a retrieval loss (records with pos_index)
    finite_batches: float = 0.0  # micro-batches whose loss was finite
    tokens: float = 0.0  # tokens the model read: decoder prompt and answer, documents, questions
    correct_tokens: float = 0.0  # answer tokens whose argmax prediction was the gold token
    answer_tokens: float = 0.0
    stop_requests: float = 0.0  # ranks that received SIGTERM / SIGINT
    diverged_ranks: float = 0.0  # ranks whose trained weights hold inf or NaN after the step

    def all_reduced(self, device: torch.device) -> "StepSums":
        total = torch.tensor(astuple(self), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return StepSums(*total.tolist())


@dataclass
class StepResult:
    sums: StepSums  # this rank's
    skipped: bool
    chosen: list[list[int]] = field(default_factory=list)  # stage 2: each sample's chosen candidates
    positives: list[list[int] | None] = field(default_factory=list)


def _zero_backward(engine) -> None:
    """Backward of a zero loss touching every trained parameter, so that ZeRO's gradient hooks still fire
    (under ZeRO-3 with the parameters gathered: outside a forward each rank holds only its shard)."""
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    with gathered(trained):
        engine.backward(sum(p.sum() for p in trained) * 0.0)


def optimizer_step(engine, optimizer, batches: list[Batch], seeds: list[int], mse_weight: float,
                   on_first: Callable[[Batch, StepOutput], None] | None = None,
                   loss_scaled: bool = False, retrieval_weight: float = 0.0) -> StepResult:
    """Forward and backward every micro-batch of one optimizer step, then step.

    A non-finite loss on any rank replaces that micro-batch's backward by a zero one and runs the
    optimizer step at learning rate 0, so the weights stay as they were. With fp16 loss scaling
    (`loss_scaled`) DeepSpeed's scaler handles overflows itself: it skips the step and lowers the scale.
    """
    device = batches[0].dec_ids.device
    # Summed on the device in the order of StepSums' fields, so that the step never waits for a .item().
    sums = torch.zeros(len(fields(StepSums)), dtype=torch.float64, device=device)
    result = StepResult(sums=StepSums(), skipped=False)
    for micro, (batch, seed) in enumerate(zip(batches, seeds)):
        torch.manual_seed(seed)
        try:
            out = engine(batch, mse_weight=mse_weight, retrieval_weight=retrieval_weight)
            finite = torch.isfinite(out.loss.detach()).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if loss_scaled or finite.item() == 1.0:
                engine.backward(out.loss)
                zero, one = torch.zeros((), device=device), torch.ones((), device=device)
                mse = out.mse.detach() if out.mse is not None else zero
                retrieval = out.retrieval.detach() if out.retrieval is not None else zero
                correct = (out.lm.logits.argmax(-1) == out.lm.targets).sum()
                sums[:8] += torch.stack([out.lm.loss.detach().double(), mse.double(), retrieval.double(),
                                         (one if out.retrieval is not None else zero).double(), one.double(),
                                         torch.tensor(batch.num_tokens, device=device).double(), correct.double(),
                                         torch.tensor(out.lm.targets.numel(), device=device).double()])
            else:
                result.skipped = True
                _zero_backward(engine)
            if result.skipped and engine.is_gradient_accumulation_boundary():
                for group in optimizer.param_groups:
                    group["lr"] = 0.0  # the schedule sets the next step's rate again
            engine.step()
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                "Out of memory. Lower MICRO_BATCH_SIZE (raise the gradient accumulation instead), set "
                "GRADIENT_CHECKPOINTING=true, or lower MAX_LEN / DOC_MAX_LENGTH.") from error
        if out.chosen is not None:
            result.chosen += out.chosen.tolist()
            result.positives += batch.pos_index
        if micro == 0 and on_first is not None:
            on_first(batch, out)
    result.sums = StepSums(*sums.tolist())
    return result


# -- signals ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """SIGTERM and SIGINT are recorded, not acted on: the loop finishes its step, saves and stops."""
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        # After a stop, keep ignoring the signals: torchrun sends more while the ranks exit.
        if not received:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


# -- the run ------------------------------------------------------------------------------------------------
class Trainer:
    """One stage's run: setup(), then train(), which ends with the export."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.stage = get_stage(cfg.stage)
        self.state = TrainState()
        self.truncated_docs = 0

    # -- set-up -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world, self.local_rank, self.device = init_distributed()
        self.log = RunLog(cfg, self.rank)
        on_cuda = self.device.type == "cuda"
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.dtype == torch.float16 and not on_cuda:
            raise ConfigError("dtype", cfg.dtype, "auto, bf16 or fp32 on the CPU (fp16 loss scaling needs CUDA)")
        self.attn = attention_implementation(cfg.flash_attn, on_cuda)
        self._setup_data()  # first: bad records stop the run before the model loads
        self.steps_per_epoch = len(self.records) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError("batch_size", cfg.batch_size, f"at most the {len(self.records)} training samples")
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.max_epochs
        self.accumulation = cfg.batch_size // (cfg.micro_batch_size * self.world)
        # Where to start is decided (damaged or planted checkpoints reported) before the model loads.
        self.plan = plan_run(cfg, self.total_steps, self.rank, self.world, self.log.print)
        if self.plan.finished:
            return
        self.components = setup_training(cfg, self.total_steps, self.world, self.device, self.dtype, self.attn,
                                    log=self.log.print)
        self._resume()
        self._announce()
        show = cfg.debug_mode and self.rank == 0
        self.debug = DebugPrinter(self.components.model.tokenizer, self.components.model.tokens,
                                  cfg.debug_max_print_tokens) if show else None

    def _setup_data(self) -> None:
        cfg, stage = self.cfg, self.stage
        datasets.disable_progress_bars()
        min_docs = stage.min_docs(cfg.generation_top_k)
        check = length_check(cfg, stage)
        rejected = os.path.join(cfg.save_path, "rejected.jsonl") if self.rank == 0 else None
        # Local rank 0 prepares (once: cached); the node's other ranks wait for it and never read the input.
        preparer = self.local_rank == 0
        say = self.log.print if preparer else (print if self.local_rank == 1 else lambda *_: None)
        load = functools.partial(load_records, stage, bad_samples=cfg.bad_samples, min_docs=min_docs, log=say,
                                 make_check=check, preparer=preparer, workers=cfg.data_workers)
        self.records = load(cfg.dataset, rejected_path=rejected, max_samples=cfg.max_samples,
                            key=train_data_key(cfg) if preparer else None)
        self.eval_records = None
        if cfg.eval_dataset:
            eval_cfg = dataclasses.replace(cfg, dataset=cfg.eval_dataset, max_samples=None)
            self.eval_records = load(cfg.eval_dataset, key=train_data_key(eval_cfg) if preparer else None)

    def _resume(self) -> None:
        plan = self.plan
        if plan.directory is None:
            return
        load_resumable(self.components.engine, plan)
        self._restart_schedule_at(self.cfg.learning_rate)
        self.state = plan.state
        if plan.data_changed:
            # The saved position counts steps of other data: go on from the same step of the new data's order.
            self.state.epoch, self.state.step_in_epoch = divmod(self.state.global_step, self.steps_per_epoch)
        if self.rank == 0:
            rewind_metrics(self.cfg.save_path, self.state.global_step)
        self.log.print(f"Resumed from {plan.directory} at step {self.state.global_step}"
                       + (f" (epoch {self.state.epoch}, step {self.state.step_in_epoch} of the new data's order)."
                          if plan.data_changed else "."))
        changed = changed_settings(plan.settings, self.cfg.to_dict())
        if changed:
            self.log.print(f"Warning: the run that saved this checkpoint had other settings ({'; '.join(changed)}); "
                           "training goes on with the new ones. RESUME=false (--resume false) or another SAVE_PATH "
                           "starts over instead.")

    def _restart_schedule_at(self, peak: float) -> None:
        """The restored scheduler brings back the saved run's peak rate; a resumed run goes on with this one."""
        scheduler = self.components.scheduler
        scheduler.base_lrs = [peak] * len(scheduler.base_lrs)
        for group, factor in zip(self.components.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = peak
            group["lr"] = peak * factor(scheduler.last_epoch)

    def _announce(self) -> None:
        settings = self.cfg.to_dict()
        if self.rank == 0:
            write_json_atomic(os.path.join(self.cfg.save_path, "training_args.json"), settings)
        self.log.print("Settings: " + json.dumps(settings))
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.components.trainable)
        if self.cfg.zero_stage == 3:
            params = list(self.components.engine.module.parameters())
            held = sum(local_shard(p).numel() for p in params)
            total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            self.log.print(f"ZeRO-3: rank 0 holds {held:,} of the model's {total:,} parameters "
                           f"({held / total:.1%}; each rank about 1/{self.world})")
        self.log.print(f"Trainable parameters: {trainable:,} | world size {self.world} | device {self.device.type} | "
                       f"attention {self.attn} | dtype {str(self.dtype).replace('torch.', '')} | "
                       f"{len(self.records)} samples, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
                       f"gradient accumulation {self.accumulation}")

    # -- training -----------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Step until total_steps; save every save_steps, on a stop request and at the end; then export."""
        if self.plan.finished:
            self.log.print(f"Nothing to do: run {self.plan.run_id} finished at step {self.plan.state.global_step} "
                           f"and its model is in {self.cfg.save_path}. A larger MAX_STEPS continues it; "
                           "RESUME=false starts over.")
            return {}
        last: dict = {}
        progress = (tqdm(total=self.total_steps, initial=self.state.global_step, desc=self.cfg.stage,
                         dynamic_ncols=True, file=sys.stderr) if self.rank == 0 else None)
        with stop_requests() as received:
            try:
                while self.state.global_step < self.total_steps:
                    last = self._one_step(received, progress)
            except Stop as stop:
                self.log.print(f"Received {stop}: saved a resumable checkpoint at step {self.state.global_step}; "
                               "run the same command again to continue.")
                raise
            finally:
                if progress:
                    progress.close()  # an error printed next starts on a line of its own
        self.export(last)
        return last

    def _one_step(self, received: list[int], progress: tqdm | None) -> dict:
        cfg, state = self.cfg, self.state
        started = time.perf_counter()
        batches = self._next_batches()
        show = self.debug is not None and state.global_step % cfg.debug_every_steps == 0
        step = state.global_step
        result = optimizer_step(self.components.engine, self.components.optimizer, batches,
                                [step_seed(cfg.seed, step, m, self.rank) for m in range(self.accumulation)],
                                self.components.mse_weight,
                                on_first=self.debug.print_sample if show else None,
                                loss_scaled=self.dtype == torch.float16,
                                retrieval_weight=self.components.retrieval_weight)
        result.sums.stop_requests = float(len(received))
        result.sums.diverged_ranks = float(bool(nonfinite_parameters(self.components.engine.module)))
        sums = result.sums.all_reduced(self.device)
        if sums.diverged_ranks:
            raise RunFailure(f"step {step + 1}: the trained weights became inf/NaN (training diverged); nothing of "
                             f"this step was saved, and the checkpoints in {cfg.save_path}/checkpoints are the last "
                             "good ones. Lower LEARNING_RATE and start over (RESUME=false).")
        self._advance(skipped=result.skipped or sums.finite_batches == 0)
        metrics = self.step_metrics(result, sums, time.perf_counter() - started)
        self._report(metrics, progress)
        at_end = state.global_step == self.total_steps
        if self.eval_records is not None and (state.global_step % cfg.eval_steps == 0 or at_end):
            metrics.update(self.evaluate())
        if sums.stop_requests > 0:
            self.save_checkpoint(wait=True)
            raise Stop(received[0] if received else signal.SIGTERM)
        if state.global_step % cfg.save_steps == 0 or at_end:
            self.save_checkpoint(wait=at_end)
        return metrics

    def _next_batches(self) -> list[Batch]:
        """This rank's micro-batches of the next optimizer step, on the device."""
        cfg, state = self.cfg, self.state
        order = epoch_order(len(self.records), cfg.seed, state.epoch)
        batches = []
        for micro in range(self.accumulation):
            indices = micro_batch_indices(order, state.step_in_epoch, micro, self.rank, self.world, cfg.batch_size,
                                          cfg.micro_batch_size)
            batches.append(self.components.collator([self.records[i] for i in indices]).to(self.device))
            self.truncated_docs += batches[-1].truncated_docs
        return batches

    def _advance(self, skipped: bool) -> None:
        state = self.state
        state.global_step += 1
        state.step_in_epoch += 1
        state.consumed_samples += self.cfg.batch_size
        if state.step_in_epoch >= self.steps_per_epoch:
            state.epoch += 1
            state.step_in_epoch = 0
        state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if skipped else 0
        state.skipped_steps += int(skipped)
        if skipped:
            self.log.print(f"step {state.global_step}: non-finite loss, optimizer step skipped "
                           f"({state.nonfinite_in_a_row} in a row)")
            if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise RunFailure(f"{MAX_NONFINITE_IN_A_ROW} non-finite losses in a row: training diverged. "
                                 "Lower LEARNING_RATE and check the data.")

    def step_metrics(self, result: StepResult, sums: StepSums, elapsed: float) -> dict:
        """The metrics.jsonl line of a step (means over the finite micro-batches of every rank)."""
        skipped = self.state.nonfinite_in_a_row > 0
        finite = max(sums.finite_batches, 1.0)
        metrics = {
            "step": self.state.global_step, "epoch": round(self.state.global_step / self.steps_per_epoch, 4),
            "loss": sums.lm_loss / finite if not skipped else float("nan"),
            "mse_loss": sums.mse / finite if self.components.mse_weight and not skipped else None,
            "retrieval_loss": (sums.retrieval / sums.retrieval_batches if sums.retrieval_batches and not skipped
                               else None),
            "lr": self.components.scheduler.get_last_lr()[0], "grad_norm": grad_norm(self.components.engine),
            "samples_per_s": self.cfg.batch_size / elapsed, "tokens_per_s": sums.tokens / elapsed,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "token_acc": sums.correct_tokens / max(sums.answer_tokens, 1.0),
        }
        if result.chosen:
            retrieval = retrieval_summary(result.chosen, result.positives)
            metrics.update({k: v for k, v in retrieval.items() if k.startswith("recall")})
        return metrics

    def _report(self, metrics: dict, progress: tqdm | None) -> None:
        if progress:
            progress.update(1)
            shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                     "samples/s": f"{metrics['samples_per_s']:.1f}", "tokens/s": f"{metrics['tokens_per_s']:.0f}"}
            for name, short in (("mse_loss", "mse"), ("retrieval_loss", "retrieval")):
                if metrics[name] is not None:
                    shown[short] = f"{metrics[name]:.4f}"
            progress.set_postfix(shown, refresh=False)
        if self.state.global_step % self.cfg.logging_steps == 0 or self.state.global_step == self.total_steps:
            self.log.metrics(metrics)

    def evaluate(self) -> dict:
        """Evaluate on the held-out records; returns the eval_* metrics (also logged)."""
        results = evaluate_model(self.components.engine.module, self.eval_records, self.cfg, self.rank, self.world,
                                 self.device)
        metrics = {f"eval_{k}": v for k, v in results["summary"].items()}
        self.log.metrics({"step": self.state.global_step, **metrics})
        self.log.print(f"step {self.state.global_step} eval: " + json.dumps(results["summary"]))
        return metrics

    # -- saving -------------------------------------------------------------------------------------------
    def save_checkpoint(self, wait: bool = False) -> None:
        """A resumable checkpoint of this step; it is published in the background unless `wait`."""
        save_resumable(self.components.engine, self.state, self.cfg, self.rank, self.plan.run_id, wait=wait,
                       inputs=self.plan.inputs)

    def export(self, last: dict) -> None:
        """The trained model in the checkpoint format, into SAVE_PATH (rank 0 writes, every rank waits)."""
        cfg = self.cfg
        if self.truncated_docs:
            self.log.print(f"{self.truncated_docs} documents were longer than DOC_MAX_LENGTH={cfg.doc_max_length} "
                           "tokens and were truncated.")
        module = self.components.engine.module
        # Under ZeRO-3 the ranks gather the exported parameters together; rank 0 writes them.
        with gathered(export_parameters(module)):
            if self.rank == 0:
                save_model(module, cfg.save_path, cfg.stage)
        if self.rank == 0:
            write_json_atomic(os.path.join(cfg.save_path, "training_args.json"), cfg.to_dict())
            mark_finished(cfg, self.plan.run_id, self.state.global_step)
            self.log.print(f"Saved the {cfg.stage} model to {cfg.save_path} "
                           f"(final loss {last.get('loss', float('nan')):.4f}).")
        dist.barrier()

    def close(self) -> None:
        if hasattr(self, "log"):
            self.log.close()


def train(cfg: TrainConfig) -> dict:
    """Train one stage as configured; returns the last step's metrics."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
