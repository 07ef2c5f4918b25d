"""What a CLaRa training step costs: step time, throughput, peak memory and (on a GPU) model FLOPs
utilisation, for a model shape with random weights, measured through the trainer's own code.

Run `python -m bench --help`. Each configuration is measured in its own process (bench.child), so that
its peak memory is its own.
    config        BenchConfig: one measured row's shape and settings (each field also an option), real shapes
    cli           the python -m bench command line, generated from BenchConfig's fields
    sweeps        the scaling rows of --sweep
    machine       the CPU, library versions and load of the machine; waiting for a quieter moment
    report        the results table
    child         measures one configuration in its process (python -m bench.child)
    random_base   the random-weight base and its padded tokenizer; the shape FLOPs are counted from
    synthetic     records of a stage's input format with texts of the asked lengths
    peak_memory   peak memory over a stretch of the run (CUDA allocations, or the resident set size)
    profile       one step under torch.profiler, by kind of operator
    flops         the model FLOPs of a step, and GPUs' peak rates
    memory_parts  what a model of a given shape holds: parameters, bytes per token of a layer, ZeRO-3's gathering
    memory        the expected peak memory of a step, from the model shape (python -m bench.memory)
    gpu_check     the GPU acceptance run (python -m bench.gpu_check)
    gpu_rehearsal its rehearsal on CPU (--cpu-rehearsal)
    data_prep, retrieval, serve   the other measurements (python -m bench --data / --retrieval / --serve)

bench sits above every layer of clara and may import any of it; a stage is looked up by name only in
BenchConfig.stage_spec, and everything stage-specific (adapters, typical sample, FLOP rule) comes from the
`Stage`.
"""
