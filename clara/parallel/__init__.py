"""Processes and partitions: what every multi-process part of clara shares.

    distributed  the torchrun process group, this process's device and dtype, rank-0 helpers, collectives
    console      rank 0 speaks for the job: `rank_zero_print`, `silent` (standard library only)
    zero3        ZeRO-3's share of the base: the same random draws as ZeRO-2, how much may stay gathered,
                 the frozen-weight linear that keeps no input, a release after each use
    shards       a resumable job cut into shards, each a file written whole (the index build and synthesis)

It may import clara.errors and clara.ports only (no model, data or training code), so the model,
the checkpoints and the trainer can all use it.
"""
