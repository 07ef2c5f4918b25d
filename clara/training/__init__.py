"""Training: the launchers' settings, the DeepSpeed set-up, the loop, its log and its resumable state.

    schedule     the learning-rate schedule (shared with the tiny model's build) and its restart on resuming
    signals      SIGTERM / SIGINT as stop requests, honoured at the next step boundary
    setup        DeepSpeed's configuration (ZeRO stage, offload), the schedule and `setup_training`
                 (also used by bench/)
    step         one optimizer step, its `StepSums` added up by loss name, and the gradient norm
    run_log      rank 0's console, progress bar, metrics.jsonl and TensorBoard / W&B lines
    resumable/   resumable states under checkpoints/: files and manifest, where a run resumes, saving
    trainer      `Trainer`: setup() (process group, data, model, resume), train() (evaluation, saving), export
    tiny         the built-in tiny model's recipe and builder (`python -m clara.tiny`)
    launch_env   the launchers' own variables (processes) read and checked, and the list `SCRIPT --help` prints
    launch       `python -m clara.launch`: the launchers' settings, resolved and checked before anything heavy,
                 the summary they print and the torchrun command
    run_workers  `python -m clara.run_workers`: torchrun with the first failed worker's exit status

It may import everything below it (clara.evaluation, clara.model, clara.data, clara.parallel, clara.stages
and the settings); clara.serving and clara.synthesis are not imported. This file imports nothing, so
`python -m clara.training.launch` stays free of torch.
"""
