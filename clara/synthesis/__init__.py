"""Training data for all three stages from a user's own documents (`python -m clara.synthesize`), after the
CLaRa paper's synthesis: an LLM writes simple and complex QA pairs and a paraphrase of every document, and
coverage rounds ask for pairs on the facts still uncovered.

    recipe      the tasks, their prompts (default_prompts.json, editable), answer schemas and filters
    llm         one interface to an OpenAI-compatible server (aiohttp, with retries) ...
    local       ... and to a local Hugging Face model generating in batches
    documents   one document through the recipe
    pipeline    a corpus in resumable shards, with a manifest and a progress bar
    records     the stages' files (BM25 distractors, a held-out split) and the summary

    __main__    python -m clara.synthesize (clara/synthesize.py keeps that path)

It may import the bottom layers (clara.errors, clara.files, clara.openai_protocol, clara.vllm_server for `--llm
vllm:`, clara.config), the corpus reader and the passage splitter (clara.index.corpus, clara.index.folder,
clara.index.passages: a user's documents are cut for synthesis exactly as the index cuts them), clara.parallel and
clara.model.tiny_base (the built-in model as a local LLM); nothing outside this package imports it but the command
line's old path, clara/synthesize.py.
"""
