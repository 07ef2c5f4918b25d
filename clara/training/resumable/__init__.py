"""Resumable checkpoints under $SAVE_PATH/checkpoints: saving, publishing, rotating, verifying and
choosing the one to resume from. The exported model (the checkpoint format) lives in clara.model.checkpoint.

    files     the layout below, TrainState, the manifest, reading DeepSpeed's files without running code
    plan      which run SAVE_PATH continues, the checkpoint it resumes from, what a resume may change
    save      writing a checkpoint; BackgroundPublisher makes it durable and publishes it

It imports the settings, clara.data.fingerprint (the run's input keys), clara.model.checkpoint and clara.parallel;
only the trainer (clara.training.trainer) imports it.

Layout:
  checkpoints/run.json                    the run this SAVE_PATH continues: {"run_id", "finished_step"}
  checkpoints/step_N/                     DeepSpeed's files (model, ZeRO optimizer partitions, scheduler)
  checkpoints/step_N/trainer_state.json   TrainState, run id and settings (JSON, never a pickle)
  checkpoints/step_N/manifest.json        written last: every other file with its size and SHA-256
  previous_runs/<time>-<run id>/          what a fresh start moved aside (checkpoints, metrics.jsonl)

A save writes DeepSpeed's files and trainer_state.json into tmp_step_N; a background thread then
fsyncs them, writes the manifest and renames the directory to step_N (the next save, the last one
and a signal's save wait for it), so training does not wait for the disk.

Nothing read back can run code: DeepSpeed's .pt files are read with torch.load(weights_only=True)
and an allow-list of the few non-tensor types they hold, both by a check before the model loads
and by DeepSpeed's own reads (see use_safe_loading).
"""

from clara.training.resumable.files import (
    MANIFEST,
    STATE_FILE,
    CheckpointSettings,
    TrainState,
    check_loadable,
    checkpoint_root,
    complete_checkpoints,
    manifest_problem,
    safe_torch_load,
    use_safe_loading,
    write_manifest,
)
from clara.training.resumable.plan import (
    RESUME_FREE_SETTINGS,
    ResumePlan,
    changed_settings,
    load_resumable,
    mark_finished,
    plan_run,
    rewind_metrics,
)
from clara.training.resumable.save import BackgroundPublisher, nonfinite_parameters, save_resumable

__all__ = [
    "MANIFEST",
    "RESUME_FREE_SETTINGS",
    "STATE_FILE",
    "BackgroundPublisher",
    "CheckpointSettings",
    "ResumePlan",
    "TrainState",
    "changed_settings",
    "check_loadable",
    "checkpoint_root",
    "complete_checkpoints",
    "load_resumable",
    "manifest_problem",
    "mark_finished",
    "nonfinite_parameters",
    "plan_run",
    "rewind_metrics",
    "safe_torch_load",
    "save_resumable",
    "use_safe_loading",
    "write_manifest",
]
