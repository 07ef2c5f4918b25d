"""What a CLaRa training step costs: step time, throughput, peak memory and (on a GPU) model FLOPs
utilisation, for a model shape with random weights, measured through the trainer's own code.

Run `python -m bench --help`. Each configuration is measured in its own process (bench.child), so that
its peak memory is its own; bench.flops counts the model FLOPs of a step.
"""
