"""The DeepSpeed training loop (spec section 5): one optimizer step at a time, resumable at every step boundary."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clara.config import ConfigError, TrainConfig
from clara.distributed import init_distributed, rank_zero_first
from clara.resumable import (RunFailure, TrainState, changed_settings, load_resumable, mark_finished,
                             nonfinite_parameters, plan_run, rewind_metrics, save_resumable)

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
def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Cosine with warmup and a floor (stage2: constant), as a multiple of the peak."""
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if cfg.stage == "stage2":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: TrainConfig, world: int, on_cuda: bool) -> dict:
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch_size // (cfg.micro_batch_size * world),
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": on_cuda},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
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
                raise ConfigError("USE_TENSORBOARD=true needs the tensorboard package: pip install tensorboard") from None
            self.tensorboard = SummaryWriter(os.path.join(cfg.save_path, "tensorboard"))
        if cfg.use_wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("USE_WANDB=true needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), dir=cfg.save_path)

    def print(self, *parts) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)
            sys.stdout.flush()

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        # JSON has no NaN or Infinity (a skipped step's loss): those are written as null.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.metrics_path, "a", encoding="utf-8") as out:
            out.write(json.dumps(finite, allow_nan=False) + "\n")
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
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _nonfinite_safe_loss(model) -> torch.Tensor:
    """A zero loss touching every trained parameter, so that ZeRO's gradient hooks still fire."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


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


def setup_training(cfg: TrainConfig, total_steps: int, world: int, device: torch.device, dtype: torch.dtype,
                   attn: str, log=print) -> TrainingSetup:
    """Seeded model, collator, AdamW, the learning-rate schedule and deepspeed.initialize (also used by bench/)."""
    import deepspeed

    from clara.collate import Collator
    from clara.stages import build_stage_model, stage_module

    torch.manual_seed(cfg.seed)
    model = build_stage_model(cfg, dtype, attn, log=log)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device)
    model.train()
    collator = Collator(cfg.stage, model.tokenizer, model.tokens, cfg.doc_max_length, cfg.max_len,
                        cfg.generation_top_k, cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, device.type == "cuda"))
    mse_weight = cfg.mse_weight if stage_module(cfg.stage).USES_MSE else 0.0
    return TrainingSetup(model, collator, trainable, engine, optimizer, scheduler, mse_weight)


@dataclass
class StepResult:
    # Summed over this rank's micro-batches: LM loss, MSE, finite micro-batches, tokens read,
    # correct answer tokens, supervised answer tokens.
    sums: torch.Tensor
    skipped: bool
    chosen: list[list[int]]
    positives: list[list[int] | None]


def optimizer_step(engine, optimizer, batches: list, seeds: list[int], mse_weight: float,
                   on_first=None) -> StepResult:
    """Forward and backward every micro-batch of one optimizer step, then step.

    A non-finite loss on any rank replaces that micro-batch's backward by a zero one and runs the
    optimizer step at learning rate 0, so the weights stay as they were.
    """
    device = batches[0].dec_ids.device
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    skipped = False
    chosen, positives = [], []
    for micro, (batch, seed) in enumerate(zip(batches, seeds)):
        torch.manual_seed(seed)
        try:
            out = engine(batch, mse_weight=mse_weight)
            finite = torch.isfinite(out.loss.detach()).float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 1.0:
                engine.backward(out.loss)
                mse = out.mse.detach() if out.mse is not None else torch.zeros((), device=device)
                correct = (out.lm.logits.argmax(-1) == out.lm.targets).sum()
                sums += torch.stack([out.lm.loss.detach().double(), mse.double(), torch.ones((), device=device).double(),
                                     torch.tensor(batch.num_tokens, device=device).double(), correct.double(),
                                     torch.tensor(out.lm.targets.numel(), device=device).double()])
            else:
                skipped = True
                engine.backward(_nonfinite_safe_loss(engine.module))
            if skipped and engine.is_gradient_accumulation_boundary():
                for group in optimizer.param_groups:
                    group["lr"] = 0.0  # the schedule sets the next step's rate again
            engine.step()
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                "Out of memory. Lower MICRO_BATCH_SIZE (raise the gradient accumulation instead), set "
                "GRADIENT_CHECKPOINTING=true, or lower MAX_LEN / DOC_MAX_LENGTH.") from error
        if out.chosen is not None:
            chosen += out.chosen.tolist()
            positives += batch.pos_index
        if micro == 0 and on_first is not None:
            on_first(batch, out)
    return StepResult(sums=sums.cpu(), skipped=skipped, chosen=chosen, positives=positives)


# -- the run ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Train one stage as configured; returns the last logged metrics."""
    import datasets

    from clara.checkpoint import save_model
    from clara.collate import Collator
    from clara.data import load_records
    from clara.debug import DebugPrinter
    from clara.model import attention_implementation
    from clara.stages import stage_tokenizer

    rank, world, local_rank, device = init_distributed()
    log = RunLog(cfg, rank)
    datasets.disable_progress_bars()
    on_cuda = device.type == "cuda"
    if not on_cuda:
        log.print("No CUDA device: training on CPU (float32, gloo, PyTorch SDPA).")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    attn = attention_implementation(cfg.flash_attn, on_cuda)

    # Data first: bad records stop the run before the model loads. Rank 0 builds the Arrow cache.
    # Each record's decoder input is measured against MAX_LEN with the tokenizer, loaded (once) only
    # when no record breaks the schema.
    @functools.cache
    def length_check():
        tokenizer, tokens = stage_tokenizer(cfg)
        return Collator(cfg.stage, tokenizer, tokens, cfg.doc_max_length, cfg.max_len, cfg.generation_top_k,
                        cfg.seed).length_problem

    min_docs = cfg.generation_top_k if cfg.stage == "stage2" else 1
    rejected = os.path.join(cfg.save_path, "rejected.jsonl")
    records = rank_zero_first(lambda: load_records(cfg.stage, cfg.dataset, cfg.bad_samples, min_docs,
                                                   rejected if rank == 0 else None, cfg.max_samples, log=log.print,
                                                   make_check=length_check),
                              rank, world)
    eval_records = (rank_zero_first(lambda: load_records(cfg.stage, cfg.eval_dataset, cfg.bad_samples, min_docs,
                                                         None, None, log=log.print, make_check=length_check),
                                    rank, world)
                    if cfg.eval_dataset else None)
    steps_per_epoch = len(records) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch_size={cfg.batch_size}: larger than the {len(records)} training samples")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.max_epochs
    # Where to start, decided (and damaged or planted checkpoints reported) before the model loads.
    plan = plan_run(cfg, total_steps, rank, world, log.print)
    if plan.finished:
        log.print(f"Nothing to do: run {plan.run_id} finished at step {plan.state.global_step} and its model is in "
                  f"{cfg.save_path}. A larger MAX_STEPS continues it; RESUME=false starts over.")
        log.close()
        return {}

    setup = setup_training(cfg, total_steps, world, device, dtype, attn, log=log.print)
    model, collator, engine, optimizer, scheduler = (setup.model, setup.collator, setup.engine, setup.optimizer,
                                                     setup.scheduler)
    accumulation = cfg.batch_size // (cfg.micro_batch_size * world)

    state = TrainState()
    if plan.directory:
        load_resumable(engine, plan)
        state = plan.state
        if rank == 0:
            rewind_metrics(cfg.save_path, state.global_step)
        log.print(f"Resumed from {plan.directory} at step {state.global_step}.")
        changed = changed_settings(plan.settings, cfg.to_dict())
        if changed:
            log.print(f"Warning: the run that saved this checkpoint had other settings ({'; '.join(changed)}); "
                      "training goes on with the new ones. RESUME=false (--resume false) or another SAVE_PATH "
                      "starts over instead.")

    n_trainable = sum(p.numel() for p in setup.trainable)
    settings = cfg.to_dict()
    if rank == 0:
        with open(os.path.join(cfg.save_path, "training_args.json"), "w", encoding="utf-8") as out:
            json.dump(settings, out, indent=2)
    log.print("Settings: " + json.dumps(settings))
    log.print(f"Trainable parameters: {n_trainable:,} | world size {world} | device {device.type} | "
              f"attention {attn} | dtype {str(dtype).replace('torch.', '')} | {len(records)} samples, "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps, gradient accumulation {accumulation}")

    debug = DebugPrinter(model.tokenizer, model.tokens, cfg.debug_max_print_tokens) if cfg.debug_mode and rank == 0 else None
    stop_signal: list[int] = []
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                         for s in (signal.SIGTERM, signal.SIGINT)}
    last: dict = {}
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=state.global_step, desc=cfg.stage, dynamic_ncols=True,
                        file=sys.stderr)
    truncated_docs = 0
    try:
        while state.global_step < total_steps:
            order = epoch_order(len(records), cfg.seed, state.epoch)
            started = time.perf_counter()
            batches = []
            for micro in range(accumulation):
                indices = micro_batch_indices(order, state.step_in_epoch, micro, rank, world, cfg.batch_size,
                                              cfg.micro_batch_size)
                batches.append(collator([records[i] for i in indices]).to(device))
                truncated_docs += batches[-1].truncated_docs
            show_debug = debug is not None and state.global_step % cfg.debug_every_steps == 0
            result = optimizer_step(
                engine, optimizer, batches, [step_seed(cfg.seed, state.global_step, m, rank) for m in range(accumulation)],
                setup.mse_weight, on_first=(lambda b, o: debug.print_sample(b, o, state.global_step)) if show_debug else None)
            state.global_step += 1
            state.step_in_epoch += 1
            state.consumed_samples += cfg.batch_size
            if state.step_in_epoch >= steps_per_epoch:
                state.epoch += 1
                state.step_in_epoch = 0
            diverged = bool(nonfinite_parameters(engine.module))
            totals = torch.cat([result.sums, torch.tensor([len(stop_signal), diverged], dtype=torch.float64)])
            dist.all_reduce(totals)
            if totals[7] > 0:
                raise RunFailure(f"step {state.global_step}: the trained weights became inf/NaN (training diverged); "
                                 f"nothing of this step was saved and the checkpoints in {cfg.save_path}/checkpoints "
                                 "are the last good ones. Lower LEARNING_RATE and start over (RESUME=false).")
            skipped = result.skipped or totals[2] == 0
            state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if skipped else 0
            state.skipped_steps += int(skipped)
            elapsed = time.perf_counter() - started
            finite_batches = max(totals[2].item(), 1.0)
            last = {
                "step": state.global_step, "epoch": round(state.global_step / steps_per_epoch, 4),
                "loss": totals[0].item() / finite_batches if not skipped else float("nan"),
                "mse_loss": totals[1].item() / finite_batches if setup.mse_weight and not skipped else None,
                "lr": scheduler.get_last_lr()[0], "grad_norm": _grad_norm(engine),
                "samples_per_s": cfg.batch_size / elapsed, "tokens_per_s": totals[3].item() / elapsed,
                "peak_memory_mb": round(peak_memory_mb(device), 1),
                "token_acc": totals[4].item() / max(totals[5].item(), 1.0),
            }
            if result.chosen:
                from clara.metrics import retrieval_summary

                last.update({k: v for k, v in retrieval_summary(result.chosen, result.positives).items()
                             if k.startswith("recall")})
            if skipped:
                log.print(f"step {state.global_step}: non-finite loss, optimizer step skipped "
                          f"({state.nonfinite_in_a_row} in a row)")
                if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise RunFailure(f"{MAX_NONFINITE_IN_A_ROW} non-finite losses in a row: training diverged. "
                                     "Lower LEARNING_RATE and check the data.")
            if progress:
                progress.update(1)
                shown = {"loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}",
                         "samples/s": f"{last['samples_per_s']:.1f}", "tokens/s": f"{last['tokens_per_s']:.0f}"}
                if last["mse_loss"] is not None:
                    shown["mse"] = f"{last['mse_loss']:.4f}"
                progress.set_postfix(shown, refresh=False)
            if state.global_step % cfg.logging_steps == 0 or state.global_step == total_steps:
                log.metrics(last)
            if eval_records is not None and (state.global_step % cfg.eval_steps == 0 or state.global_step == total_steps):
                from clara.evaluate import evaluate_model

                results = evaluate_model(engine.module, eval_records, cfg, rank, world, device)
                last.update({f"eval_{k}": v for k, v in results["summary"].items()})
                log.metrics({"step": state.global_step, **{f"eval_{k}": v for k, v in results["summary"].items()}})
                log.print(f"step {state.global_step} eval: " + json.dumps(results["summary"]))
            if totals[6] > 0:
                save_resumable(engine, state, cfg, rank, plan.run_id, wait=True)
                raise Stop(stop_signal[0] if stop_signal else signal.SIGTERM)
            if state.global_step % cfg.save_steps == 0 or state.global_step == total_steps:
                save_resumable(engine, state, cfg, rank, plan.run_id, wait=state.global_step == total_steps)
        if progress:
            progress.close()
        if truncated_docs:
            log.print(f"{truncated_docs} documents were longer than DOC_MAX_LENGTH={cfg.doc_max_length} "
                      "tokens and were truncated.")
        if rank == 0:
            save_model(engine.module, cfg.save_path, cfg.stage)
            with open(os.path.join(cfg.save_path, "training_args.json"), "w", encoding="utf-8") as out:
                json.dump(settings, out, indent=2)
            mark_finished(cfg, plan.run_id, state.global_step)
            log.print(f"Saved the {cfg.stage} model to {cfg.save_path} (final loss {last.get('loss', float('nan')):.4f}).")
        dist.barrier()
    except Stop as stop:
        log.print(f"Received {stop}: saved a resumable checkpoint at step {state.global_step}; "
                  "run the same command again to continue.")
        raise
    finally:
        if progress:
            progress.close()  # an error printed next starts on a line of its own
        # After a stop, keep ignoring the signals: torchrun sends more while the ranks exit.
        if not stop_signal:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        log.close()
    return last


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)
