"""The model: records to tensors, the shared CLaRa model and its losses, decoding, checkpoints.

    topk         retrieval scores and the differentiable top-k of stage 2
    collate      records -> tensors for a stage (encoder inputs, decoder inputs, labels)
    losses       the loss terms a training step adds to the LM loss, each named once
    decoding     each answer of a batch decoded its own way (sampling, stop strings, streaming)
    model        the shared model: frozen base, LoRA roles, compress, inject, LM loss, generate
    tiny_base    where the shipped tiny base model is and which recipe built it (standard library only)
    tokenizer    the one tokenizer loader (a directory, a checkpoint, a Hub id, the tiny model's name)
    hub          where a checkpoint is: a directory or a Hugging Face Hub id (downloaded), Hub errors in one line
    checkpoint   build, save and load models (native and official layouts), the ZeRO-3 resize
    stage_model  the model a stage starts from, and the stage a checkpoint was trained for
    load         a trained model loaded for use: device, dtype and attention chosen one way
    vllm_export  the generator as a model folder vLLM loads: adapter merged, heads padded, fingerprinted
    export       `python -m clara.export` (a command line: the command-lines layer)

It may import the layers below it: settings (clara.config, clara.errors, clara.files, clara.locks),
clara.stages (with the prompts), clara.data (the data key) and clara.parallel. Nothing here imports
clara.index, clara.evaluation, clara.training, clara.serving or clara.synthesis.
"""
