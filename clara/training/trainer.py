"""The DeepSpeed training loop (README: "Outputs, checkpoints and resuming"), read top to bottom like a
recipe: `Trainer.setup()` (process group, data, model, resume), then `Trainer.train()`, one optimizer step at
a time (its micro-batches, the reduced step metrics, evaluation, saving), then the export. Every step
boundary is a resumable point.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time

import datasets
import torch
import torch.distributed as dist
from tqdm import tqdm

from clara.config import ConfigError, TrainConfig, data_settings
from clara.data.fingerprint import train_data_key, train_inputs
from clara.data.load import load_records
from clara.data.spec import parse_source
from clara.errors import RunFailure
from clara.evaluation.debug import DebugPrinter
from clara.evaluation.evaluate import EvalSettings, evaluate_stage
from clara.evaluation.metrics import retrieval_summary
from clara.files import write_json_atomic
from clara.model.checkpoint import export_parameters, resolve_base_path, save_model
from clara.model.collate import Batch
from clara.model.model import attention_implementation
from clara.model.stage_model import build_stage_model, length_check
from clara.parallel.console import silent
from clara.parallel.distributed import gathered, init_distributed, leave_process_group, local_shard, resolve_dtype
from clara.parallel.zero3 import full_numel
from clara.stages import get_stage
from clara.training.resumable import (
    BackgroundPublisher,
    CheckpointSettings,
    TrainState,
    changed_settings,
    load_resumable,
    mark_finished,
    nonfinite_parameters,
    plan_run,
    rewind_metrics,
    save_resumable,
)
from clara.training.run_log import RunLog, peak_memory_mb, progress_bar, show_step
from clara.training.schedule import restart_schedule_at
from clara.training.setup import model_settings, setup_training, training_settings
from clara.training.signals import Stop, stop_requests
from clara.training.step import (
    StepResult,
    StepSums,
    epoch_order,
    grad_norm,
    micro_batch_indices,
    optimizer_step,
    step_seed,
    term_means,
)

MAX_NONFINITE_IN_A_ROW = 10


# -- the settings the resumable checkpoints read ------------------------------------------------------------
def checkpoint_settings(cfg: TrainConfig) -> CheckpointSettings:
    """What the resumable checkpoints read: where they go, RESUME, RESUME_CHANGED_INPUTS, MAX_CKPT_NUM."""
    return CheckpointSettings(cfg.save_path, cfg.resume, cfg.resume_changed_inputs, cfg.max_ckpt_num)


# -- the run ------------------------------------------------------------------------------------------------
class Trainer:
    """One stage's run: setup(), then train(), which ends with the export."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.stage = get_stage(cfg.stage)
        self.checkpoints = checkpoint_settings(cfg)
        self.model_settings = model_settings(cfg)
        self.state = TrainState()
        self.publisher = BackgroundPublisher()  # publishes each resumable checkpoint in the background
        self.truncated_docs = 0

    # -- set-up -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world, self.local_rank, self.device = init_distributed()
        self.run_log = RunLog(
            cfg.save_path,
            self.rank,
            use_tensorboard=cfg.use_tensorboard,
            wandb_project=cfg.wandb_project if cfg.use_wandb else None,
            settings=cfg.to_dict(),
        )
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
        inputs = (
            train_inputs(self.data_key, resolve_base_path(cfg.model_path), cfg.pretrain_checkpoint)
            if self.rank == 0
            else None
        )
        self.resume_plan = plan_run(
            self.checkpoints, inputs, self.total_steps, self.rank, self.world, self.run_log.print
        )
        if self.resume_plan.finished:
            return
        self.components = setup_training(
            training_settings(cfg),
            functools.partial(
                build_stage_model,
                self.model_settings,
                cfg.pretrain_checkpoint,
                self.stage,
                self.dtype,
                self.attn,
                log=self.run_log.print,
            ),
            self.stage,
            self.total_steps,
            self.world,
            self.device,
            self.dtype,
        )
        self._resume()
        self._announce()
        show = cfg.debug_mode and self.rank == 0
        self.debug = (
            DebugPrinter(self.components.model.tokenizer, self.components.model.tokens, cfg.debug_max_print_tokens)
            if show
            else None
        )

    def _setup_data(self) -> None:
        cfg, stage = self.cfg, self.stage
        datasets.disable_progress_bars()
        min_docs = stage.min_docs(cfg.generation_top_k)
        check = length_check(self.model_settings, cfg.pretrain_checkpoint, stage, cfg.max_len, cfg.seed)
        rejected = os.path.join(cfg.save_path, "rejected.jsonl") if self.rank == 0 else None
        # Local rank 0 prepares (once: cached); the node's other ranks wait for it and never read the input.
        preparer = self.local_rank == 0
        log = self.run_log.print if preparer else (print if self.local_rank == 1 else silent)
        load = functools.partial(
            load_records,
            stage,
            bad_samples=cfg.bad_samples,
            min_docs=min_docs,
            log=log,
            make_check=check,
            preparer=preparer,
            workers=cfg.data_workers,
        )
        key = functools.partial(
            train_data_key,
            stage_name=stage.name,
            model_path=cfg.model_path,
            pretrain_checkpoint=cfg.pretrain_checkpoint,
        )
        source, settings = parse_source(cfg.dataset), data_settings(cfg)
        # Rank 0 is always a preparer: the resume plan records this key among the run's inputs.
        self.data_key = key(source, settings=settings) if preparer else None
        self.records = load(source, rejected_path=rejected, max_samples=cfg.max_samples, key=self.data_key)
        self.eval_records = None
        if cfg.eval_dataset:
            eval_source = parse_source(cfg.eval_dataset, "eval_dataset")
            eval_settings = {**settings, "max_samples": None}  # the held-out set is read whole
            self.eval_records = load(eval_source, key=key(eval_source, settings=eval_settings) if preparer else None)

    def _resume(self) -> None:
        plan = self.resume_plan
        if plan.directory is None:
            return
        load_resumable(self.components.engine, plan)
        # The restored scheduler brings back the saved run's peak rate; a resumed run goes on with this one.
        restart_schedule_at(self.components.scheduler, self.components.optimizer, self.cfg.learning_rate)
        self.state = plan.state
        if plan.data_changed:
            # The saved position counts steps of other data: go on from the same step of the new data's order.
            self.state.epoch, self.state.step_in_epoch = divmod(self.state.global_step, self.steps_per_epoch)
        if self.rank == 0:
            rewind_metrics(self.cfg.save_path, self.state.global_step)
        log = self.run_log.print
        log(
            f"Resumed from {plan.directory} at step {self.state.global_step}"
            + (
                f" (epoch {self.state.epoch}, step {self.state.step_in_epoch} of the new data's order)."
                if plan.data_changed
                else "."
            )
        )
        changed = changed_settings(plan.settings, self.cfg.to_dict())
        if changed:
            log(
                f"Warning: the run that saved this checkpoint had other settings ({'; '.join(changed)}); "
                "training goes on with the new ones. RESUME=false (--resume false) or another SAVE_PATH "
                "starts over instead."
            )

    def _announce(self) -> None:
        settings, log = self.cfg.to_dict(), self.run_log.print
        if self.rank == 0:
            write_json_atomic(os.path.join(self.cfg.save_path, "training_args.json"), settings)
        log("Settings: " + json.dumps(settings))
        trainable = sum(full_numel(p) for p in self.components.trainable)
        if self.cfg.zero_stage == 3:
            params = list(self.components.engine.module.parameters())
            held = sum(local_shard(p).numel() for p in params)
            total = sum(full_numel(p) for p in params)
            log(
                f"ZeRO-3: rank 0 holds {held:,} of the model's {total:,} parameters "
                f"({held / total:.1%}; each rank about 1/{self.world})"
            )
        log(
            f"Trainable parameters: {trainable:,} | world size {self.world} | device {self.device.type} | "
            f"attention {self.attn} | dtype {str(self.dtype).replace('torch.', '')} | "
            f"{len(self.records)} samples, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
            f"gradient accumulation {self.accumulation}"
        )

    # -- training -----------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Step until total_steps; save every save_steps, on a stop request and at the end; then export."""
        if self.resume_plan.finished:
            plan = self.resume_plan
            self.run_log.print(
                f"Nothing to do: run {plan.run_id} finished at step {plan.state.global_step} "
                f"and its model is in {self.cfg.save_path}. A larger MAX_STEPS continues it; "
                "RESUME=false starts over."
            )
            return {}
        last: dict = {}
        progress = progress_bar(self.total_steps, self.state.global_step, self.stage.name) if self.rank == 0 else None
        with stop_requests() as received:
            try:
                while self.state.global_step < self.total_steps:
                    last = self._one_step(received, progress)
            except Stop as stop:
                self.run_log.print(
                    f"Received {stop}: saved a resumable checkpoint at step {self.state.global_step}; "
                    "run the same command again to continue."
                )
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
        result = optimizer_step(
            self.components.engine,
            self.components.optimizer,
            batches,
            [step_seed(cfg.seed, step, m, self.rank) for m in range(self.accumulation)],
            on_first=self.debug.print_sample if show else None,
            loss_scaled=self.dtype == torch.float16,
            **self.components.weights,
        )
        result.sums.values["stop_requests"] = float(len(received))
        result.sums.values["diverged_ranks"] = float(bool(nonfinite_parameters(self.components.engine.module)))
        sums = result.sums.all_reduced(self.device)
        if sums["diverged_ranks"]:
            raise RunFailure(
                f"step {step + 1}: the trained weights became inf/NaN (training diverged); nothing of "
                f"this step was saved, and the checkpoints in {cfg.save_path}/checkpoints are the last "
                "good ones. Lower LEARNING_RATE and start over (RESUME=false)."
            )
        self._advance(skipped=result.skipped or sums["finite_batches"] == 0)
        metrics = self.step_metrics(result, sums, time.perf_counter() - started)
        self._report(metrics, progress)
        at_end = state.global_step == self.total_steps
        if self.eval_records is not None and (state.global_step % cfg.eval_steps == 0 or at_end):
            metrics.update(self.evaluate())
        if sums["stop_requests"] > 0:
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
            indices = micro_batch_indices(
                order, state.step_in_epoch, micro, self.rank, self.world, cfg.batch_size, cfg.micro_batch_size
            )
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
            self.run_log.print(
                f"step {state.global_step}: non-finite loss, optimizer step skipped "
                f"({state.nonfinite_in_a_row} in a row)"
            )
            if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise RunFailure(
                    f"{MAX_NONFINITE_IN_A_ROW} non-finite losses in a row: training diverged. "
                    "Lower LEARNING_RATE and check the data."
                )

    def step_metrics(self, result: StepResult, sums: StepSums, elapsed: float) -> dict:
        """The metrics.jsonl line of a step (means over the finite micro-batches of every rank)."""
        skipped = self.state.nonfinite_in_a_row > 0
        finite = max(sums["finite_batches"], 1.0)
        metrics = {
            "step": self.state.global_step,
            "epoch": round(self.state.global_step / self.steps_per_epoch, 4),
            "loss": sums["lm_loss"] / finite if not skipped else float("nan"),
            **term_means(sums, skipped),
            "lr": self.components.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm(self.components.engine),
            "samples_per_s": self.cfg.batch_size / elapsed,
            "tokens_per_s": sums["tokens"] / elapsed,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "token_acc": sums["correct_tokens"] / max(sums["answer_tokens"], 1.0),
        }
        if result.chosen:
            retrieval = retrieval_summary(result.chosen, result.positives)
            metrics.update({k: v for k, v in retrieval.items() if k.startswith("recall")})
        return metrics

    def _report(self, metrics: dict, progress: tqdm | None) -> None:
        if progress:
            show_step(progress, metrics)
        if self.state.global_step % self.cfg.logging_steps == 0 or self.state.global_step == self.total_steps:
            self.run_log.metrics(metrics)

    def evaluate(self) -> dict:
        """Evaluate on the held-out records; returns the eval_* metrics (also logged)."""
        cfg = self.cfg
        settings = EvalSettings(cfg.micro_batch_size, cfg.eval_max_samples, cfg.max_new_tokens, cfg.max_len, cfg.seed)
        results = evaluate_stage(
            self.components.engine.module, self.eval_records, self.stage, settings, self.rank, self.world, self.device
        )
        metrics = {f"eval_{k}": v for k, v in results["summary"].items()}
        self.run_log.metrics({"step": self.state.global_step, **metrics})
        self.run_log.print(f"step {self.state.global_step} eval: " + json.dumps(results["summary"]))
        return metrics

    # -- saving -------------------------------------------------------------------------------------------
    def save_checkpoint(self, wait: bool = False) -> None:
        """A resumable checkpoint of this step; it is published in the background unless `wait`."""
        save_resumable(
            self.components.engine,
            self.state,
            self.checkpoints,
            self.cfg.to_dict(),
            self.rank,
            self.resume_plan.run_id,
            self.publisher,
            wait=wait,
            inputs=self.resume_plan.inputs,
        )

    def export(self, last: dict) -> None:
        """The trained model in the checkpoint format, into SAVE_PATH (rank 0 writes, every rank waits)."""
        cfg = self.cfg
        if self.truncated_docs:
            self.run_log.print(
                f"{self.truncated_docs} documents were longer than DOC_MAX_LENGTH={cfg.doc_max_length} "
                "tokens and were truncated."
            )
        module = self.components.engine.module
        # Under ZeRO-3 the ranks gather the exported parameters together; rank 0 writes them.
        with gathered(export_parameters(module)):
            if self.rank == 0:
                save_model(module, cfg.save_path, self.stage.name)
        if self.rank == 0:
            write_json_atomic(os.path.join(cfg.save_path, "training_args.json"), cfg.to_dict())
            mark_finished(cfg.save_path, self.resume_plan.run_id, self.state.global_step)
            self.run_log.print(
                f"Saved the {self.stage.name} model to {cfg.save_path} "
                f"(final loss {last.get('loss', float('nan')):.4f})."
            )
        dist.barrier()

    def close(self) -> None:
        if hasattr(self, "run_log"):
            self.run_log.close()


def train(cfg: TrainConfig) -> dict:
    """Train one stage as configured; returns the last step's metrics."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        last = trainer.train()
    finally:
        trainer.close()
    leave_process_group()  # every rank has passed the export's barrier
    return last
