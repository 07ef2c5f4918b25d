"""Evaluation and inference: scoring a model, the Python API, the paper benchmark.

    metrics      EM, F1, cover-EM, recall/precision@k (standard library only)
    debug        the colour-coded confidence print, from the training forward's own logits
    evaluate     a model evaluated on normalised records (loss, generation, EM/F1, recall), shared by
                 the trainer and the command lines
    inference    the `CLaRa` Python API (`from clara import CLaRa`)
    open_corpus  the open-corpus evaluation: recall over a whole corpus index, answers from its vectors
    command      `python -m clara.evaluate` (a command line)
    benchmark    `python -m clara.benchmark`: answer quality on the paper's sets (a command line)

It may import clara.model, clara.index, clara.data, clara.parallel, clara.stages and the settings;
clara.training, clara.serving and clara.synthesis are above it.
"""
